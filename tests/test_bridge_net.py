"""Identities of the bridge's parts (models.bridge.bridge) on tiny shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.bridge.bridge import Bridge, BridgeShape, fsq, soft_prompt_loss
from models.nets.transformer import TransformerLM, TransformerShape

pytestmark = pytest.mark.usefixtures("one_thread")


def stats(src: int, tgt: int, tgt_rms: float = 0.05) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"src_mean": torch.randn(src, generator=g), "src_std": torch.rand(src, generator=g) + 0.5,
            "tgt_mean": torch.zeros(tgt), "tgt_std": torch.full((tgt,), tgt_rms),
            "tgt_rms": torch.tensor(tgt_rms)}


def test_soft_tokens_equal_to_token_embeddings_give_the_targets_own_loss() -> None:
    torch.manual_seed(0)
    target = TransformerLM(TransformerShape(vocab_size=20, block_size=16, n_embd=8, n_head=2))
    prefix, suffix = torch.randint(0, 20, (3, 5)), torch.randint(0, 20, (3, 4))
    labels = suffix.clone()
    labels[:, 0] = -100  # the primer is not scored
    got = soft_prompt_loss(target, target.tok(prefix), suffix, labels)
    full = torch.cat([prefix, suffix], 1)
    logits = target(full)[:, 4:-1]  # the positions that predict suffix tokens
    want = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kind", ["none", "tanh", "rms", "fsq"])
def test_bridge_shapes_and_output_scales(kind: str) -> None:
    torch.manual_seed(1)
    shape = BridgeShape(src_dim=6, tgt_dim=8, k=3, depth=1, n_head=2, output=kind,
                        fsq_levels=(3, 5))
    bridge = Bridge(shape, stats(6, 8))
    h = torch.randn(4, 7, 6)
    pad = torch.zeros(4, 7, dtype=torch.bool)
    pad[0, 5:] = True
    s = bridge(h, pad)
    assert s.shape == (4, 3, 8) and torch.isfinite(s).all()
    if kind == "rms":  # every soft token at exactly scale x the target RMS
        torch.testing.assert_close(s.pow(2).mean(-1).sqrt(), torch.full((4, 3), 0.05))
    if kind == "tanh":
        assert s.abs().max() <= 0.05
    s.sum().backward()  # every map passes a gradient to the resampler (FSQ straight through)
    assert bridge.resampler.queries.grad is not None
    assert float(bridge.resampler.queries.grad.abs().sum()) > 0


def test_padding_is_masked_and_whitening_uses_the_source_statistics() -> None:
    torch.manual_seed(2)
    bridge = Bridge(BridgeShape(src_dim=6, tgt_dim=8, k=2, depth=1, n_head=2), stats(6, 8))
    h = torch.randn(1, 5, 6)
    pad = torch.tensor([[False, False, False, True, True]])
    changed = h.clone()
    changed[0, 3:] += 100.0  # padded positions may hold anything
    torch.testing.assert_close(bridge(h, pad), bridge(changed, pad))
    st = stats(6, 8)
    torch.testing.assert_close(bridge.norm.whiten(st["src_mean"] + st["src_std"]),
                               torch.ones(6))


def test_fsq_rounds_to_its_levels_and_passes_gradients_straight_through() -> None:
    levels = torch.tensor([3.0, 5.0])
    z = torch.randn(100, 2, requires_grad=True)
    q = fsq(z, levels)
    assert set(q[:, 0].tolist()) <= {-1.0, 0.0, 1.0}
    assert set(q[:, 1].tolist()) <= {-2.0, -1.0, 0.0, 1.0, 2.0}
    q.sum().backward()
    half = (levels - 1) / 2
    torch.testing.assert_close(z.grad, half * (1 - torch.tanh(z.detach()) ** 2))
    with pytest.raises(ValueError, match="odd"):
        Bridge(BridgeShape(src_dim=4, tgt_dim=4, output="fsq", fsq_levels=(4,)), stats(4, 4))
