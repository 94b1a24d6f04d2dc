"""Time one training step of EP (tracking-AEP), BPTT and the BP transformer: eager vs the fast
path (``models.eqt.fast``: CUDA graphs + torch.compile, optional bf16), side by side, with peak
memory and the fast path's gradient cosine to the eager fp32 gradient on the same batch.

Default: log 003's char-LM configuration (C=128, one block, B=64, T=256, T1=150, T2=20, V=65).
``ep_anderson`` is EP with ``nudge.accel: anderson`` at the same T2.
``--small`` is a CPU smoke run (the fast path then runs its functions eagerly, no graphs).

    python -m bench.ep_step [--small] [--repeats 5] [--out bench/results/ep_step.json]

Eager rows run in plain fp32 (PyTorch's default, no TF32 matmuls); the fast rows use TF32 (fp32
mode) or bf16 autocast (bf16 mode) where the estimator tolerates it (see ``models.eqt.fast``).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from models.config.eqt import BPTTRule, EPRule, FastConfig, NudgeConfig
from models.eqt.diagnostics import grad_cosines
from models.eqt.fast import FastEQ
from models.eqt.model import EqShape, EquilibriumLM
from models.eqt.relax import RelaxConfig
from models.eqt.stabilisers import JacregController
from models.eqt.step import gradients
from models.nets.transformer import TransformerLM, TransformerShape

OUT = Path("bench/results/ep_step.json")


def _peak_mb(device: torch.device, base: int) -> float:
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(step: Callable[[], None], device: torch.device, repeats: int,
          base: int = 0) -> dict[str, float]:
    """Median wall time of ``repeats`` steps after one warm-up (graph capture / compilation),
    and the peak memory of the step above ``base`` (what was allocated before the row built its
    model; graph pools included, they stay allocated)."""
    step()
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t)
    return {"ms_per_step": 1000 * sorted(times)[len(times) // 2],
            "peak_mb": _peak_mb(device, base)}


def _fresh(device: torch.device) -> int:
    """Free what earlier rows left (compiled functions hold their engines, engines their graph
    pools) so that each row's peak memory is its own."""
    gc.collect()
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="CPU smoke scale (C=32, B=4, T=32)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--breakdown", action="store_true",
                    help="also time the fast path's graphs one by one (CUDA)")
    ap.add_argument("--skip-eager-bptt", action="store_true",
                    help="skip the 28 GB eager BPTT row (cosines need it)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # eager = plain fp32; the fast path sets its own
    c, h, b, t, t1, t2, v = (32, 4, 4, 32, 20, 5, 65) if args.small else (128, 4, 64, 256, 150, 20,
                                                                            65)
    torch.manual_seed(0)
    idx = torch.randint(v, (b, t), device=device)
    tgt = torch.randint(v, (b, t), device=device)

    def eq_model(t1_steps: int) -> EquilibriumLM:
        torch.manual_seed(0)
        return EquilibriumLM(EqShape(vocab_size=v, block_size=t, n_embd=c, n_head=h),
                             RelaxConfig(eps=0.1, t1=t1_steps, t1max=t1_steps)).to(device)

    eq = eq_model(t1)
    ep_cfg = EPRule(nudge=NudgeConfig(t2=t2))
    # the same T2 with Anderson mixing (nudge.accel): its per-step cost (the gain is fewer steps
    # where an adaptive nudged phase runs long, which a fixed T2 at initialisation does not show)
    ep_aa_cfg = EPRule(nudge=NudgeConfig(t2=t2, accel="anderson"))
    bptt_cfg = BPTTRule()
    results: dict[str, Any] = {
        "config": {"C": c, "H": h, "B": b, "T": t, "T1": t1, "T2": t2, "V": v,
                   "device": torch.cuda.get_device_name(device) if device.type == "cuda"
                   else "cpu", "torch": torch.__version__, "ep": "tracking-AEP, beta 0.02, "
                   "per-token nudge, jacreg controller (lambda 0.1)"},
        "steps": {}, "cosine": {}}

    # ---- timings: gradient + AdamW step
    def eq_step(model: EquilibriumLM, cfg: EPRule | BPTTRule,
                fast: FastEQ | None) -> Callable[[], None]:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        ctl = JacregController()

        def step() -> None:
            if fast is None:
                grads, _ = gradients(model, idx, tgt, cfg, ctl)
            else:
                grads, _ = fast.gradients(idx, tgt, cfg, ctl)
            for n, p in model.named_parameters():
                p.grad = grads[n]
            opt.step()
        return step

    def bp_step(compiled: bool, bf16: bool) -> Callable[[], None]:
        torch.manual_seed(0)
        bp = TransformerLM(TransformerShape(vocab_size=v, block_size=t, n_embd=c, n_head=h,
                                            n_layer=1)).to(device)
        fwd = torch.compile(bp) if compiled and device.type == "cuda" else bp
        opt = torch.optim.AdamW(bp.parameters(), lr=1e-5)
        amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16
                             and device.type == "cuda")

        def step() -> None:
            with amp:
                loss = F.cross_entropy(fwd(idx).flatten(0, 1).float(), tgt.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    modes = {"eager": None, "fast": FastConfig(), "fast_bf16": FastConfig(bf16=True)}
    # BPTT's backward step: autograd through sdpa (the default) vs the closed form
    closed = {"fast_closed": FastConfig(bptt_attention="closed"),
              "fast_closed_bf16": FastConfig(bf16=True, bptt_attention="closed")}
    rules = (("ep_tracking_aep", ep_cfg), ("ep_anderson", ep_aa_cfg), ("bptt", bptt_cfg))
    for rule, cfg in rules:
        row: dict[str, Any] = {}
        for mode, fcfg in {**modes, **(closed if rule == "bptt" else {})}.items():
            if rule == "bptt" and mode == "eager" and args.skip_eager_bptt:
                continue
            base = _fresh(device)
            model = eq_model(t1)
            fast = None if fcfg is None else FastEQ(model, fcfg)
            row[mode] = _time(eq_step(model, cfg, fast), device, args.repeats, base)
            del model, fast
        results["steps"][rule] = row
    bp_row = {}
    for mode, (compiled, bf16) in {"eager": (False, False), "fast": (True, False),
                                   "fast_bf16": (True, True)}.items():
        base = _fresh(device)
        torch.backends.cuda.matmul.allow_tf32 = mode != "eager"
        bp_row[mode] = _time(bp_step(compiled, bf16), device, args.repeats, base)
    torch.backends.cuda.matmul.allow_tf32 = False
    results["steps"]["bp"] = bp_row

    # ---- EP peak memory must be flat in T1 (no per-step storage)
    flat = {}
    for steps in (t1, 2 * t1):
        base = _fresh(device)
        model = eq_model(steps)
        flat[f"T1={steps}"] = _time(eq_step(model, ep_cfg, FastEQ(model, FastConfig())), device,
                                    max(2, args.repeats // 2), base)
        del model
    results["ep_fast_t1_scaling"] = flat

    # ---- gradient agreement on one batch and state (before any optimizer step)
    def grads_of(fn: Callable[[], tuple[dict[str, torch.Tensor], Any]],
                 ) -> dict[str, torch.Tensor]:
        torch.manual_seed(1)
        g, _ = fn()
        return {n: x.detach().clone() for n, x in g.items()}

    engines = {name: FastEQ(eq, fcfg) for name, fcfg in {**modes, **closed}.items()
               if fcfg is not None}
    for rule, cfg in rules:
        if rule == "bptt" and args.skip_eager_bptt:
            continue
        _fresh(device)
        ref = grads_of(lambda cfg=cfg: gradients(eq, idx, tgt, cfg, JacregController()))
        for name, eng in engines.items():
            if rule != "bptt" and name in closed:
                continue
            g = grads_of(lambda eng=eng, cfg=cfg: eng.gradients(idx, tgt, cfg, JacregController()))
            results["cosine"][f"{rule}/{name}"] = grad_cosines(g, ref)
        del ref
    del engines

    if args.breakdown and device.type == "cuda":
        results["breakdown_ms"] = {
            mode: _breakdown(eq_model(t1), idx, tgt, ep_cfg, bptt_cfg, FastConfig(bf16=bf16))
            for mode, bf16 in (("fast", False), ("fast_bf16", True))}
    _report(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"-> {args.out}")


def _breakdown(model: EquilibriumLM, idx: torch.Tensor, tgt: torch.Tensor, ep_cfg: EPRule,
               bptt_cfg: BPTTRule, fcfg: FastConfig) -> dict[str, float]:
    """Median ms of each captured graph of the fast path, replayed alone."""
    _fresh(idx.device)
    eng = FastEQ(model, fcfg)
    eng.gradients(idx, tgt, ep_cfg, JacregController())
    eng.gradients(idx, tgt, bptt_cfg, JacregController())
    shape = tuple(idx.shape)
    graphs = {"free_t1": eng._free_graphs(shape, False)[0],
              "nudge+contrast": eng._ep_graph(shape, ep_cfg.nudge),
              "stabilisers": eng._stab_graph(shape, True, 0.0), "bptt": eng._bptt_graph(shape)}
    for variant in (FastConfig(bf16=fcfg.bf16, bptt_attention="materialized"),
                    FastConfig(bf16=fcfg.bf16, nudge="lockstep")):
        other = FastEQ(model, variant)
        other.gradients(idx, tgt, ep_cfg, JacregController())
        if variant.nudge == "lockstep":
            graphs["nudge+contrast (lockstep)"] = other._ep_graph(shape, ep_cfg.nudge)
        else:
            other.gradients(idx, tgt, bptt_cfg, JacregController())
            graphs["bptt (materialized attention)"] = other._bptt_graph(shape)
    out = {}
    for name, g in graphs.items():
        times = []
        for _ in range(7):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        out[name] = sorted(times)[len(times) // 2]
    return out


def _report(results: dict[str, Any]) -> None:
    print(f"config: {results['config']}")
    head = (f"{'step':<16}{'eager ms':>10}{'fast ms':>10}{'x':>7}{'bf16 ms':>10}{'x':>7}"
            f"{'eager MB':>10}{'fast MB':>10}{'bf16 MB':>10}")
    print(head)
    for name, row in results["steps"].items():
        e = row.get("eager", {"ms_per_step": float("nan"), "peak_mb": float("nan")})
        f, bf = row["fast"], row["fast_bf16"]
        print(f"{name:<16}{e['ms_per_step']:>10.1f}{f['ms_per_step']:>10.1f}"
              f"{e['ms_per_step'] / f['ms_per_step']:>7.1f}{bf['ms_per_step']:>10.1f}"
              f"{e['ms_per_step'] / bf['ms_per_step']:>7.1f}{e['peak_mb']:>10.0f}"
              f"{f['peak_mb']:>10.0f}{bf['peak_mb']:>10.0f}")
    for name, row in results["steps"].items():
        for mode in (m for m in row if m.startswith("fast_closed")):
            e = row.get("eager", {"ms_per_step": float("nan")})
            print(f"{name + ' ' + mode[5:]:<16}{e['ms_per_step']:>10.1f}"
                  f"{row[mode]['ms_per_step']:>10.1f}"
                  f"{e['ms_per_step'] / row[mode]['ms_per_step']:>7.1f}"
                  f"{'':>17}{row[mode]['peak_mb']:>20.0f}")
    fl = results["ep_fast_t1_scaling"]
    vals = list(fl.values())
    print("EP fast peak MB vs T1: " + ", ".join(f"{k}: {r['peak_mb']:.0f}" for k, r in fl.items())
          + f" (ratio {vals[1]['peak_mb'] / vals[0]['peak_mb']:.3f}); ms: "
          + ", ".join(f"{k}: {r['ms_per_step']:.1f}" for k, r in fl.items()))
    for mode, parts in results.get("breakdown_ms", {}).items():
        print(f"{mode} graphs (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()))
    print("gradient vs eager fp32 (same batch/state): min group cos, global cos, norm ratio")
    for name, cos in results["cosine"].items():
        groups = {k: v for k, v in cos.items() if k.startswith("cos/") and k != "cos/global"}
        worst = min(groups, key=groups.get)
        print(f"  {name:<28} min {groups[worst]:.5f} ({worst[4:]})  global "
              f"{cos['cos/global']:.5f}  k {cos['norm_ratio']:.4f}")


if __name__ == "__main__":
    main()
