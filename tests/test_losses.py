"""Contrastive losses: equal to naive per-row loops, symmetric, no torch.distributed in one process."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ehrclip_kit.distributed import gather_features
from ehrclip_kit.losses import ClipLoss, SigLipLoss, make_loss

torch.set_num_threads(1)


def _pair(n=7, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    b = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return a, b


def _naive_clip(a, b, scale):
    """One row at a time: -log softmax over the row, both directions, averaged."""
    n = a.shape[0]
    total_a = total_b = 0.0
    for i in range(n):
        row_a = [scale * float(a[i] @ b[j]) for j in range(n)]
        row_b = [scale * float(b[i] @ a[j]) for j in range(n)]
        total_a += -(row_a[i] - math.log(sum(math.exp(x) for x in row_a)))
        total_b += -(row_b[i] - math.log(sum(math.exp(x) for x in row_b)))
    return (total_a / n + total_b / n) / 2


def _naive_siglip(a, b, scale, bias):
    n = a.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            y = 1.0 if i == j else -1.0
            z = scale * float(a[i] @ b[j]) + bias
            total += math.log1p(math.exp(-y * z))  # -log sigmoid(y z)
    return total / n


@pytest.mark.parametrize("scale", [1.0, 1 / 0.07, 100.0])
def test_clip_loss_equals_naive_loop(scale):
    a, b = _pair()
    got = ClipLoss()(a, b, torch.tensor(scale, dtype=torch.float64))["contrastive_loss"]
    assert float(got) == pytest.approx(_naive_clip(a, b, scale), rel=1e-10)


def test_clip_loss_is_symmetric_and_not_trivially_constant():
    a, b = _pair(seed=3)
    s = torch.tensor(14.0, dtype=torch.float64)
    ab = ClipLoss()(a, b, s)["contrastive_loss"]
    ba = ClipLoss()(b, a, s)["contrastive_loss"]
    assert torch.allclose(ab, ba, atol=1e-12)
    # Shuffling b's rows breaks the pairing and must change the loss.
    shuffled = ClipLoss()(a, b[torch.tensor([1, 0, 2, 3, 4, 5, 6])], s)["contrastive_loss"]
    assert not torch.allclose(ab, shuffled)
    # Aligned pairs are easy: much lower loss than random pairs.
    assert ClipLoss()(a, a, s)["contrastive_loss"] < ab


def test_clip_loss_gradients_reach_both_sides_and_scale():
    a, b = _pair()
    a.requires_grad_(True)
    b.requires_grad_(True)
    log_scale = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    ClipLoss()(a, b, log_scale.exp())["contrastive_loss"].backward()
    for t in (a, b, log_scale):
        assert t.grad is not None and t.grad.abs().sum() > 0


@pytest.mark.parametrize("scale,bias", [(10.0, -10.0), (3.0, 0.5)])
def test_siglip_loss_equals_naive_loop_and_is_symmetric(scale, bias):
    a, b = _pair(n=6, seed=1)
    s = torch.tensor(scale, dtype=torch.float64)
    t = torch.tensor(bias, dtype=torch.float64)
    got = SigLipLoss()(a, b, s, t)["contrastive_loss"]
    assert float(got) == pytest.approx(_naive_siglip(a, b, scale, bias), rel=1e-10)
    assert torch.allclose(got, SigLipLoss()(b, a, s, t)["contrastive_loss"], atol=1e-12)


def test_siglip_needs_bias_and_losses_check_shapes():
    a, b = _pair()
    with pytest.raises(ValueError, match="logit_bias"):
        SigLipLoss()(a, b, torch.tensor(1.0))
    with pytest.raises(ValueError, match="same shape"):
        ClipLoss()(a, b[:, :3], torch.tensor(1.0))
    with pytest.raises(ValueError, match="unknown loss 'nce'"):
        make_loss("nce")
    assert isinstance(make_loss("siglip"), SigLipLoss)


def test_single_process_never_touches_torch_distributed(monkeypatch):
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_fn

    def boom(*args, **kwargs):
        raise AssertionError("torch.distributed was called with world_size 1")

    for name in ("all_gather", "all_reduce", "get_rank", "get_world_size", "is_initialized"):
        monkeypatch.setattr(dist, name, boom)
    monkeypatch.setattr(dist_fn, "all_gather", boom)
    a, b = _pair()
    assert gather_features(a, b, rank=0, world_size=1)[0] is a
    s = torch.tensor(5.0, dtype=torch.float64)
    for loss in (ClipLoss(local_loss=True), ClipLoss(gather_with_grad=False), SigLipLoss()):
        loss(a, b, s, torch.tensor(-1.0, dtype=torch.float64))
    # local_loss makes no difference in one process.
    assert torch.allclose(
        ClipLoss(local_loss=True)(a, b, s)["contrastive_loss"], ClipLoss()(a, b, s)["contrastive_loss"]
    )
