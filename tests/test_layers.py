"""dmvae.layers: the building blocks, each against an independent computation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dmvae.layers import FrozenModule, LabelEmbedder, RMSNorm, VisionRoPE, modulate, sincos_pos_embed_2d


class _Metric(FrozenModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
        self.freeze()


def test_frozen_module_stays_frozen_under_a_training_parent() -> None:
    metric = _Metric()
    parent = nn.Sequential(nn.Linear(3, 3), metric).train()
    assert parent[0].training  # the parent trains ...
    assert not metric.training and not metric.body[1].training  # ... the metric (and its BatchNorm) does not
    assert not any(p.requires_grad for p in metric.parameters()) and parent[0].weight.requires_grad
    assert metric.train(True) is metric and not metric.training


def test_rms_norm_against_the_formula_in_bf16() -> None:
    norm = RMSNorm(8)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(2, 5, 8).bfloat16()
    expected = (x.float() / x.float().pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()).bfloat16() * norm.weight
    out = norm(x)
    assert out.dtype == torch.float32 and torch.equal(out, expected)  # normalised in float32, cast, then gain


def test_modulate_with_and_without_shift() -> None:
    x, shift, scale = torch.randn(2, 3, 4), torch.randn(2, 4), torch.randn(2, 4)
    assert torch.allclose(modulate(x, shift, scale), x * (1 + scale[:, None]) + shift[:, None])
    assert torch.allclose(modulate(x, None, scale), x * (1 + scale[:, None]))


def test_sincos_pos_embed_columns_then_rows() -> None:
    emb = sincos_pos_embed_2d(8, 3)  # (9, 8): [sin, cos] of the column index, then of the row index
    assert emb.shape == (9, 8) and emb.dtype == torch.float32
    token = 1 * 3 + 2  # row 1, column 2
    omega = [1.0, 1e-2]  # 1e4^(-k / 2), k = 0, 1
    expected = [math.sin(2 * w) for w in omega] + [math.cos(2 * w) for w in omega]
    expected += [math.sin(1 * w) for w in omega] + [math.cos(1 * w) for w in omega]
    assert torch.allclose(emb[token], torch.tensor(expected), atol=1e-7)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(6, 3)


def test_rope_rotates_pairs_and_keeps_norms() -> None:
    rope = VisionRoPE(dim=4, grid_size=2)  # head_dim 8
    x = torch.randn(1, 2, 4, 8)
    out = rope(x)
    pairs = lambda t: t.reshape(*t.shape[:-1], 4, 2).norm(dim=-1)  # noqa: E731
    assert torch.allclose(pairs(out), pairs(x), atol=1e-6)  # a rotation of each interleaved pair
    assert torch.allclose(out[:, :, 0], x[:, :, 0])  # token (0, 0): angle 0
    assert not torch.allclose(out[:, :, 3], x[:, :, 3])
    with pytest.raises(ValueError, match="even dim"):
        VisionRoPE(dim=3, grid_size=2)


def test_label_embedder_null_class_and_forced_drops() -> None:
    emb = LabelEmbedder(num_classes=3, hidden=4, dropout_prob=0.1)
    labels = torch.tensor([0, 1, 2])
    assert emb.embedding_table.num_embeddings == 4  # 3 classes + the null row
    dropped = emb.drop_labels(labels, train=False, force_drop_ids=torch.tensor([1, 0, 1]))
    assert dropped.tolist() == [3, 1, 3]
    assert torch.equal(emb.drop_labels(labels, train=False), labels)  # eval without forcing: untouched
    with pytest.raises(ValueError, match="labels' shape"):
        emb.drop_labels(labels, train=False, force_drop_ids=torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="null class"):
        LabelEmbedder(3, 4, 0.0).drop_labels(labels, train=False, force_drop_ids=torch.tensor([1, 0, 1]))
