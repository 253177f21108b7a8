"""Contrastive losses as pure modules (open_clip convention).

A loss takes two towers' L2-normalised embeddings of the *same* pairs (row i of ``a`` belongs with row i of
``b``) and a temperature, and returns a dict of named terms. It knows nothing about the training loop; the
model owns the learnable temperature and passes it in already exponentiated:

    logit_scale = model.logit_scales[space].exp()     # the parameter lives in log space
    loss(a, b, logit_scale)["contrastive_loss"]

In a distributed run the loss gathers the other processes' embeddings (``ehrclip_kit.distributed``) so that
every pair in the global batch is a negative; with ``world_size == 1`` it never touches ``torch.distributed``.

>>> import torch, torch.nn.functional as F
>>> a = F.normalize(torch.randn(4, 8), dim=-1)
>>> out = ClipLoss()(a, a, torch.tensor(100.0))
>>> bool(out["contrastive_loss"] < 0.1)     # identical towers, sharp temperature: pairs are easy
True
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ehrclip_kit.distributed import gather_features


class ClipLoss(nn.Module):
    """Symmetric InfoNCE: ``(CE(s·a@bᵀ, i) + CE(s·b@aᵀ, i)) / 2`` over the (global) batch.

    Args:
        local_loss: in a distributed run, compute only this rank's rows of the logit matrix (local
            features against all gathered ones), with labels offset by ``rank * B``. Memory O(B·N) instead of
            O(N²); averaged over ranks it equals the global loss.
        gather_with_grad: gather with autograd (see ``gather_features``); needed for exact gradients.
        rank, world_size: this process's place in the run; the model's ``configure_distributed`` sets them.
    """

    def __init__(
        self, local_loss: bool = False, gather_with_grad: bool = True, rank: int = 0, world_size: int = 1
    ):
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.rank = rank
        self.world_size = world_size

    def get_logits(
        self, a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of a-against-b and b-against-a (rows = queries)."""
        if self.world_size > 1:
            all_a, all_b = gather_features(
                a, b, self.rank, self.world_size, self.gather_with_grad, self.local_loss
            )
            if self.local_loss:
                return logit_scale * a @ all_b.T, logit_scale * b @ all_a.T
            logits_a = logit_scale * all_a @ all_b.T
            return logits_a, logits_a.T
        return logit_scale * a @ b.T, logit_scale * b @ a.T

    def labels(self, n_rows: int, device: torch.device) -> torch.Tensor:
        """Index of each row's positive among the columns."""
        labels = torch.arange(n_rows, device=device, dtype=torch.long)
        if self.world_size > 1 and self.local_loss:
            labels = labels + n_rows * self.rank
        return labels

    def forward(
        self,
        a_features: torch.Tensor,
        b_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Return ``{"contrastive_loss": scalar}``. ``logit_scale`` is exp(log-parameter); bias is ignored."""
        _check_pair(a_features, b_features)
        logits_a, logits_b = self.get_logits(a_features, b_features, logit_scale)
        labels = self.labels(logits_a.shape[0], logits_a.device)
        loss = (F.cross_entropy(logits_a, labels) + F.cross_entropy(logits_b, labels)) / 2
        return {"contrastive_loss": loss}


class SigLipLoss(nn.Module):
    """Sigmoid pairwise loss (Zhai et al., 2023): every pair is an independent binary problem.

    ``loss = -Σ_ij log σ(y_ij (s·a_i·b_j + bias)) / B`` with ``y_ij = +1`` on matching pairs and ``-1``
    elsewhere. Needs a learnable ``logit_bias`` (the model creates one per space, initialised to
    ``init_logit_bias = -10``; the paper also starts the scale at ``init_logit_scale = log(10)``).

    Distributed: the local ``a`` rows are scored against the gathered ``b`` (simple all-gather of the
    negatives). The mean of the per-rank losses equals the loss of one process on the concatenated batch.
    The loss is symmetric in a and b (the label matrix is symmetric), so one direction suffices.
    """

    init_logit_scale = math.log(10.0)
    init_logit_bias = -10.0
    uses_bias = True

    def __init__(
        self, gather_with_grad: bool = True, rank: int = 0, world_size: int = 1, local_loss: bool = True
    ):
        super().__init__()
        # local_loss is accepted for a uniform signature; SigLIP always computes its local rows.
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.rank = rank
        self.world_size = world_size

    def forward(
        self,
        a_features: torch.Tensor,
        b_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Return ``{"contrastive_loss": scalar}``; ``logit_bias`` is required."""
        if logit_bias is None:
            raise ValueError("SigLipLoss needs a logit_bias (the model creates one per SigLIP space)")
        _check_pair(a_features, b_features)
        n = a_features.shape[0]
        all_b = b_features
        if self.world_size > 1:
            _, all_b = gather_features(
                a_features, b_features, self.rank, self.world_size, self.gather_with_grad
            )
        logits = logit_scale * a_features @ all_b.T + logit_bias
        signs = -torch.ones_like(logits)
        offset = n * self.rank if self.world_size > 1 else 0
        idx = torch.arange(n, device=logits.device)
        signs[idx, idx + offset] = 1.0
        loss = -F.logsigmoid(signs * logits).sum() / n
        return {"contrastive_loss": loss}


LOSSES: dict[str, type[nn.Module]] = {"clip": ClipLoss, "siglip": SigLipLoss}


def make_loss(name: str, **kwargs) -> nn.Module:
    """Build a loss by name: ``"clip"`` or ``"siglip"``."""
    try:
        return LOSSES[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}") from None


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.ndim != 2 or b.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"contrastive loss needs two (batch, dim) tensors of the same shape; got {tuple(a.shape)} and "
            f"{tuple(b.shape)} (project both towers to the same dimension)"
        )
