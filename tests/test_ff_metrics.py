"""The credit metrics: each must give its known value on a known input and be able to fail."""

from __future__ import annotations

import torch

from models.ff.metrics import bp_cosine, costate_cosine, layer_grads, nudge, rho
from models.ff.mlp import DeepMLP, MLPConfig, true_state_grads
from models.ff.rules.bp import BP
from models.ff.rules.dfa import DFA
from models.ff.tasks.lq import exact_costate, lq_config, make_lq

torch.set_num_threads(2)


def setup() -> tuple[DeepMLP, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = DeepMLP(MLPConfig(d_in=5, d_out=4, width=12, depth=3, d_ff=16)).double()
    g = torch.Generator().manual_seed(1)
    return net, torch.randn(32, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (32,),
                                                                                      generator=g)


def test_bp_cosine_of_bp_is_one_and_of_dfa_is_not() -> None:
    net, x, y = setup()
    net.zero_grad()
    net.loss(net(x), y).backward()
    ref = layer_grads(net.param_groups())
    BP(net).update(x, y)
    res = bp_cosine(layer_grads(net.param_groups()), ref)
    assert all(abs(v - 1) < 1e-9 for v in res.values())
    DFA(net).update(x, y)
    dfa = bp_cosine(layer_grads(net.param_groups()), ref)
    assert dfa["mean"] < 0.9
    assert abs(dfa["head"] - 1) < 1e-9  # the head is output-local for every rule


def test_rho_of_exact_gradient_is_one() -> None:
    net, x, y = setup()
    _, g = true_state_grads(net, x, y)
    assert all(abs(v - 1) < 1e-9 for v in rho(BP(net).credit(x, y), g).values())
    assert rho(DFA(net).credit(x, y), g)["mean"] < 0.9


def test_nudge_of_true_gradient_is_negative() -> None:
    net, x, y = setup()
    _, g = true_state_grads(net, x, y)
    with torch.no_grad():
        hs = net.states(x)

    def loss_from(i: int, h: torch.Tensor) -> torch.Tensor:
        return net.loss_from(i, h, y)

    down = nudge(loss_from, hs, g)
    up = nudge(loss_from, hs, [-t for t in g])
    assert all(v < 0 for v in down.values())
    assert all(v > 0 for v in up.values())


def test_costate_cosine_exact_is_one_random_is_near_zero() -> None:
    torch.manual_seed(0)
    net = DeepMLP(lq_config(depth=4, d=32)).double()
    data = make_lq(n_train=256, n_test=16, seed=0)
    x, y = data.x_train.double(), data.y_train.double()
    lam = exact_costate(net, x, y)
    _, g = true_state_grads(net, x, y)  # autograd: must agree with the adjoint recursion
    assert all(abs(v - 1) < 1e-10 for v in costate_cosine(g, lam).values())
    rnd = [torch.randn_like(t) for t in lam]
    assert all(abs(v) < 0.05 for v in costate_cosine(rnd, lam).values())
