"""Projection heads: map an encoder's output into a shared contrastive space, L2-normalised.

>>> import torch
>>> head = ProjectionHead(16, 8)
>>> z = head(torch.randn(3, 16))
>>> z.shape, bool(torch.allclose(z.norm(dim=-1), torch.ones(3)))
(torch.Size([3, 8]), True)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Module):
    """``Linear -> GELU -> Dropout -> Linear`` then L2 normalisation (or one ``Linear`` when ``hidden=0``).

    Args:
        d_in: encoder output size.
        d_out: size of the shared space (128 in both papers).
        hidden: hidden width of the MLP; ``None`` uses ``d_in``; ``0`` means a single linear map.
        dropout: dropout after the activation.
    """

    def __init__(self, d_in: int, d_out: int = 128, hidden: int | None = None, dropout: float = 0.1):
        super().__init__()
        if d_in <= 0 or d_out <= 0:
            raise ValueError(f"ProjectionHead needs positive sizes, got d_in={d_in}, d_out={d_out}")
        hidden = d_in if hidden is None else hidden
        self.d_in, self.d_out, self.hidden = d_in, d_out, hidden
        if hidden == 0:
            self.net = nn.Linear(d_in, d_out)
        else:
            self.net = nn.Sequential(
                nn.Linear(d_in, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, d_out)
            )

    @property
    def out_dim(self) -> int:
        return self.d_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_in:
            raise ValueError(f"ProjectionHead expects inputs of size {self.d_in}, got {tuple(x.shape)}")
        # Normalise in float32: bf16 autocast would otherwise compute the norm at low precision.
        return F.normalize(self.net(x).float(), dim=-1)
