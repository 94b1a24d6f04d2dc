"""Equilibrium propagation in force form, with the AEP correction, holomorphic nudging and
adaptive T2 (METHODS §2; log 003 §aep, §holo, §tracking, §stab).

Nudged dynamics, started at z* for every nudge strength beta_k:

    z <- z + eps (F(z) - beta_k dl/dz(z) - corr(z)),   corr(z) = J v - J^T v,

with J = dF_nc/dz at z* (``aep="fixed"``, v = z - z*) or at the common mode
z_bar = mean_k z_k of all phases run in lockstep (``aep="tracking"``, v = z - z_bar). Contrast

    a = -Re[(1 / (N r)) sum_k exp(-i phi_k) (z_k - z*)],   beta_k = r exp(i phi_k),

which for N = 2 (beta = +r, -r) is the centered a = (z_{-beta} - z_{+beta}) / (2 beta), an
estimate of the adjoint -J^{-T} dl/dz. The parameter gradient is one autograd call at the fixed
point, g = d/dtheta [<a, F(z*; theta)> + l(z*; theta)] with a and z* detached: the embeddings
are terms of F (through the clamp), the head is a term of l.

What went wrong at log 003's scale, and the fix (GPU-scale issue; measurements in
reports/gpu-short/README.md and tests/test_eqt_fast.py):

- The nudge was beta times the gradient of the *batch-mean* loss. Per state element that is
  beta (p - y) W_h / (B T): with B T = 16,384 tokens and the head at its init scale (0.02) about
  1e-7..1e-6, so z+ and z- differ by a few ulps of an fp32 state of norm ~1 and by less than one
  ulp once |z*| grows (ulp(30) = 2e-6, ulp(224) = 1.5e-5). The contrast (z- - z+)/2beta is then
  rounding noise; the head's gradient (a term of l, not of a) stays right, so the global cosine
  still reads ~1 while the attention groups lose their direction. A float64 run of the same
  estimator matches the implicit gradient at cos 1.0; in fp32 at |z*| ~ 20 the attention-group
  cosine falls to 0.71 (pinned by ``test_per_token_nudge_keeps_fp32_attention_gradients``).
- Without a usable correction the estimator degenerates towards EP without AEP, and that row
  shows the reported signature on its own: in the 2k-step GPU protocol ``ep_noaep`` has
  attention q/k cosines to BPTT of -0.4..0.8 while |z*| runs from 1 to 218 with gradient norms
  ~100 and a "converged" residual; AEP is what keeps the attention gradient (and |z*|) sane.
- Fix: ``nudge_scale="token"`` (default) nudges every token's own loss with beta, i.e. the
  summed loss, and divides the contrast by B T: the same estimator of the same mean-loss
  gradient, with a per-element displacement ~B T times larger and independent of the batch
  shape. beta then has log 003's meaning of a per-token nudge (the holomorphic radius likewise).
- Two more parts of the recipe mattered at this scale. T2 = 20 steps (2 time units at eps 0.1)
  truncates the adjoint once training slows the contraction: with the per-token nudge and a
  controller on the final residual the cosine to BPTT fell to 0.70 (norm ratio 0.45) by step
  1000 while |z*| stayed ~1.3. The GPU profiles use log 003's adaptive T2 (``adaptive_t2``; its
  --t2sel 60 still truncated the adjoint at 2 of 8 checkpoints, cos 0.89 / 0.92, so t2_max is
  100: cos >= 0.979 global and >= 0.913 per attention group at every checkpoint of the 2k-step
  protocol) and a controller on the T1 residual (``StabiliserConfig.control = "t1"``: what
  BPTT's unroll and evaluation see).
- A fixed horizon still fails where the controller lags. In the protocol re-run at 3860d15, at
  step 500 lambda was still at its floor while the T1 residual had risen past target (2.3e-4;
  the free phase needed 240 steps, i.e. a contraction of ~0.99 per step); the nudged phase moved
  5% per snapshot at its best snapshot, the smallest-increment rule took T2 = 40, and the
  cosine to BPTT fell to 0.89 (attn.v 0.52, norm ratio 0.71). ``t2_tol`` makes the horizon
  adaptive like the free phase's: past t2_max the phases continue in chunks until the relative
  increment is under t2_tol (or t2_cap); the snapshot rule is unchanged, over the longer run.
  With it the step-500 checkpoint passes in two re-runs, but one checkpoint per run still
  fails where contraction is slow, and there the T1-step BPTT reference is itself off: at
  144836f's step 750, cos(BPTT, implicit) = 0.845 while cos(EP, implicit) = 0.992 (attention
  min 0.852). Training-time checkpoints therefore also log ``cos_implicit/*`` and
  ``cos_bptt_implicit`` (reports/gpu-short/README.md).
- The last increment is the wrong stopping signal at slow contraction: at 0.99 per step a
  snapshot 4 steps apart moves 4% of the remaining error, so 144836f's step 750 stopped on a
  0.33% increment with ~8% of a still to come. ``t2_tol`` now bounds ``remaining_change``, the
  geometric tail of the increments. The reference of the cosine checkpoints is BPTT through an
  unroll converged in both passes (``models.eqt.bptt.reference_steps``), the T1 unroll being
  logged as ``cos_t1/*``. The protocol re-run with both (e0f532b) still missed the bar at 4 of 8
  checkpoints: the run sat in a regime where the nudged phase needed ~430 steps while lambda was
  at its floor for 68% of the steps (the T1 residual under target), and the damped implicit
  adjoint did not converge in 3,000 iterations at any checkpoint (BiCGSTAB now solves it). What
  the forward residual cannot see is the adjoint's contraction: x_in starts the free phase with
  little weight on the slow modes that dl/dz excites. ``StabiliserConfig.adjoint_target`` lets
  the controller follow the nudged phase's tail too; a 400-step probe with it (2b9d7c7) kept the
  nudge at ~100 steps and every checkpoint at cos >= 0.99999 to the converged reference (the
  full protocol with it is still to be run; reports/gpu-short/README.md).
- Also found: jacreg's theta-gradient through ``torch.func.jvp`` is wrong when LN inputs depend
  on theta (qk-norm); jacreg now uses the closed-form J v (``models.eqt.stabilisers``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from models.config.eqt import NudgeConfig
from models.eqt import equations as eq
from models.eqt.anderson import Anderson
from models.eqt.relax import RelaxResult

if TYPE_CHECKING:
    from models.eqt.model import EquilibriumLM


def nudge_points(cfg: NudgeConfig, dtype: torch.dtype, device: torch.device,
                 ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(beta_k, exp(-i phi_k), r); real tensors when every beta_k is real (N <= 2)."""
    n, r = (cfg.holomorphic_n, cfg.holomorphic_r) if cfg.holomorphic_n else (2, cfg.beta)
    phi = 2 * math.pi * torch.arange(n, dtype=torch.float64) / n
    if n <= 2:
        sign = torch.cos(phi).round()
        return (r * sign).to(dtype=dtype, device=device), sign.to(dtype=dtype, device=device), r
    cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    unit = torch.polar(torch.ones_like(phi), phi)
    return (r * unit).to(dtype=cdtype, device=device), unit.conj().to(cdtype).to(device), r


def contrast_gradients(model: EquilibriumLM, idx: torch.Tensor, targets: torch.Tensor,
                       z_star: torch.Tensor, a: torch.Tensor) -> dict[str, torch.Tensor]:
    """d/dtheta [<a, F(z*; theta)> + l(z*; theta)], one autograd call, z* and a detached."""
    z_star, a = z_star.detach(), a.detach()
    with torch.enable_grad():
        s = eq.contrast_objective(a, model.force(z_star, model.x_in(idx)),
                                  model.ce(z_star, targets))
        names, params = zip(*model.named_parameters(), strict=True)
        gs = torch.autograd.grad(s, params, allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g
            for n, p, g in zip(names, params, gs, strict=True)}


Fn = Callable[[torch.Tensor], torch.Tensor]

# Cap on the per-snapshot contraction estimate of ``remaining_change`` (a tail factor of at most
# 49): where increments stop shrinking (noise, or a transient) the tail is still finite.
RHO_MAX = 0.98


def remaining_change(rel_inc: float, rho: float) -> float:
    """Estimated distance of the nudged contrast from its limit, relative to |a|: the geometric
    tail rel_inc * rho / (1 - rho) of increments shrinking by rho per snapshot (rho: the running
    mean of successive increment ratios; < 0 = not measured yet, the tail is then unknown).

    The last increment alone understates it when contraction is slow: at 0.99 per step a
    snapshot 4 steps apart moves 4% of the remaining error, so |a_t - a_{t-4}| / |a_t| = 0.3%
    leaves ~8% of a to come (reports/gpu-short 144836f, step 750: attn.q cos 0.85 to the
    implicit gradient with the nudged phase stopped on a 0.33% increment).
    """
    if rho < 0:
        return math.inf
    r = min(rho, RHO_MAX)
    return float(eq.geometric_tail(rel_inc, r))



def _antisym(fn: Fn, at: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(J - J^T) v of ``fn`` at ``at`` (real), matrix-free, from one forward graph: J^T v is its
    vjp, and J v the vjp of the linear map u -> J^T u (the double-vjp identity
    J v = d/du <J^T u, v>). On the CPU this is ~1.5x faster than ``torch.func.jvp`` + ``vjp``
    (forward-mode AD through Python decompositions, and two forward passes; bench: the default's
    shape, 12.9 vs 20.1 ms), and equal to it to rounding (tests/test_eqt_gradients.py)."""
    with torch.enable_grad():
        a = at.detach().requires_grad_(True)
        out = fn(a)
        u = torch.zeros_like(out, requires_grad=True)
        (jt_u,) = torch.autograd.grad(out, a, u, create_graph=True)
        (jv,) = torch.autograd.grad(jt_u, u, v, retain_graph=True)
        (jt_v,) = torch.autograd.grad(out, a, v)
    return (jv - jt_v).detach()


def _correction(fn: Fn, at: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(J - J^T) v for a real or complex v; J is real, so it acts on Re v and Im v separately."""
    if not v.is_complex():
        return _antisym(fn, at, v)
    both = _antisym(fn, torch.cat([at, at]), torch.cat([v.real, v.imag]))
    re, im = both.chunk(2)
    return torch.complex(re, im)


@torch.no_grad()
def nudged_contrast(model: EquilibriumLM, idx: torch.Tensor, targets: torch.Tensor,
                    z_star: torch.Tensor, cfg: NudgeConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Run all nudged phases in lockstep from z* and return the contrast a and stats."""
    betas, weights, r = nudge_points(cfg, z_star.dtype, z_star.device)
    k = betas.numel()
    holo = betas.is_complex()
    if holo and not hasattr(model.block, "forward_complex"):
        raise ValueError("holomorphic EP needs a block with forward_complex (the thick block); "
                         "use holomorphic_n <= 2 for this block")
    eps = model.relax_cfg.eps
    x_in = model.x_in(idx).repeat(k, 1, 1)
    tgt = targets.repeat(k, 1)
    force = model.block.forward_complex if holo else model.block
    beta_b = betas.repeat_interleave(z_star.shape[0]).view(-1, 1, 1)
    star_k = z_star.repeat(k, 1, 1)
    z = star_k.to(betas.dtype)
    interaction = model.block.interaction
    # ce_grad_z averages over the rows it is given; each phase must see l of its own B rows.
    # "token": beta nudges every token's own loss (the sum), see the module docstring.
    per_token = float(targets.numel()) if cfg.nudge_scale == "token" else 1.0
    scale = float(k) * per_token
    steps = cfg.t2_steps
    cap = cfg.t2_cap if cfg.t2_tol is not None else steps
    best_a, best_inc, best_t, prev_a = None, math.inf, steps, None
    remaining, t, prev_step, rho, tail_head = math.inf, 0, math.inf, -1.0, math.inf
    mixer = Anderson(z, cfg.accel_m) if cfg.accel == "anderson" else None
    while t < cap:
        t += 1
        f = eq.nudged_force(force(z, x_in), model.ce_grad_z(z, tgt), beta_b, scale)
        if cfg.aep == "fixed":
            f = f - _correction(interaction, star_k, z - star_k)
        elif cfg.aep == "tracking" and k == 2 and not holo:
            # two real phases: z_+ - zbar = -(z_- - zbar) = d, and (J - J^T) is linear, so one
            # (J - J^T) v at zbar on B rows gives both phases' corrections (+c, -c)
            zbar, d = eq.two_phase_split(z)
            f = eq.minus_pm(f, _correction(interaction, zbar, d))
        elif cfg.aep == "tracking":
            zbar = z.unflatten(0, (k, -1)).mean(0)
            zbar = (zbar.real if holo else zbar).repeat(k, 1, 1)
            f = f - _correction(interaction, zbar, z - zbar)
        z = eq.relax_step(z, f, eps) if mixer is None else mixer.step(z, eq.relax_step(z, f, eps))
        if cfg.adaptive_t2 and t % cfg.snapshot_every == 0:
            a = eq.contrast(z, z_star, weights, r, k)
            if prev_a is not None and torch.isfinite(a).all():
                step = float((a - prev_a).norm())
                inc = step / per_token
                if inc < best_inc:
                    best_a, best_inc, best_t = a, inc, t
                if 0 < prev_step < math.inf:
                    rho = step / prev_step if rho < 0 else 0.5 * (rho + step / prev_step)
                prev_step = step
                remaining = remaining_change(step / max(float(a.norm()), 1e-30), rho)
            elif prev_a is not None:
                remaining = math.inf
            prev_a = a
        if t == steps:
            tail_head = remaining  # what the adjoint-aware controller reads
        # continuation (t2_tol): checked after t2_max steps and after every chunk
        if t >= steps and (cfg.t2_tol is None or ((t - steps) % cfg.t2_chunk == 0
                                                  and remaining <= cfg.t2_tol)):
            break
    if best_a is None:
        best_a = eq.contrast(z, z_star, weights, r, k)
    best_a = best_a / per_token
    stats = {"t2": float(best_t), "a_norm": float(best_a.norm())}
    if cfg.adaptive_t2:
        stats.update({"a_increment": best_inc, "a_tail_head": tail_head})
    if cfg.t2_tol is not None:
        stats.update({"settle/nudged/iters": float(t), "settle/nudged/residual": remaining,
                      "settle/nudged/tol": cfg.t2_tol, "settle/nudged/cap": float(cap)})
    return best_a, stats


def ep_gradients(model: EquilibriumLM, idx: torch.Tensor, targets: torch.Tensor, cfg: NudgeConfig,
                 free: RelaxResult | None = None,
                 ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """EP task gradient at the free-phase fixed point (runs the free phase if not given)."""
    free = free if free is not None else model.free_phase(idx)
    a, stats = nudged_contrast(model, idx, targets, free.z, cfg)
    grads = contrast_gradients(model, idx, targets, free.z, a)
    with torch.no_grad():
        loss = model.ce(free.z, targets).item()
    stats.update({"loss": loss, "term/ce": loss, "residual": free.residual,
                  "settle_iters": float(free.steps)})
    return grads, stats
