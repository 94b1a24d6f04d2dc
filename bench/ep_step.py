"""Time one training step of EP (tracking-AEP), BPTT and the BP transformer, with peak memory.

Default: log 003's char-LM configuration (C=128, one block, B=64, T=256, T1=150, T2=20, V=65).
``--small`` is a CPU smoke run. Writes bench/results/ep_step.json.

    python -m bench.ep_step [--small] [--compile] [--bf16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from models.config.eqt import BPTTRule, EPRule, NudgeConfig
from models.eqt.model import EqShape, EquilibriumLM, gradients
from models.eqt.relax import RelaxConfig
from models.eqt.stabilisers import JacregController
from models.nets.transformer import TransformerLM, TransformerShape

OUT = Path("bench/results/ep_step.json")


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time(step: Callable[[], None], device: torch.device, repeats: int) -> dict[str, float]:
    step()  # warm-up (and compilation)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return {"ms_per_step": 1000 * sorted(times)[len(times) // 2], "peak_mb": _peak_mb(device)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="CPU smoke scale (C=32, B=4, T=32)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the block / BP model")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    c, h, b, t, t1, t2, v = (32, 4, 4, 32, 20, 5, 65) if args.small else (128, 4, 64, 256, 150, 20,
                                                                            65)
    torch.manual_seed(0)
    idx = torch.randint(v, (b, t), device=device)
    tgt = torch.randint(v, (b, t), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16
                         and device.type == "cuda")
    eq = EquilibriumLM(EqShape(vocab_size=v, block_size=t, n_embd=c, n_head=h),
                       RelaxConfig(eps=0.1, t1=t1, t1max=t1)).to(device)
    bp = TransformerLM(TransformerShape(vocab_size=v, block_size=t, n_embd=c, n_head=h,
                                        n_layer=1)).to(device)
    if args.compile:
        eq.block = torch.compile(eq.block)  # type: ignore[assignment]
        bp = torch.compile(bp)  # type: ignore[assignment]
    opt_eq = torch.optim.AdamW(eq.parameters(), lr=1e-4)
    opt_bp = torch.optim.AdamW(bp.parameters(), lr=1e-4)
    ctl = JacregController()

    def eq_step(cfg: EPRule | BPTTRule) -> Callable[[], None]:
        def step() -> None:
            with amp:
                grads, _ = gradients(eq, idx, tgt, cfg, ctl)
            for n, p in eq.named_parameters():
                p.grad = grads[n]
            opt_eq.step()
        return step

    def bp_step() -> None:
        with amp:
            loss = F.cross_entropy(bp(idx).flatten(0, 1).float(), tgt.flatten())
        opt_bp.zero_grad(set_to_none=True)
        loss.backward()
        opt_bp.step()

    results = {"config": {"C": c, "H": h, "B": b, "T": t, "T1": t1, "T2": t2, "V": v,
                          "device": str(device), "compile": args.compile, "bf16": args.bf16,
                          "torch": torch.__version__},
               "steps": {}}
    for name, fn in [("ep_tracking_aep", eq_step(EPRule(nudge=NudgeConfig(t2=t2)))),
                     ("bptt", eq_step(BPTTRule())), ("bp", bp_step)]:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        results["steps"][name] = _time(fn, device, args.repeats)
    print(f"{'step':<18}{'ms/step':>12}{'peak MB':>12}   ({results['config']})")
    for name, r in results["steps"].items():
        print(f"{name:<18}{r['ms_per_step']:>12.1f}{r['peak_mb']:>12.1f}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2))
    print(f"-> {OUT}")


if __name__ == "__main__":
    main()
