"""The fast EP/BPTT step (``models.eqt.fast``) against the eager rules, and the fp32 nudge fix.

CPU tests run the fast path's functions eagerly (no graphs, no compile) in float64, where they
must agree with ``models.eqt.step.gradients`` to rounding; the CUDA test checks the graphed,
compiled path against the eager fp32 path at the tolerances of the GPU-speed issue.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import jvp, vjp

from models.config.eqt import BPTTRule, EPRule, FastConfig, NudgeConfig, StabiliserConfig
from models.eqt.diagnostics import cosine, grad_cosines
from models.eqt.ep import ep_gradients
from models.eqt.fast import FastEQ
from models.eqt.implicit import ImplicitConfig, implicit_gradients
from models.eqt.model import EqShape, EquilibriumLM
from models.eqt.relax import RelaxConfig
from models.eqt.stabilisers import JacregController
from models.eqt.step import gradients
from models.eqt.thick_ops import ThickOps

pytestmark = pytest.mark.usefixtures("one_thread")


def make(seed: int, qk_norm: bool = False, dtype: torch.dtype = torch.float64,
         relax_cfg: RelaxConfig | None = None, b: int = 2, t: int = 6, c: int = 8,
         emb_std: float = 1.0, device: str = "cpu",
         ) -> tuple[EquilibriumLM, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    relax_cfg = relax_cfg or RelaxConfig(eps=0.2, t1=60, t1max=400, res_target=1e-10, chunk=7)
    model = EquilibriumLM(EqShape(11, t, n_embd=c, n_head=2, qk_norm=qk_norm, init_std=0.3,
                                  emb_std=emb_std), relax_cfg).to(device=device, dtype=dtype)
    with torch.no_grad():  # non-trivial LN affines so their Jacobian terms are exercised
        for name, p in model.named_parameters():
            if "ln" in name or "_norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model, torch.randint(0, 11, (b, t), device=device), torch.randint(0, 11, (b, t),
                                                                             device=device)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_closed_form_jvp_vjp_match_torch_func(qk_norm: bool) -> None:
    model, idx, _ = make(0, qk_norm)
    ops = ThickOps(model.block)  # type: ignore[arg-type]
    z = model.free_phase(idx).z
    v, u = torch.randn_like(z), torch.randn_like(z)
    _, jv_ref = jvp(model.block.interaction, (z,), (v,))
    _, pull = vjp(model.block.interaction, z)
    torch.testing.assert_close(ops.interaction(z), model.block.interaction(z))
    torch.testing.assert_close(ops.jvp(z, v), jv_ref)
    torch.testing.assert_close(ops.vjp(z, u), pull(u)[0])
    torch.testing.assert_close(ops.antisym(z, v), jv_ref - pull(v)[0])


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-7, atol=1e-12, msg=n)


@pytest.mark.parametrize("aep", ["tracking", "none", "fixed"])
def test_fast_ep_matches_eager(aep: str) -> None:
    model, idx, tgt = make(1, qk_norm=aep == "tracking")
    cfg = EPRule(nudge=NudgeConfig(beta=1e-3, t2=12, aep=aep,  # type: ignore[arg-type]
                                   adaptive_t2=aep == "none", t2_max=16, snapshot_every=4),
                 stab=StabiliserConfig(resreg=0.3))
    fast = FastEQ(model, FastConfig(graphs=False, compile=False, nudge="lockstep"))
    torch.manual_seed(5)
    g_ref, s_ref = gradients(model, idx, tgt, cfg, JacregController(lam=0.7))
    torch.manual_seed(5)
    g, s = fast.gradients(idx, tgt, cfg, JacregController(lam=0.7))
    _close(g, g_ref)
    for key in ("loss", "residual", "settle_iters", "t2", "a_norm", "term/jacreg", "term/resreg",
                "lambda", "gate_skipped", "grad/global"):
        assert s[key] == pytest.approx(s_ref[key], rel=1e-7, abs=1e-15), key


@pytest.mark.parametrize("adaptive", [False, True])
def test_differential_nudge_is_the_lockstep_estimator_to_beta_squared(adaptive: bool) -> None:
    """Tracking-AEP in common/differential mode (the fast path's default) against the eager
    lockstep phases: the gap is the centered estimator's own O(beta^2) and shrinks ~4x per
    halving of beta."""
    model, idx, tgt = make(6, qk_norm=True)
    fast = FastEQ(model, FastConfig(graphs=False, compile=False))
    gaps = []
    for beta in (0.02, 0.01):
        cfg = NudgeConfig(beta=beta, t2=15, adaptive_t2=adaptive, t2_max=24, snapshot_every=4)
        g_ref, s_ref = ep_gradients(model, idx, tgt, cfg)
        g, s = fast.gradients(idx, tgt, EPRule(nudge=cfg))
        if adaptive:
            assert s["t2"] == s_ref["t2"]
        num = sum((g[n] - g_ref[n]).pow(2).sum() for n in g)
        gaps.append(float(num.sqrt() / sum(x.pow(2).sum() for x in g_ref.values()).sqrt()))
    assert gaps[0] < 1e-3, gaps
    assert 3.0 < gaps[0] / gaps[1] < 5.0, gaps


@pytest.mark.parametrize("nudge", ["lockstep", "differential"])
def test_fast_t2_continuation_matches_eager(nudge: str) -> None:
    """The chunked nudged continuation (``t2_tol``) on the fast path: same snapshot, same
    iterations and increments as the eager loop (lockstep exactly; differential to O(beta^2))."""
    model, idx, tgt = make(7, qk_norm=True)
    cfg = NudgeConfig(beta=1e-3, aep="tracking", adaptive_t2=True, t2_max=8, snapshot_every=4,
                      t2_tol=1e-5, t2_cap=208)
    free = model.free_phase(idx)
    g_ref, s_ref = ep_gradients(model, idx, tgt, cfg, free)
    fast = FastEQ(model, FastConfig(graphs=False, compile=False, nudge=nudge))  # type: ignore[arg-type]
    g, s = fast.gradients(idx, tgt, EPRule(nudge=cfg, stab=StabiliserConfig(controller=False)))
    assert s_ref["settle/nudged/iters"] > 8  # the continuation ran
    for key in ("t2", "settle/nudged/iters", "settle/nudged/tol", "settle/nudged/cap"):
        assert s[key] == s_ref[key], key
    if nudge == "lockstep":
        _close(g, g_ref)
        for key in ("a_increment", "settle/nudged/residual", "a_norm", "a_tail_head"):
            assert s[key] == pytest.approx(s_ref[key], rel=1e-7), key
    else:
        assert cosine(g, g_ref) > 1 - 1e-6


def test_fast_free_phase_continues_like_relax() -> None:
    model, idx, _ = make(2)
    ref = model.free_phase(idx)
    out = FastEQ(model, FastConfig(graphs=False, compile=False)).free_phase(idx, keep_trace=True)
    assert out.steps == ref.steps > model.relax_cfg.t1  # the chunked continuation ran
    torch.testing.assert_close(out.z, ref.z)
    torch.testing.assert_close(out.z_t1, ref.z_t1)
    assert out.trace == pytest.approx(ref.trace, rel=1e-9)
    assert out.residual == pytest.approx(ref.residual, rel=1e-9)


def test_fast_gate_skips_the_task_gradient() -> None:
    model, idx, tgt = make(3, relax_cfg=RelaxConfig(eps=0.2, t1=3, t1max=3))
    cfg = EPRule(nudge=NudgeConfig(beta=1e-3, t2=5),
                 stab=StabiliserConfig(gate=1e-9, jacreg=0.5, controller=False))
    fast = FastEQ(model, FastConfig(graphs=False, compile=False))
    torch.manual_seed(0)
    g_ref, s_ref = gradients(model, idx, tgt, cfg)
    torch.manual_seed(0)
    g, s = fast.gradients(idx, tgt, cfg)
    assert s["gate_skipped"] == s_ref["gate_skipped"] == 1.0
    _close(g, g_ref)


@pytest.mark.parametrize("gate", [1e-300, 1e300])
def test_fast_adjoint_gate_matches_eager(gate: float) -> None:
    """``stab.adjoint_gate`` on the fast path: the same decision from the same logged remaining
    change, and the same step (stabilisers only when shut, the full step when open)."""
    model, idx, tgt = make(8, qk_norm=True)
    cfg = EPRule(nudge=NudgeConfig(beta=1e-3, adaptive_t2=True, t2_max=8, snapshot_every=4,
                                   t2_tol=1e-2, t2_cap=28),
                 stab=StabiliserConfig(controller=False, jacreg=0.5, adjoint_gate=gate))
    fast = FastEQ(model, FastConfig(graphs=False, compile=False, nudge="lockstep"))
    torch.manual_seed(0)
    g_ref, s_ref = gradients(model, idx, tgt, cfg)
    torch.manual_seed(0)
    g, s = fast.gradients(idx, tgt, cfg)
    assert s["gate_adjoint"] == s_ref["gate_adjoint"] == float(gate < 1)
    assert s["settle/nudged/residual"] == pytest.approx(s_ref["settle/nudged/residual"], rel=1e-7)
    _close(g, g_ref)
    assert (float(g["head.weight"].abs().sum()) == 0) == (gate < 1)


@pytest.mark.parametrize("attention", ["sdpa", "materialized", "closed"])
def test_fast_bptt_is_the_exact_unroll_gradient(attention: str) -> None:
    model, idx, tgt = make(4, qk_norm=True, relax_cfg=RelaxConfig(eps=0.2, t1=25, t1max=25))
    fast = FastEQ(model, FastConfig(graphs=False, compile=False,
                                    bptt_attention=attention))  # type: ignore[arg-type]
    cfg = BPTTRule()
    g_ref, s_ref = gradients(model, idx, tgt, cfg)
    g, s = fast.gradients(idx, tgt, cfg)
    _close(g, g_ref)
    assert s["loss"] == pytest.approx(s_ref["loss"], rel=1e-10)
    assert s["residual"] == pytest.approx(s_ref["residual"], rel=1e-8)


@pytest.mark.parametrize("segment", [1, 7, 64])
def test_fast_bptt_reference_is_the_long_unroll_gradient(segment: int) -> None:
    """The cosine checkpoints' long-unroll reference with segment checkpointing (every
    ``segment``-th state kept, the rest recomputed) is BPTT through the same number of steps."""
    from models.eqt.bptt import bptt_gradients

    model, idx, tgt = make(4, qk_norm=True, relax_cfg=RelaxConfig(eps=0.2, t1=10, t1max=10))
    fast = FastEQ(model, FastConfig(graphs=False, compile=False))
    g_ref, s_ref, _ = bptt_gradients(model, idx, tgt, steps=45)
    g, res = fast.bptt_reference(idx, tgt, 45, segment=segment)
    _close(g, g_ref)
    assert res == pytest.approx(s_ref["residual"], rel=1e-8)


def test_per_token_nudge_keeps_fp32_attention_gradients() -> None:
    """The EP failure at scale, pinned on a tiny block: with beta on the *mean* loss over B*T
    tokens, the nudge moves z by ~beta |dl/dz| ~ 1e-7..1e-6 per element, a few ulps of an fp32
    state of norm ~10, so the contrast (z- - z+)/2beta is rounding noise and the attention
    gradient loses its direction; nudging every token's own loss (``nudge_scale="token"``)
    moves z ~B*T times more and restores it. Reference: the implicit gradient in float64.
    Here |z*| ~ 20 (emb_std 30; the failing GPU run had |z*| 29 -> 224) and the head has the
    model's init scale (0.02)."""
    relax_cfg = RelaxConfig(eps=0.1, t1=150, t1max=1500, res_target=1e-7)
    model, idx, tgt = make(0, dtype=torch.float32, relax_cfg=relax_cfg, b=16, t=32, c=16,
                           emb_std=30.0)
    torch.nn.init.normal_(model.head.weight, std=0.02)
    ref = EquilibriumLM(model.shape, RelaxConfig(eps=0.1, t1=150, t1max=3000,
                                                 res_target=1e-12)).double()
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    g_imp, _ = implicit_gradients(ref, idx, tgt, ImplicitConfig(tol=1e-9))
    attn = [n for n in g_imp if ".attn." in n]
    cos = {}
    for scale in ("mean", "token"):
        g, _ = ep_gradients(model, idx, tgt, NudgeConfig(beta=0.02, t2=60, nudge_scale=scale))
        cos[scale] = cosine(g, g_imp, attn)
    assert cos["token"] >= 0.99, cos
    assert cos["mean"] < 0.9, cos


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bf16", [False, True])
def test_fast_path_matches_eager_fp32_on_cuda(bf16: bool, no_tf32: None) -> None:
    relax_cfg = RelaxConfig(eps=0.1, t1=150, t1max=300, res_target=1e-4)
    model, idx, tgt = make(0, dtype=torch.float32, relax_cfg=relax_cfg, b=8, t=64, c=64,
                           device="cuda")
    ep = EPRule(stab=StabiliserConfig(jacreg=0.1, controller=False))
    for cfg, backward in ((ep, "sdpa"), (BPTTRule(), "sdpa"), (BPTTRule(), "closed")):
        torch.manual_seed(0)
        g_ref, _ = gradients(model, idx, tgt, cfg)
        fast = FastEQ(model, FastConfig(bf16=bf16, bptt_attention=backward))  # type: ignore[arg-type]
        torch.manual_seed(0)
        g, _ = fast.gradients(idx, tgt, cfg)
        cos = grad_cosines({n: x.clone() for n, x in g.items()}, g_ref)
        floor = 0.99 if bf16 else 0.999
        groups = {k: v for k, v in cos.items() if k.startswith("cos/")}
        assert min(groups.values()) >= floor, (type(cfg).__name__, cos)
        assert abs(cos["norm_ratio"] - 1) <= 0.02, (type(cfg).__name__, cos)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_bptt_and_long_reference_on_cuda(no_tf32: None) -> None:
    """The captured T1 graph and the uncaptured long-unroll reference at T1 steps are the same
    gradient on the GPU (the reference's segments recompute what the graph stores)."""
    relax_cfg = RelaxConfig(eps=0.1, t1=150, t1max=300, res_target=1e-4)
    model, idx, tgt = make(0, dtype=torch.float32, relax_cfg=relax_cfg, b=8, t=64, c=64,
                           device="cuda")
    fast = FastEQ(model, FastConfig(tf32=False))
    for _ in range(2):
        g, _ = fast.gradients(idx, tgt, BPTTRule())
    g = {n: x.clone() for n, x in g.items()}
    g_long, _ = fast.bptt_reference(idx, tgt, 150)
    assert cosine(g, g_long) >= 0.99999


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_t2_continuation_on_cuda(no_tf32: None) -> None:
    """The continuation's three graphs (head, chunk, gradient) replayed against the same
    functions run without graphs: same chunks, same snapshot, the same gradient."""
    relax_cfg = RelaxConfig(eps=0.1, t1=150, t1max=300, res_target=1e-4)
    model, idx, tgt = make(0, dtype=torch.float32, relax_cfg=relax_cfg, b=8, t=64, c=64,
                           device="cuda")
    cfg = EPRule(nudge=NudgeConfig(adaptive_t2=True, t2_max=8, t2_tol=1e-3, t2_cap=208),
                 stab=StabiliserConfig(jacreg=0.1, controller=False))
    out = {}
    for graphs in (False, True):
        fast = FastEQ(model, FastConfig(graphs=graphs, tf32=False))
        for _ in range(2):  # a second replay reuses the captured graphs
            g, s = fast.gradients(idx, tgt, cfg)
        out[graphs] = ({n: x.clone() for n, x in g.items()}, s)
    (g0, s0), (g1, s1) = out[False], out[True]
    assert s0["settle/nudged/iters"] > 8, s0
    for key in ("t2", "settle/nudged/iters"):
        assert s1[key] == s0[key], (key, s0, s1)
    assert cosine(g1, g0) >= 0.9999


def test_jacreg_gradient_matches_finite_differences_with_qk_norm() -> None:
    """jacreg's theta-gradient through LN(q(theta)) (qk-norm) against central differences."""
    from models.eqt.stabilisers import jacobian_penalty

    model, idx, _ = make(1, qk_norm=True)
    z = model.free_phase(idx).z
    w = model.block.attn.q.weight

    def pen() -> torch.Tensor:
        torch.manual_seed(3)
        return jacobian_penalty(model, z)

    g = torch.autograd.grad(pen(), w)[0]
    h = 1e-6
    with torch.no_grad():
        for i, j in ((0, 1), (3, 5), (7, 2)):
            w[i, j] += h
            up = pen()
            w[i, j] -= 2 * h
            down = pen()
            w[i, j] += h
            assert float(g[i, j]) == pytest.approx(float((up - down) / (2 * h)), rel=1e-5)


@pytest.mark.parametrize("rule", ["ep", "bptt"])
def test_what_the_fast_path_returns_is_safe_to_keep(rule: str) -> None:
    """A later call rewrites the engine's static buffers; the gradients and states it returned
    before must not change with them (no views of those buffers)."""
    model, idx, tgt = make(2)
    cfg = (EPRule(nudge=NudgeConfig(beta=1e-3, t2=8), stab=StabiliserConfig(controller=False))
           if rule == "ep" else BPTTRule(stab=StabiliserConfig(controller=False)))
    fast = FastEQ(model, FastConfig(graphs=False, compile=False))
    g1, _ = fast.gradients(idx, tgt, cfg)
    free1 = fast.free_phase(idx)
    kept = ({n: t.clone() for n, t in g1.items()}, free1.z.clone(), free1.z_t1.clone())
    idx2, tgt2 = torch.randint(0, 11, idx.shape), torch.randint(0, 11, tgt.shape)
    g2, _ = fast.gradients(idx2, tgt2, cfg)
    fast.free_phase(idx2)
    assert any(not torch.equal(g1[n], g2[n]) for n in g1)  # the second call did differ
    for n in g1:
        assert torch.equal(g1[n], kept[0][n]), n
    assert torch.equal(free1.z, kept[1]) and torch.equal(free1.z_t1, kept[2])
