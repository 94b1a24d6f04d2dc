"""Fast GPU training step for the thick equilibrium block: the same EP / BPTT gradients, without
the launch overhead (GPU-speed issue: the eager EP step is ~500 ms on an H100 and launch-bound).

What makes it fast, and why each piece keeps the estimator unchanged:

- ``ThickOps`` writes the block's interaction h(z) = Attn(LN1 z) + FFN(LN2 z) as plain tensor
  ops, together with its exact J v (forward-mode) and J^T u (reverse-mode) in closed form, sharing
  one primal pass. ``torch.func.jvp``/``vjp`` re-run the primal twice and dispatch hundreds of
  tiny kernels per nudged step; the closed forms are the same derivatives (pinned in float64
  against ``torch.func`` by ``tests/test_eqt_fast.py``) and are fusable by ``torch.compile``.
  Where no forward-mode derivative is needed (every force evaluation, the contrast gradient,
  BPTT's backward steps) attention runs through ``scaled_dot_product_attention`` (same function,
  no T x T score tensor).
- Tracking-AEP with N = 2 real phases linearises at z_bar = (z+ + z-)/2, so v- = -v+ and
  corr- = -corr+: one (J - J^T) v on B rows instead of 2B (exact, J is linear in v).
- Every fixed-length part is captured once as a CUDA graph per batch shape (the T1 free steps,
  one continuation chunk, the first T2 nudged steps, one nudged continuation chunk, the
  contrast gradient, the stabilisers, the BPTT unroll + its backward) and replayed; the adaptive
  parts stay on the host but read one device scalar per chunk: the free-phase residual after T1
  (and after each continuation chunk), which decides the continuation and the validity gate,
  and with ``t2_tol`` the nudged phase's estimated remaining change (``ep.remaining_change``).
  Adaptive-T2 snapshot selection runs on the device with ``torch.where`` (no sync).
- BPTT keeps only the T1 states z_t (1.2 GB at the log's shape instead of 28 GB of
  activations) and backpropagates step by step, recomputing each step's internals: activation
  checkpointing at step granularity, still the exact gradient of the T1-step unroll. The
  long-unroll reference of the cosine checkpoints (``bptt_reference``) keeps every 64th state
  and recomputes the segments in between. Each
  backward step is either autograd through the recomputed interaction (``bptt_attention`` =
  ``sdpa`` / ``materialized``) or ``ThickOps.backward`` (``closed``): J^T lambda and the
  parameter cotangents in closed form, compiled into one fused step.
- bf16 (optional): autocast in the free phase, the contrast gradient, the AEP correction and the
  stabilisers; the state, the residual and the nudged forces stay fp32. The nudged phase's
  signal is the *difference* z+ - z- (O(beta) per token, see ``models.eqt.ep``), and the forces
  F(z+) - F(z-) cancel to that size, so they must be computed at full fp32 precision (no TF32 /
  bf16 there); the correction is linear in v and only needs relative precision.

On the CPU (or with ``graphs=False``) the same functions run eagerly: that is how the tests pin
the fast path to the eager rules. Holomorphic EP with N > 2 (complex phases) is not covered and
uses the eager path (``FastEQ.supports``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from models.config.eqt import BPTTRule, EPRule, FastConfig, NudgeConfig
from models.eqt import equations as eq
from models.eqt import step
from models.eqt.anderson import Anderson
from models.eqt.ep import RHO_MAX, nudge_points
from models.eqt.relax import RelaxResult
from models.eqt.stabilisers import JacregController
from models.eqt.thick_ops import ThickOps

if TYPE_CHECKING:
    from models.eqt.model import EquilibriumLM



def _copy_grads(out: dict[str, torch.Tensor], names: tuple[str, ...],
                grads: tuple[torch.Tensor | None, ...]) -> None:
    """Write autograd's gradients into a graph's static buffers (zeros where unused)."""
    for name, g in zip(names, grads, strict=True):
        if g is None:
            out[name].zero_()
        else:
            out[name].copy_(g)

def _grad_dict(model: nn.Module, gs: tuple[torch.Tensor | None, ...]) -> dict[str, torch.Tensor]:
    return {n: torch.zeros_like(p) if g is None else g
            for (n, p), g in zip(model.named_parameters(), gs, strict=True)}


class _Graphed:
    """A function of static buffers, run eagerly (CPU / graphs off) or captured once and replayed.

    Capture follows PyTorch's recipe: a few warm-up calls on a side stream (compilation and the
    autograd engine's lazy setup happen there), then one capture into a pool shared by all
    graphs of the engine. Every graph writes its results into buffers allocated outside the
    graphs (``FastEQ._out``), so a graph's scratch memory never aliases another graph's outputs.
    """

    def __init__(self, fn: Callable[[], None], use_graph: bool,
                 pool: Any = None) -> None:
        self.fn = fn
        self.graph: torch.cuda.CUDAGraph | None = None
        if use_graph:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                fn()

    def __call__(self) -> None:
        if self.graph is None:
            self.fn()
        else:
            self.graph.replay()


class FastEQ:
    """Fast EP / BPTT gradients and free phase for one ``EquilibriumLM`` with a thick block.

    Graphs are built lazily per (batch shape, rule config) and read the model's parameters in
    place, so optimizer steps (in-place updates) are seen by every replay. ``gradients`` has the
    contract of ``models.eqt.step.gradients``.
    """

    def __init__(self, model: EquilibriumLM, cfg: FastConfig | None = None) -> None:
        from models.eqt.block import ThickBlock

        if not isinstance(model.block, ThickBlock):
            raise ValueError("the fast path implements the thick block only")
        self.model = model
        self.cfg = cfg or FastConfig()
        self.ops = ThickOps(model.block)
        dev = next(model.parameters()).device
        self.device = dev
        self.dtype = next(model.parameters()).dtype  # the state's dtype (fp32, or fp64 in tests)
        self.use_graphs = self.cfg.graphs and dev.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._cache: dict[tuple[Any, ...], Any] = {}
        self._out: dict[str, torch.Tensor] = {}
        wrap = (torch.compile if self.cfg.compile and dev.type == "cuda"
                else (lambda f, **_: f))
        self._free_core = wrap(self._free_core_eager, dynamic=False)
        self._relax_core = wrap(self._relax_core_eager, dynamic=False)
        self._interaction = wrap(self.ops.interaction, dynamic=False)
        self._force_fp32 = wrap(self._force_fp32_eager, dynamic=False)
        self._antisym = wrap(self.ops.antisym, dynamic=False)
        self._jvp = wrap(self.ops.jvp, dynamic=False)
        self._vjp = wrap(self.ops.vjp, dynamic=False)
        self._interaction_mat = wrap(self.ops.interaction_materialized, dynamic=False)
        self._backward = wrap(self.ops.backward, dynamic=False)
        self._nudge_step = self._nudge_step_eager

    # ---- precision contexts
    def _amp(self) -> contextlib.AbstractContextManager[Any]:
        if self.cfg.bf16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _matmul_precision(self, tf32: bool) -> Iterator[None]:
        if self.device.type != "cuda":
            yield
            return
        old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old

    @staticmethod
    def supports(rule_cfg: Any) -> bool:
        """BPTT and real-phase EP (holomorphic N <= 2); everything else runs eagerly."""
        if isinstance(rule_cfg, BPTTRule):
            return True
        return isinstance(rule_cfg, EPRule) and rule_cfg.nudge.holomorphic_n <= 2

    # ---- per-step functions (compiled on CUDA)
    def _force(self, z: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
        return eq.force(z, x_in, self._interaction(z).to(self.dtype), self.model.block.damping)

    def _free_core_eager(self, z: torch.Tensor, x_in: torch.Tensor,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """z + eps F(z) and res = |eps F(z)| / |z| (the residual before the step)."""
        eps = self.model.relax_cfg.eps
        f = eq.force(z, x_in, self.ops.interaction(z).to(self.dtype), self.model.block.damping)
        return eq.relax_step(z, f, eps), eq.relative_residual(f, z, eps)

    def _free_step(self, z: torch.Tensor, x_in: torch.Tensor,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        with self._amp():
            return self._free_core(z, x_in)

    def _relax_core_eager(self, z: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
        """z + eps F(z) without the residual (its two norms cost ~10% of a step)."""
        eps = self.model.relax_cfg.eps
        f = eq.force(z, x_in, self.ops.interaction(z).to(self.dtype), self.model.block.damping)
        return eq.relax_step(z, f, eps)

    def _relax_step(self, z: torch.Tensor, x_in: torch.Tensor, trace: torch.Tensor | None,
                    i: int) -> torch.Tensor:
        """One free-phase step; writes res(z) into ``trace[i]`` when a trace is kept."""
        if trace is None:
            with self._amp():
                return self._relax_core(z, x_in)
        cur, r = self._free_step(z, x_in)
        trace[i].copy_(r)
        return cur

    def _force_fp32_eager(self, z: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
        return eq.force(z, x_in, self.ops.interaction(z), self.model.block.damping)

    def _nudge_step_eager(self, z: torch.Tensor, x_in2: torch.Tensor, tgt2: torch.Tensor,
                          star2: torch.Tensor, beta_b: torch.Tensor, scale: float,
                          aep: str) -> torch.Tensor:
        """One lockstep step of both phases (the eager ``nudged_contrast`` loop body). The
        forces are taken at full fp32 (their difference is the signal); the correction, linear
        in v, under the engine's matmul precision and autocast."""
        eps = self.model.relax_cfg.eps
        with self._matmul_precision(False):
            f = self._force_fp32(z, x_in2)
        f = eq.nudged_force(f, self.model.ce_grad_z(z, tgt2), beta_b, scale)
        with self._matmul_precision(self.cfg.tf32), self._amp():
            if aep == "tracking":
                zbar, d = eq.two_phase_split(z)
                f = eq.minus_pm(f, self._antisym(zbar, d).to(self.dtype))
            elif aep == "fixed":
                f = f - self._antisym(star2, z - star2).to(self.dtype)
        return eq.relax_step(z, f, eps)

    def _differential_step(self, m_: torch.Tensor, d: torch.Tensor, x_in: torch.Tensor,
                           tgt2: torch.Tensor, r: float, scale: float,
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """One tracking-AEP step of the two phases z+- = m +- d in common/differential mode.

        Lockstep: z+-' = F(z+-) -+ r G+- -+ C(m) d with C = J - J^T at m = (z+ + z-)/2. Hence
        m' = (F(m+d) + F(m-d))/2 - r (G+ - G-)/2 and d' = (F(m+d) - F(m-d))/2 - C d
        - r (G+ + G-)/2 = J(m)^T d - r (G+ + G-)/2 + O(|d|^3), and (F(m+d) + F(m-d))/2 =
        F(m) + O(|d|^2). The dropped terms are the centered estimator's own O(beta^2) order; at
        the per-token beta they are below fp32 rounding of the lockstep difference, which this
        form avoids (d is carried, never recovered from z+ - z-), so it runs in TF32 / bf16.
        """
        eps = self.model.relax_cfg.eps
        c = self.model.block.damping
        g = scale * self.model.ce_grad_z(torch.cat([m_ + d, m_ - d]), tgt2)
        gp, gm = g.chunk(2)
        with self._matmul_precision(self.cfg.tf32), self._amp():
            f = self._force(m_, x_in)
            jtd = self._vjp(m_, d).to(self.dtype) - (1 + c) * d
        # m' = m + eps (F(m) - r (G+ - G-)/2); d' = the adjoint step of d nudged by (G+ + G-)/2
        # (written out: the nudge enters inside the step, in the order the results were made)
        return (eq.relax_step(m_, f - 0.5 * r * (gp - gm), eps),
                d + eps * (jtd - 0.5 * r * (gp + gm)))

    # ---- buffers
    def _buf(self, name: str, like: torch.Tensor) -> torch.Tensor:
        t = self._out.get(name)
        if t is None or t.shape != like.shape or t.dtype != like.dtype:
            t = torch.zeros_like(like)
            self._out[name] = t
        return t

    def _grad_bufs(self, prefix: str) -> dict[str, torch.Tensor]:
        return {n: self._buf(f"{prefix}/{n}", p) for n, p in self.model.named_parameters()}

    def _inputs(self, idx: torch.Tensor, targets: torch.Tensor | None) -> None:
        self._buf("idx", idx).copy_(idx)
        if targets is not None:
            self._buf("tgt", targets).copy_(targets)

    # ---- free phase
    def _free_graphs(self, shape: tuple[int, ...], keep_trace: bool,
                     ) -> tuple[_Graphed, _Graphed, _Graphed]:
        key = ("free", shape, keep_trace)
        if key not in self._cache:
            m, rc = self.model, self.model.relax_cfg
            idx = self._out["idx"]
            b, t = shape
            c = m.shape.n_embd
            proto = torch.zeros(b, t, c, device=self.device, dtype=self.dtype)
            z = self._buf("z", proto)
            zt1 = self._buf("z_t1", proto)
            x_in = self._buf("x_in", proto)
            trace = self._buf("trace", torch.zeros(rc.t1max + 1, device=self.device, dtype=self.dtype))
            res = self._buf("res", torch.zeros((), device=self.device, dtype=self.dtype))
            tr = trace if keep_trace else None

            def tail() -> None:
                with torch.no_grad(), self._matmul_precision(self.cfg.tf32):
                    _, r = self._free_step(z, x_in)
                    res.copy_(r)

            def t1() -> None:
                with torch.no_grad(), self._matmul_precision(self.cfg.tf32):
                    x_in.copy_(m.x_in(idx))
                    cur = x_in
                    for i in range(rc.t1):
                        cur = self._relax_step(cur, x_in, tr, i)
                    z.copy_(cur)
                    zt1.copy_(cur)
                tail()

            def chunk() -> None:
                with torch.no_grad(), self._matmul_precision(self.cfg.tf32):
                    cur = z
                    for i in range(rc.chunk):
                        cur = self._relax_step(cur, x_in, tr, i)
                    z.copy_(cur)
                tail()

            def one() -> None:
                with torch.no_grad(), self._matmul_precision(self.cfg.tf32):
                    z.copy_(self._relax_step(z, x_in, tr, 0))
                tail()

            self._cache[key] = (_Graphed(t1, self.use_graphs, self.pool),
                                _Graphed(chunk, self.use_graphs, self.pool),
                                _Graphed(one, self.use_graphs, self.pool))
        return self._cache[key]

    def free_phase(self, idx: torch.Tensor, keep_trace: bool = False) -> RelaxResult:
        """The adaptive free phase of ``models.eqt.relax.relax``: T1 steps, then chunks until
        res <= res_target or t1max; one host read of the residual per chunk. Without
        ``keep_trace`` the per-step residuals are not computed and ``trace`` holds only the
        residuals read after T1 and after each chunk."""
        rc = self.model.relax_cfg
        self._inputs(idx, None)
        g_t1, g_chunk, g_one = self._free_graphs(tuple(idx.shape), keep_trace)
        trace_buf, res_buf = self._out["trace"], self._out["res"]
        g_t1()
        trace = trace_buf[:rc.t1].tolist() if keep_trace else []
        res = res_t1 = float(res_buf)
        steps = rc.t1
        while math.isfinite(res) and res > rc.res_target and steps < rc.t1max:
            n = min(rc.chunk, rc.t1max - steps)
            if n == rc.chunk:
                g_chunk()
                trace += trace_buf[:n].tolist() if keep_trace else [res]
            else:
                for _ in range(n):
                    g_one()
                    if keep_trace:
                        trace.append(float(trace_buf[0]))
                if not keep_trace:
                    trace.append(res)
            steps += n
            res = float(res_buf)
        trace.append(res)
        # copies: the graphs rewrite their buffers on the next call (what is returned is kept)
        z = self._out["z"].clone()
        finite = bool(torch.isfinite(z).all())
        return RelaxResult(z=z, z_t1=self._out["z_t1"].clone(),
                           residual=res if finite else math.inf,
                           residual_t1=res_t1 if finite else math.inf, steps=steps, trace=trace)

    @torch.no_grad()
    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Evaluation CE through the fast free phase (``EquilibriumLM.loss``)."""
        z = self.free_phase(idx).z
        if not torch.isfinite(z).all():
            return torch.tensor(math.inf, device=idx.device)
        return self.model.ce(z, targets)

    # ---- EP task gradient
    def _ep_graph(self, shape: tuple[int, ...], cfg: NudgeConfig,
                  ) -> tuple[_Graphed, _Graphed | None, _Graphed]:
        """(head, chunk, gradient) graphs: the first t2 nudged steps, one continuation chunk
        (``t2_tol`` only; None otherwise) and the snapshot choice + contrast gradient. The
        nudged state, the last snapshot and the best one live in static buffers between them;
        the host reads one scalar (the estimated remaining change of a) per chunk."""
        key = ("ep", shape, self.cfg.nudge, cfg.model_dump_json())
        if key in self._cache:
            return self._cache[key]
        m = self.model
        idx, tgt, z_star = self._out["idx"], self._out["tgt"], self._out["z"]
        betas, weights, r = nudge_points(cfg, self.dtype, self.device)
        if betas.is_complex():
            raise ValueError("complex holomorphic phases are not on the fast path")
        k = betas.numel()
        if cfg.aep == "tracking" and k != 2:
            raise ValueError("tracking-AEP on the fast path needs the two real phases +-beta")
        b = shape[0]
        beta_b = betas.repeat_interleave(b).view(-1, 1, 1)
        scalar = torch.zeros((), device=self.device, dtype=self.dtype)
        a_out = self._buf("a", z_star)
        loss_out = self._buf("loss", scalar)
        t2_out = self._buf("t2", scalar)
        inc_out = self._buf("a_inc", scalar)
        rel_out = self._buf("a_rel_inc", scalar)
        t_done = self._buf("nudge/t", scalar)  # nudged steps run so far (device counter)
        grads_out = self._grad_bufs("task")
        steps = cfg.t2_steps
        names, params = zip(*m.named_parameters(), strict=True)
        differential = self.cfg.nudge == "differential" and cfg.aep == "tracking"
        per_token = float(tgt.numel()) if cfg.nudge_scale == "token" else 1.0
        # the nudged state (both phases in lockstep, or common/differential mode) and snapshots
        z_nudge = self._buf("nudge/z", z_star.repeat(k, 1, 1))
        mode, dif = self._buf("nudge/mode", z_star), self._buf("nudge/dif", z_star)
        prev_a, best_a = self._buf("nudge/prev_a", z_star), self._buf("nudge/best_a", z_star)
        best_inc, best_t = self._buf("nudge/best_inc", scalar), self._buf("nudge/best_t", scalar)
        # the last snapshot increment and the running contraction estimate (ep.remaining_change)
        prev_step, rho = self._buf("nudge/prev_step", scalar), self._buf("nudge/rho", scalar)
        # Anderson mixing (cfg.accel): over the lockstep state, or (mode, dif) stacked
        mixer = None
        if cfg.accel == "anderson":
            mixer = Anderson(torch.stack([mode, dif]) if differential else z_nudge, cfg.accel_m)

        def contrast(z: torch.Tensor) -> torch.Tensor:
            return eq.contrast(z, z_star, weights, r, k)

        def advance(n: int, first: bool) -> None:
            """n nudged steps from the buffers; snapshot bookkeeping on the device."""
            tgt2 = tgt.repeat(k, 1)
            scale = float(k) * per_token
            if differential:
                x_in1 = m.x_in(idx)
            else:
                x_in2, star2 = m.x_in(idx).repeat(k, 1, 1), z_star.repeat(k, 1, 1)
            z, mo, di = z_nudge, mode, dif
            have_prev = not first
            for j in range(1, n + 1):
                if differential:
                    mo2, di2 = self._differential_step(mo, di, x_in1, tgt2, r, scale)
                    if mixer is not None:
                        mo2, di2 = mixer.step(torch.stack([mo, di]),
                                              torch.stack([mo2, di2])).unbind(0)
                    mo, di = mo2, di2
                else:
                    z2 = self._nudge_step(z, x_in2, tgt2, star2, beta_b, scale, cfg.aep)
                    z = z2 if mixer is None else mixer.step(z, z2)
                if cfg.adaptive_t2 and j % cfg.snapshot_every == 0:
                    a = -di / r if differential else contrast(z)
                    if have_prev:
                        inc = (a - prev_a).norm()
                        finite = torch.isfinite(a).all()
                        better = finite & (inc < best_inc)
                        best_a.copy_(torch.where(better, a, best_a))
                        best_t.copy_(torch.where(better, t_done + j, best_t))
                        best_inc.copy_(torch.where(better, inc, best_inc))
                        # ep.remaining_change on the device (rho < 0: not measured yet)
                        known = finite & torch.isfinite(prev_step) & (prev_step > 0)
                        ratio = inc / torch.where(known, prev_step, torch.ones_like(inc))
                        rho.copy_(torch.where(known, torch.where(rho < 0, ratio,
                                                                 0.5 * (rho + ratio)), rho))
                        prev_step.copy_(torch.where(finite, inc, prev_step))
                        r_ = rho.clamp(max=RHO_MAX)
                        tail = eq.geometric_tail(inc / a.norm().clamp_min(1e-30), r_)
                        inf = torch.full_like(tail, math.inf)
                        rel_out.copy_(torch.where(finite & (rho >= 0), tail, inf))
                    prev_a.copy_(a)
                    have_prev = True
            z_nudge.copy_(z)
            mode.copy_(mo)
            dif.copy_(di)
            t_done.add_(n)

        def head() -> None:
            with torch.no_grad():
                z_nudge.copy_(z_star.repeat(k, 1, 1))
                mode.copy_(z_star)
                dif.zero_()
                best_inc.fill_(math.inf)
                best_t.fill_(float(steps))
                rel_out.fill_(math.inf)
                prev_step.fill_(math.inf)
                rho.fill_(-1.0)
                t_done.zero_()
                if mixer is not None:
                    mixer.reset()
                advance(steps, first=True)

        def chunk() -> None:
            with torch.no_grad():
                advance(cfg.t2_chunk, first=False)

        def grad() -> None:
            with torch.no_grad():
                last = -dif / r if differential else contrast(z_nudge)
                if cfg.adaptive_t2:
                    found = torch.isfinite(best_inc)
                    a = torch.where(found, best_a, last)
                    t2_out.copy_(torch.where(found, best_t, t_done))
                else:
                    a = last
                    t2_out.copy_(t_done)
                a_out.copy_(a / per_token)
                inc_out.copy_(best_inc / per_token)
            with torch.enable_grad(), self._matmul_precision(self.cfg.tf32), self._amp():
                x_in = m.x_in(idx)
                f = self._force(z_star, x_in)
                ce = m.ce(z_star, tgt)
                s = eq.contrast_objective(a_out, f, ce)
                gs = torch.autograd.grad(s, params, allow_unused=True)
            with torch.no_grad():
                loss_out.copy_(ce.detach().to(self.dtype))
                _copy_grads(grads_out, names, gs)

        graphs = (_Graphed(head, self.use_graphs, self.pool),
                  _Graphed(chunk, self.use_graphs, self.pool) if cfg.t2_tol is not None else None,
                  _Graphed(grad, self.use_graphs, self.pool))
        self._cache[key] = graphs
        return graphs

    def _nudged_phase(self, shape: tuple[int, ...], cfg: NudgeConfig) -> dict[str, float]:
        """Run the nudged phase (with its continuation) and the contrast gradient; stats."""
        g_head, g_chunk, g_grad = self._ep_graph(shape, cfg)
        g_head()
        stats: dict[str, float] = {}
        if cfg.adaptive_t2:  # the tail after t2_max: what the adjoint-aware controller reads
            stats["a_tail_head"] = float(self._out["a_rel_inc"])
        if g_chunk is not None:  # t2_tol: continue while the last snapshot still moves
            t, rel = cfg.t2_steps, stats["a_tail_head"]
            while t < cfg.t2_cap and not rel <= cfg.t2_tol:
                g_chunk()
                t += cfg.t2_chunk
                rel = float(self._out["a_rel_inc"])
            stats.update({"settle/nudged/iters": float(t), "settle/nudged/residual": rel,
                          "settle/nudged/tol": cfg.t2_tol, "settle/nudged/cap": float(cfg.t2_cap)})
        g_grad()
        return stats

    # ---- stabilisers
    def _stab_graph(self, shape: tuple[int, ...], jacreg: bool, resreg: float,
                    ) -> _Graphed:
        key = ("stab", shape, jacreg, resreg)
        if key in self._cache:
            return self._cache[key]
        m = self.model
        idx, z_star, z_t1 = self._out["idx"], self._out["z"], self._out["z_t1"]
        lam = self._buf("lam", torch.zeros((), device=self.device, dtype=self.dtype))
        jr_out = self._buf("jacreg", torch.zeros((), device=self.device, dtype=self.dtype))
        rr_out = self._buf("resreg", torch.zeros((), device=self.device, dtype=self.dtype))
        grads_out = self._grad_bufs("stab")
        names, params = zip(*m.named_parameters(), strict=True)
        eps = m.relax_cfg.eps

        def run() -> None:
            with torch.enable_grad(), self._matmul_precision(self.cfg.tf32), self._amp():
                total = torch.zeros((), device=self.device, dtype=self.dtype)
                if jacreg:
                    probe = torch.randn_like(z_star)
                    jv = self._jvp(z_star, probe).to(self.dtype)
                    jr = eq.jacreg(jv)
                    total = total + lam * jr
                if resreg > 0:
                    f = self._force(z_t1, m.x_in(idx))
                    rr = eq.resreg(f, z_t1, eps)
                    total = total + resreg * rr
                gs = torch.autograd.grad(total, params, allow_unused=True)
            with torch.no_grad():
                if jacreg:
                    jr_out.copy_(jr.detach())
                if resreg > 0:
                    rr_out.copy_(rr.detach())
                _copy_grads(grads_out, names, gs)

        graph = _Graphed(run, self.use_graphs, self.pool)
        self._cache[key] = graph
        return graph

    # ---- BPTT
    def _bptt_back_step(self, state: torch.Tensor, lam: torch.Tensor, acc: list[torch.Tensor],
                        gx: torch.Tensor, block_names: list[str],
                        block_params: list[torch.Tensor]) -> torch.Tensor:
        """One reverse step of the unroll at ``state``: accumulate eps * dh/dtheta^T lam into
        ``acc`` and eps * lam into ``gx`` (the clamp's x_in term), return the earlier lam."""
        eps, c = self.model.relax_cfg.eps, self.model.block.damping
        if self.cfg.bptt_attention == "closed":
            with torch.no_grad():
                gz, pg = self._backward(state, lam)
            out = (gz, *(pg[n[len("block."):]] for n in block_names))
        else:
            zi = state.detach().requires_grad_(True)
            h = (self._interaction_mat(zi) if self.cfg.bptt_attention == "materialized"
                 else self._interaction(zi))
            out = torch.autograd.grad(h, [zi, *block_params], lam.to(h.dtype))
        for a_, g in zip(acc, out[1:], strict=True):
            a_.add_(g, alpha=eps)
        gx.add_(lam, alpha=eps)
        return eq.adjoint_step(lam, out[0].to(self.dtype), eps, c)

    def _bptt_run(self, idx: torch.Tensor, tgt: torch.Tensor, steps: int, segment: int,
                  states: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The exact gradient of the loss after a ``steps``-step unroll from x_in.

        Activation checkpointing: the states at every ``segment``-th step are kept (all of
        them, into ``states``, for the captured T1 graph: segment 1), each segment's states are
        recomputed from its first one during the backward pass, and every reverse step
        recomputes its own internals. Returns z_T, res(z_T), the loss and the gradients."""
        m = self.model
        block_names = [n for n, _ in m.named_parameters() if n.startswith("block.")]
        block_params = [p for n, p in m.named_parameters() if n.startswith("block.")]
        with torch.no_grad(), self._matmul_precision(self.cfg.tf32):
            x_in = m.x_in(idx)
            marks: list[torch.Tensor] = []
            cur = x_in
            for i in range(steps):
                if i % segment == 0:
                    if states is not None:
                        states[i // segment].copy_(cur)
                        marks.append(states[i // segment])
                    else:
                        marks.append(cur.clone())
                cur = self._relax_step(cur, x_in, None, i)
            _, res = self._free_step(cur, x_in)
        with torch.enable_grad(), self._matmul_precision(self.cfg.tf32), self._amp():
            zt = cur.detach().requires_grad_(True)
            ce = m.ce(zt, tgt)
            lam, g_head = torch.autograd.grad(ce, (zt, m.head.weight))
            lam = lam.to(self.dtype)
            acc = [torch.zeros_like(p) for p in block_params]
            gx = torch.zeros_like(lam)
            for s in range(len(marks) - 1, -1, -1):
                first = s * segment
                seg = [marks[s]]
                with torch.no_grad():
                    for i in range(first, min(first + segment, steps) - 1):
                        seg.append(self._relax_step(seg[-1], x_in, None, i))
                for state in reversed(seg):
                    lam = self._bptt_back_step(state, lam, acc, gx, block_names, block_params)
            gx.add_(lam)
            x_in = m.x_in(idx)
            g_tok, g_pos = torch.autograd.grad(x_in, (m.tok.weight, m.pos.weight), gx)
        grads = {"head.weight": g_head, "tok.weight": g_tok, "pos.weight": g_pos,
                 **dict(zip(block_names, acc, strict=True))}
        return {"z": cur, "res": res, "loss": ce.detach().to(self.dtype), "grads": grads}

    def _bptt_graph(self, shape: tuple[int, ...]) -> _Graphed:
        """BPTT through exactly T1 steps (the BPTT row's gradient), captured once per shape."""
        key = ("bptt", shape)
        if key in self._cache:
            return self._cache[key]
        m, rc = self.model, self.model.relax_cfg
        idx, tgt = self._out["idx"], self._out["tgt"]
        b, t = shape
        proto = torch.zeros(b, t, m.shape.n_embd, device=self.device, dtype=self.dtype)
        states = self._buf("bptt_states", proto.expand(rc.t1, b, t, -1).contiguous())
        z_out = self._buf("z", proto)
        res_out = self._buf("res", torch.zeros((), device=self.device, dtype=self.dtype))
        self._buf("z_t1", proto)
        loss_out = self._buf("loss", torch.zeros((), device=self.device, dtype=self.dtype))
        grads_out = self._grad_bufs("task")

        def run() -> None:
            out = self._bptt_run(idx, tgt, rc.t1, 1, states)
            with torch.no_grad():
                z_out.copy_(out["z"])
                self._out["z_t1"].copy_(out["z"])
                res_out.copy_(out["res"])
                loss_out.copy_(out["loss"])
                for n, g in out["grads"].items():
                    grads_out[n].copy_(g)

        graph = _Graphed(run, self.use_graphs, self.pool)
        self._cache[key] = graph
        return graph

    def bptt_reference(self, idx: torch.Tensor, targets: torch.Tensor, steps: int,
                       segment: int = 64) -> tuple[dict[str, torch.Tensor], float]:
        """BPTT through a ``steps``-step unroll (any length: a diagnostic reference, not
        captured), memory ~(steps / segment + segment) states; returns (gradients, res)."""
        out = self._bptt_run(idx, targets, steps, segment)
        return ({n: out["grads"][n] for n, _ in self.model.named_parameters()},
                float(out["res"]))

    # ---- the dispatcher
    def gradients(self, idx: torch.Tensor, targets: torch.Tensor, rule_cfg: BPTTRule | EPRule,
                  controller: JacregController | None = None,
                  ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """``models.eqt.step.gradients`` on the fast path (same stats keys)."""
        if not self.supports(rule_cfg):
            raise ValueError(f"the fast path does not support {rule_cfg!r}")
        stab = rule_cfg.stab
        shape = tuple(idx.shape)
        self._inputs(idx, targets)
        zero_task = False
        if isinstance(rule_cfg, BPTTRule):
            self._bptt_graph(shape)()
            res = float(self._out["res"])
            finite = bool(torch.isfinite(self._out["z"]).all())
            res = res if finite else math.inf
            loss = float(self._out["loss"])
            stats: dict[str, float] = {"loss": loss, "term/ce": loss, "residual": res,
                                       "settle_iters": float(self.model.relax_cfg.t1)}
            free_res = res_t1 = res
        else:
            free = self.free_phase(idx)
            free_res, res_t1 = free.residual, free.residual_t1
            shut = step.gate_shut(stab, free.residual)
            stats = {"residual": free.residual, "settle_iters": float(free.steps)}
            if shut:
                zero_task = True
            else:
                nudge_stats = self._nudged_phase(shape, rule_cfg.nudge)
                loss = float(self._out["loss"])
                stats.update({"loss": loss, "term/ce": loss, "t2": float(self._out["t2"]),
                              "a_norm": float(self._out["a"].norm())})
                if rule_cfg.nudge.adaptive_t2:
                    stats["a_increment"] = float(self._out["a_inc"])
                stats.update(nudge_stats)
                zero_task = step.adjoint_gate_shut(stab, stats)
            stats["gate_skipped"] = float(shut)
        # copies of the static buffers (the next replay rewrites them): safe to keep
        task = {n: torch.zeros_like(p) if zero_task else self._out[f"task/{n}"].clone()
                for n, p in self.model.named_parameters()}
        lam = step.jacreg_weight(stab, controller)
        stats["lambda"] = lam
        extra: dict[str, torch.Tensor] = {}
        if lam > 0 or stab.resreg > 0:
            self._buf("lam", torch.zeros((), device=self.device, dtype=self.dtype)).fill_(lam)
            self._stab_graph(shape, lam > 0, stab.resreg)()
            if lam > 0:
                stats["term/jacreg"] = float(self._out["jacreg"])
            if stab.resreg > 0:
                stats["term/resreg"] = float(self._out["resreg"])
            extra = {n: self._out[f"stab/{n}"] for n in task}
        return step.finish(task, extra, stats, stab, controller, free_res, res_t1)
