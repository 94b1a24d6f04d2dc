"""The thick block's interaction h(z) = Attn(LN1 z) + FFN(LN2 z), its J v and J^T u, written
out as tensor ops on the block's parameters (closed form, no autograd through LayerNorm).

Shared by the fast GPU step (``models.eqt.fast``) and jacreg (``models.eqt.stabilisers``):
differentiating ``torch.func.jvp`` through ``layer_norm`` in theta gives a wrong parameter
gradient when the norm's input depends on the weights (qk-norm), so both use these forms, which
the tests check in float64 against ``torch.func`` and finite differences.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from models.eqt.block import ThickBlock


def _ln(x: torch.Tensor, mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None,
                                                   torch.Tensor | None]:
    """LayerNorm returning (y, n, rstd) so J v / J^T u can reuse n and rstd."""
    if isinstance(mod, nn.Identity):
        return x, None, None
    mu = x.mean(-1, keepdim=True)
    xc = x - mu
    rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + mod.eps)
    n = xc * rstd
    return n * mod.weight + mod.bias, n, rstd


def _ln_t(dx: torch.Tensor, n: torch.Tensor | None, rstd: torch.Tensor | None,
          mod: nn.Module) -> torch.Tensor:
    """LN Jacobian times a tangent: gamma * rstd * (dx - mean dx - n mean(n dx))."""
    if n is None:
        return dx
    dn = rstd * (dx - dx.mean(-1, keepdim=True) - n * (n * dx).mean(-1, keepdim=True))
    return dn * mod.weight


def _ln_c(g: torch.Tensor, n: torch.Tensor | None, rstd: torch.Tensor | None,
          mod: nn.Module) -> torch.Tensor:
    """LN Jacobian transposed times a cotangent (the normalisation part is symmetric)."""
    if n is None:
        return g
    g = g * mod.weight
    return rstd * (g - g.mean(-1, keepdim=True) - n * (g * n).mean(-1, keepdim=True))


_GELU_K = math.sqrt(2 / math.pi)


def _gelu_grad(a: torch.Tensor) -> torch.Tensor:
    """d/da of tanh-GELU 0.5 a (1 + tanh(k (a + 0.044715 a^3)))."""
    th = torch.tanh(_GELU_K * (a + 0.044715 * a**3))
    return 0.5 * (1 + th) + 0.5 * a * (1 - th * th) * _GELU_K * (1 + 3 * 0.044715 * a * a)


class ThickOps:
    """The thick block's interaction, J v and J^T u as tensor ops on the module's parameters."""

    def __init__(self, block: ThickBlock) -> None:
        self.b = block
        self.h = block.attn.n_head

    def _split(self, y: torch.Tensor) -> torch.Tensor:
        b, t, c = y.shape
        return y.view(b, t, self.h, c // self.h).transpose(1, 2)

    @staticmethod
    def _merge(y: torch.Tensor) -> torch.Tensor:
        b, h, t, d = y.shape
        return y.transpose(1, 2).reshape(b, t, h * d)

    def interaction(self, z: torch.Tensor) -> torch.Tensor:
        """h(z) with fused attention (no score tensor); differentiable by autograd."""
        blk, att = self.b, self.b.attn
        x = F.layer_norm(z, (z.shape[-1],), blk.ln1.weight, blk.ln1.bias, blk.ln1.eps)
        qkv = F.linear(x, torch.cat([att.q.weight, att.k.weight, att.v.weight]),
                       torch.cat([att.q.bias, att.k.bias, att.v.bias]))  # one GEMM, not three
        q, k, v = (self._split(y) for y in qkv.chunk(3, -1))
        if not isinstance(att.q_norm, nn.Identity):
            q = F.layer_norm(q, (q.shape[-1],), att.q_norm.weight, att.q_norm.bias,
                             att.q_norm.eps)
            k = F.layer_norm(k, (k.shape[-1],), att.k_norm.weight, att.k_norm.bias,
                             att.k_norm.eps)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = F.linear(self._merge(y), att.o.weight, att.o.bias)
        x2 = F.layer_norm(z, (z.shape[-1],), blk.ln2.weight, blk.ln2.bias, blk.ln2.eps)
        hid = F.gelu(F.linear(x2, blk.ffn.fc.weight, blk.ffn.fc.bias), approximate="tanh")
        return out + F.linear(hid, blk.ffn.proj.weight, blk.ffn.proj.bias)

    def interaction_materialized(self, z: torch.Tensor) -> torch.Tensor:
        """h(z) through the explicit softmax (the T x T probabilities stored); for autograd where
        the fused attention's backward is the slower one (fp32 on Hopper)."""
        pr = self._primal(z)
        blk, att = self.b, self.b.attn
        out = F.linear(self._merge(pr["y"]), att.o.weight, att.o.bias)
        hid = F.gelu(pr["a"], approximate="tanh")
        return out + F.linear(hid, blk.ffn.proj.weight, blk.ffn.proj.bias)

    def _primal(self, z: torch.Tensor) -> dict[str, Any]:
        blk, att = self.b, self.b.attn
        x1, n1, r1 = _ln(z, blk.ln1)
        q0 = self._split(F.linear(x1, att.q.weight, att.q.bias))
        k0 = self._split(F.linear(x1, att.k.weight, att.k.bias))
        v = self._split(F.linear(x1, att.v.weight, att.v.bias))
        q, nq, rq = _ln(q0, att.q_norm)
        k, nk, rk = _ln(k0, att.k_norm)
        t, d = z.shape[1], q.shape[-1]
        scale = 1 / math.sqrt(d)
        mask = torch.ones(t, t, dtype=torch.bool, device=z.device).tril()
        p = torch.softmax((q @ k.transpose(-2, -1) * scale).masked_fill(~mask, float("-inf")), -1)
        y = p @ v
        x2, n2, r2 = _ln(z, blk.ln2)
        a = F.linear(x2, blk.ffn.fc.weight, blk.ffn.fc.bias)
        return {"n1": n1, "r1": r1, "q": q, "k": k, "v": v, "nq": nq, "rq": rq, "nk": nk,
                "rk": rk, "p": p, "y": y, "scale": scale, "n2": n2, "r2": r2, "a": a,
                "x1": x1, "x2": x2}

    def _tangent(self, pr: dict[str, Any], dz: torch.Tensor) -> torch.Tensor:
        """J v of h at the primal point (forward mode, closed form)."""
        blk, att = self.b, self.b.attn
        dx1 = _ln_t(dz, pr["n1"], pr["r1"], blk.ln1)
        dq = _ln_t(self._split(F.linear(dx1, att.q.weight)), pr["nq"], pr["rq"], att.q_norm)
        dk = _ln_t(self._split(F.linear(dx1, att.k.weight)), pr["nk"], pr["rk"], att.k_norm)
        dv = self._split(F.linear(dx1, att.v.weight))
        p = pr["p"]
        ds = (dq @ pr["k"].transpose(-2, -1) + pr["q"] @ dk.transpose(-2, -1)) * pr["scale"]
        pds = p * ds
        dy = pds @ pr["v"] - pds.sum(-1, keepdim=True) * pr["y"] + p @ dv
        jv_attn = F.linear(self._merge(dy), att.o.weight)
        dx2 = _ln_t(dz, pr["n2"], pr["r2"], blk.ln2)
        da = _gelu_grad(pr["a"]) * F.linear(dx2, blk.ffn.fc.weight)
        return jv_attn + F.linear(da, blk.ffn.proj.weight)

    def _cotangent(self, pr: dict[str, Any], u: torch.Tensor) -> torch.Tensor:
        """J^T u of h at the primal point (reverse mode, closed form)."""
        blk, att = self.b, self.b.attn
        gy = self._split(u @ att.o.weight)
        p = pr["p"]
        gp = gy @ pr["v"].transpose(-2, -1)
        gv = p.transpose(-2, -1) @ gy
        gs = p * (gp - (gy * pr["y"]).sum(-1, keepdim=True)) * pr["scale"]
        gq = _ln_c(gs @ pr["k"], pr["nq"], pr["rq"], att.q_norm)
        gk = _ln_c(gs.transpose(-2, -1) @ pr["q"], pr["nk"], pr["rk"], att.k_norm)
        gx1 = (self._merge(gq) @ att.q.weight + self._merge(gk) @ att.k.weight
               + self._merge(gv) @ att.v.weight)
        ga = _gelu_grad(pr["a"]) * (u @ blk.ffn.proj.weight)
        gx2 = ga @ blk.ffn.fc.weight
        return (_ln_c(gx1, pr["n1"], pr["r1"], blk.ln1)
                + _ln_c(gx2, pr["n2"], pr["r2"], blk.ln2))

    def backward(self, z: torch.Tensor, u: torch.Tensor,
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """J^T u and the parameter cotangents (d h / d theta)^T u, keyed like the block's
        ``named_parameters()``: one BPTT backward step without autograd (the same reverse-mode
        chain as ``_cotangent``, with each layer's weight gradient read off its input and output
        cotangent), so ``torch.compile`` can fuse it."""
        blk, att = self.b, self.b.attn
        pr = self._primal(z)

        def wgrad(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # sum_rows g^T x
            return g.reshape(-1, g.shape[-1]).transpose(0, 1) @ x.reshape(-1, x.shape[-1])

        def rows(g: torch.Tensor) -> torch.Tensor:  # sum over every axis but the last
            return g.reshape(-1, g.shape[-1]).sum(0)

        grads: dict[str, torch.Tensor] = {}
        # FFN: h_ffn = W2 GELU(W1 LN2 z + b1) + b2
        hid = F.gelu(pr["a"], approximate="tanh")
        grads["ffn.proj.weight"], grads["ffn.proj.bias"] = wgrad(u, hid), rows(u)
        ga = _gelu_grad(pr["a"]) * (u @ blk.ffn.proj.weight)
        grads["ffn.fc.weight"], grads["ffn.fc.bias"] = wgrad(ga, pr["x2"]), rows(ga)
        gx2 = ga @ blk.ffn.fc.weight
        # attention: h_attn = W_o merge(P V) + b_o
        grads["attn.o.weight"] = wgrad(u, self._merge(pr["y"]))
        grads["attn.o.bias"] = rows(u)
        gy = self._split(u @ att.o.weight)
        p = pr["p"]
        gp = gy @ pr["v"].transpose(-2, -1)
        gv = self._merge(p.transpose(-2, -1) @ gy)
        gs = p * (gp - (gy * pr["y"]).sum(-1, keepdim=True)) * pr["scale"]
        gq_n, gk_n = gs @ pr["k"], gs.transpose(-2, -1) @ pr["q"]  # cotangents of q, k
        if not isinstance(att.q_norm, nn.Identity):
            grads["attn.q_norm.weight"] = rows(gq_n * pr["nq"])
            grads["attn.q_norm.bias"] = rows(gq_n)
            grads["attn.k_norm.weight"] = rows(gk_n * pr["nk"])
            grads["attn.k_norm.bias"] = rows(gk_n)
        gq = self._merge(_ln_c(gq_n, pr["nq"], pr["rq"], att.q_norm))
        gk = self._merge(_ln_c(gk_n, pr["nk"], pr["rk"], att.k_norm))
        x1 = pr["x1"]
        for name, g in (("q", gq), ("k", gk), ("v", gv)):
            grads[f"attn.{name}.weight"], grads[f"attn.{name}.bias"] = wgrad(g, x1), rows(g)
        gx1 = gq @ att.q.weight + gk @ att.k.weight + gv @ att.v.weight
        # the two LayerNorms on z
        grads["ln1.weight"], grads["ln1.bias"] = rows(gx1 * pr["n1"]), rows(gx1)
        grads["ln2.weight"], grads["ln2.bias"] = rows(gx2 * pr["n2"]), rows(gx2)
        gz = _ln_c(gx1, pr["n1"], pr["r1"], blk.ln1) + _ln_c(gx2, pr["n2"], pr["r2"], blk.ln2)
        return gz, grads

    def jvp(self, z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._tangent(self._primal(z), v)

    def vjp(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self._cotangent(self._primal(z), u)

    def antisym(self, z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(J - J^T) v at z, one shared primal pass (the AEP correction)."""
        pr = self._primal(z)
        return self._tangent(pr, v) - self._cotangent(pr, v)


# --------------------------------------------------------------------------- engine
