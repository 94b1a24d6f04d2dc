"""Feed-forward learning rules; ``RULES[name](net, cfg)`` builds one (cfg defaults if None)."""

from models.ff.rules.base import Rule
from models.ff.rules.bp import BP, BPConfig
from models.ff.rules.credit_bridge import CreditBridge, CreditBridgeConfig
from models.ff.rules.dfa import DFA, DFAConfig
from models.ff.rules.dtp import DTP, DTPConfig
from models.ff.rules.ep import EP, EPConfig
from models.ff.rules.head_only import HeadOnly, HeadOnlyConfig
from models.ff.rules.pc import PC, PCConfig
from models.ff.rules.state_bridge import StateBridge, StateBridgeConfig

RULES: dict[str, type[Rule]] = {
    r.name: r for r in (BP, DFA, DTP, PC, EP, StateBridge, CreditBridge, HeadOnly)
}
CONFIGS: dict[str, type] = {
    "bp": BPConfig, "dfa": DFAConfig, "dtp": DTPConfig, "pc": PCConfig, "ep": EPConfig,
    "state_bridge": StateBridgeConfig, "credit_bridge": CreditBridgeConfig,
    "head_only": HeadOnlyConfig,
}

__all__ = ["RULES", "CONFIGS", "Rule", "BP", "DFA", "DTP", "PC", "EP", "StateBridge",
           "CreditBridge", "HeadOnly", "BPConfig", "DFAConfig", "DTPConfig", "PCConfig", "EPConfig",
           "StateBridgeConfig", "CreditBridgeConfig", "HeadOnlyConfig"]
