"""A 1-D ResNet for 12-lead ECGs: ``[B, leads, T] -> [B, out_dim]`` at any length ``T``.

The architecture follows the residual CNNs used for ECGs in the literature (Ribeiro et al. 2020; the ECG
tower of Lalam et al. 2023): a strided stem convolution, stages of residual blocks that halve the time axis
and double the channels, then global average pooling over time so that one network accepts 5-s crops at
100 Hz (T=500) as readily as 10-s records at 500 Hz (T=5000).

>>> import torch
>>> enc = ECGResNet1d(ECGEncoderConfig(width=8, depth=(1, 1), out_dim=16))
>>> enc(torch.zeros(2, 12, 500)).shape
torch.Size([2, 16])
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn


@dataclass
class ECGEncoderConfig:
    """Shape of :class:`ECGResNet1d`; saved as JSON beside checkpoints.

    ``depth`` gives the number of residual blocks per stage; stage ``s`` has ``width * 2**s`` channels and
    its first block halves the time axis. ``out_dim=None`` returns the pooled features of the last stage
    (``width * 2**(len(depth)-1)`` wide); an integer adds a linear layer to that size.
    The defaults are small enough to train on a laptop CPU.
    """

    in_leads: int = 12
    width: int = 32
    depth: tuple[int, ...] = field(default=(1, 1, 1, 1))
    kernel: int = 7
    dropout: float = 0.1
    out_dim: int | None = 256

    def __post_init__(self) -> None:
        self.depth = tuple(int(d) for d in self.depth)  # JSON round-trips give lists
        if self.in_leads < 1 or self.width < 1:
            raise ValueError(
                f"ECGEncoderConfig: in_leads and width must be >= 1, got {self.in_leads}, {self.width}"
            )
        if not self.depth or any(d < 1 for d in self.depth):
            raise ValueError(f"ECGEncoderConfig.depth needs >= 1 stage of >= 1 block each, got {self.depth}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(
                f"ECGEncoderConfig.kernel must be odd (keeps 'same' padding exact), got {self.kernel}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ECGEncoderConfig.dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)


class ResidualBlock1d(nn.Module):
    """conv-BN-ReLU-dropout-conv-BN, plus a (strided 1x1 conv) shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, dropout: float) -> None:
        super().__init__()
        pad = kernel // 2
        self.conv1 = nn.Conv1d(c_in, c_out, kernel, stride=stride, padding=pad, bias=False)
        self.bn1 = nn.BatchNorm1d(c_out)
        self.conv2 = nn.Conv1d(c_out, c_out, kernel, padding=pad, bias=False)
        self.bn2 = nn.BatchNorm1d(c_out)
        self.drop = nn.Dropout(dropout)
        self.act = nn.ReLU(inplace=True)
        if stride != 1 or c_in != c_out:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv1d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm1d(c_out)
            )
        else:
            self.shortcut = nn.Identity()
        # Zero-init the last BN so each block starts as (almost) the identity: deeper nets train as
        # easily as shallow ones (Goyal et al. 2017).
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.act(self.bn1(self.conv1(x))))
        h = self.bn2(self.conv2(h))
        return self.act(h + self.shortcut(x))


class ECGResNet1d(nn.Module):
    """1-D ResNet ECG encoder. ``forward(x)`` takes ``[B, in_leads, T]`` (float) and returns ``[B, out_dim]``.

    Works at any ``T`` >= 1 thanks to global average pooling; the receptive field grows with depth, so
    very short inputs simply see the whole signal. ``.out_dim`` tells projection heads the output width.
    """

    def __init__(self, config: ECGEncoderConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ECGEncoderConfig()
        k = config.kernel
        self.stem = nn.Sequential(
            nn.Conv1d(config.in_leads, config.width, k, stride=2, padding=k // 2, bias=False),
            nn.BatchNorm1d(config.width),
            nn.ReLU(inplace=True),
        )
        stages = []
        c_in = config.width
        for s, n_blocks in enumerate(config.depth):
            c_out = config.width * 2**s
            blocks = [ResidualBlock1d(c_in, c_out, k, stride=2, dropout=config.dropout)]
            blocks += [
                ResidualBlock1d(c_out, c_out, k, stride=1, dropout=config.dropout)
                for _ in range(n_blocks - 1)
            ]
            stages.append(nn.Sequential(*blocks))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc: nn.Module = nn.Linear(c_in, config.out_dim) if config.out_dim is not None else nn.Identity()
        self.out_dim = config.out_dim if config.out_dim is not None else c_in
        for m in self.modules():
            if isinstance(m, nn.Conv1d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[1] != self.config.in_leads:
            raise ValueError(
                f"ECGResNet1d expects [batch, {self.config.in_leads} leads, time], got shape {tuple(x.shape)}"
            )
        h = self.stages(self.stem(x))
        return self.fc(self.pool(h).squeeze(-1))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Last-stage activations ``[B, C, T']`` before pooling (for saliency plots in notebooks)."""
        return self.stages(self.stem(x))
