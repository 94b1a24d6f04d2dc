"""Feed-forward learning rules: ``RULES[kind](net, cfg, seed)`` builds one, with ``cfg`` the
rule's class from models.config.ff (``CONFIGS[kind]``; defaults if None)."""

from models.config.ff import RULE_CONFIGS as CONFIGS
from models.ff.rules.base import Rule
from models.ff.rules.bp import BP
from models.ff.rules.credit_bridge import CreditBridge
from models.ff.rules.dfa import DFA
from models.ff.rules.dtp import DTP
from models.ff.rules.ep import EP
from models.ff.rules.head_only import HeadOnly
from models.ff.rules.pc import PC
from models.ff.rules.state_bridge import StateBridge

RULES: dict[str, type[Rule]] = {
    r.name: r for r in (BP, DFA, DTP, PC, EP, StateBridge, CreditBridge, HeadOnly)
}

__all__ = ["RULES", "CONFIGS", "Rule", "BP", "DFA", "DTP", "PC", "EP", "StateBridge",
           "CreditBridge", "HeadOnly"]
