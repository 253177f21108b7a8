"""12-lead ECG waveforms: WFDB reading, canonical lead order, resampling, filtering, crops, a torch Dataset.

MIMIC-IV-ECG stores its leads as I, II, III, aVR, aVF, aVL, V1-V6 while PTB-XL stores I, II, III, AVR,
AVL, AVF, V1-V6; every array this module returns is in one canonical order (``CANONICAL_LEADS``), found
by name from each record's header, never by position.

>>> import numpy as np
>>> x = np.arange(24, dtype=np.float32).reshape(2, 12)
>>> center_crop(x, 4).tolist()
[[4.0, 5.0, 6.0, 7.0], [16.0, 17.0, 18.0, 19.0]]
>>> lead_order(["I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6"])[3:6]
[3, 4, 5]
>>> lead_order(["I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6"])[3:6]
[3, 5, 4]
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import wfdb
from scipy.signal import butter, resample_poly, sosfiltfilt

CANONICAL_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
NORMALISATIONS = ("per_lead", "per_record", "none")


@dataclass
class ECGConfig:
    """How waveforms become model inputs.

    fs: target sampling rate (Hz); 100 keeps a 1-D CNN cheap on a CPU, the papers use 250-500.
    crop_seconds: length of the training/evaluation window cut from each 10-s record.
    highpass / lowpass: band-pass edges (Hz) of a zero-phase Butterworth filter (``None`` disables an edge);
    0.5 Hz removes baseline wander, 40 Hz mains hum and muscle noise.
    normalise: "per_lead" z-scores each lead over the record, "per_record" uses one mean/std, "none" keeps mV.
    """

    fs: int = 100
    crop_seconds: float = 5.0
    highpass: float | None = 0.5
    lowpass: float | None = 40.0
    filter_order: int = 3
    normalise: str = "per_lead"
    leads: tuple[str, ...] = CANONICAL_LEADS

    def __post_init__(self):
        if self.normalise not in NORMALISATIONS:
            raise ValueError(f"ECGConfig.normalise must be one of {NORMALISATIONS}, got {self.normalise!r}")
        self.leads = tuple(self.leads)

    @property
    def crop_len(self) -> int:
        """Samples per crop at the target rate."""
        return int(round(self.crop_seconds * self.fs))

    def to_dict(self) -> dict:
        return asdict(self)


def lead_order(sig_names, leads=CANONICAL_LEADS) -> list[int]:
    """Indices into ``sig_names`` that put the record's leads in ``leads`` order (names case-insensitive)."""
    position = {str(name).strip().lower(): i for i, name in enumerate(sig_names)}
    missing = [lead for lead in leads if lead.lower() not in position]
    if missing:
        raise KeyError(f"record has no lead(s) {missing}; its header lists {list(sig_names)}")
    return [position[lead.lower()] for lead in leads]


def _record_name(path) -> str:
    """WFDB wants the record name without extension; accept 'x', 'x.hea' or 'x.dat'."""
    path = Path(path)
    return str(path.with_suffix("")) if path.suffix in (".hea", ".dat") else str(path)


_GAIN = re.compile(r"^([-+\d.eE]+)(?:\((-?\d+)\))?(?:/\S+)?$")


def _read_format16(name: str) -> tuple[np.ndarray, float, list[str]] | None:
    """Fast reader for the common case (one .dat file, format 16, no skew or offset); None otherwise.

    ``wfdb.rdrecord`` spends ~35 ms a record parsing the header through pandas; this reads the same
    header fields and samples in well under 1 ms and returns exactly what ``rdrecord`` returns
    (``tests/test_ecg_data.py`` compares them on PTB-XL and synthetic records).
    """
    lines = [ln.split() for ln in Path(f"{name}.hea").read_text().splitlines() if ln.strip() and ln[0] != "#"]
    head, specs = lines[0], lines[1:]
    if len(head) < 4 or "/" in head[0] or not head[1].isdigit() or int(head[1]) != len(specs) or not specs:
        return None  # multi-segment record, missing length, or lines we do not expect
    if any(len(s) < 3 or s[1] != "16" or s[0] != specs[0][0] for s in specs):
        return None
    fs = float(re.split(r"[/(]", head[2])[0])
    gains, baselines, names = [], [], []
    for s in specs:
        match = _GAIN.match(s[2])
        if match is None:
            return None
        gain = float(match.group(1)) or 200.0  # WFDB: a gain of 0 means the default, 200
        zero = int(s[4]) if len(s) > 4 else 0
        gains.append(gain)
        baselines.append(int(match.group(2)) if match.group(2) is not None else zero)
        names.append(" ".join(s[8:]) if len(s) > 8 else "")
    n_sig, sig_len = len(specs), int(head[3])
    digital = np.fromfile(Path(name).parent / specs[0][0], dtype="<i2")
    if digital.size != n_sig * sig_len:
        raise ValueError(f"{name}.dat holds {digital.size} samples, the header promises {n_sig} x {sig_len}")
    digital = digital.reshape(sig_len, n_sig).T
    signal = (digital - np.asarray(baselines, float)[:, None]) / np.asarray(gains)[:, None]
    signal[digital == -32768] = np.nan  # format 16's "missing sample" value
    return signal.astype(np.float32), fs, names


def read_record(path) -> tuple[np.ndarray, float, list[str]]:
    """Read a WFDB record as (signal [n_leads, T] float32 in mV, sampling rate, lead names in file order).

    Format-16 records take a fast path; anything else goes through ``wfdb.rdrecord``. Samples stored as
    the format's "missing" value come back as NaN (see :func:`validate_ecg`).
    """
    name = _record_name(path)
    fast = _read_format16(name)
    if fast is not None:
        return fast
    record = wfdb.rdrecord(name)
    if record.p_signal is None:
        raise ValueError(f"{path}: WFDB record has no physical signal")
    return record.p_signal.T.astype(np.float32), float(record.fs), list(record.sig_name)


def resample(x: np.ndarray, fs_in: float, fs_out: float) -> np.ndarray:
    """Polyphase resampling along the last axis (anti-aliased), e.g. 500 Hz -> 100 Hz keeps 1 sample in 5."""
    if fs_in == fs_out:
        return x
    ratio = Fraction(fs_out / fs_in).limit_denominator(1000)
    return resample_poly(x, ratio.numerator, ratio.denominator, axis=-1).astype(np.float32)


def bandpass(
    x: np.ndarray, fs: float, highpass: float | None = 0.5, lowpass: float | None = 40.0, order: int = 3
) -> np.ndarray:
    """Zero-phase Butterworth band-pass (``scipy.signal.sosfiltfilt``) along the last axis.

    A ``lowpass`` at or above Nyquist is lowered to 0.45 * fs, so one config works at 100 and 500 Hz.
    """
    if lowpass is not None and lowpass >= fs / 2:
        lowpass = 0.45 * fs
    if highpass and lowpass:
        sos = butter(order, [highpass, lowpass], btype="bandpass", fs=fs, output="sos")
    elif highpass:
        sos = butter(order, highpass, btype="highpass", fs=fs, output="sos")
    elif lowpass:
        sos = butter(order, lowpass, btype="lowpass", fs=fs, output="sos")
    else:
        return x
    return sosfiltfilt(sos, x, axis=-1).astype(np.float32)


def normalise(x: np.ndarray, mode: str = "per_lead", eps: float = 1e-6) -> np.ndarray:
    """Z-score per lead (default) or per record; a flat lead stays at zero instead of dividing by 0.

    >>> normalise(np.array([[1.0, 3.0], [5.0, 5.0]])).tolist()
    [[-1.0, 1.0], [0.0, 0.0]]
    """
    if mode == "none":
        return x.astype(np.float32)
    axis = -1 if mode == "per_lead" else None
    mean = x.mean(axis=axis, keepdims=True)
    std = x.std(axis=axis, keepdims=True)
    return ((x - mean) / np.maximum(std, eps)).astype(np.float32)


def preprocess(x: np.ndarray, fs: float, config: ECGConfig) -> np.ndarray:
    """Band-pass filter then normalise, as ``config`` says."""
    x = bandpass(x, fs, config.highpass, config.lowpass, config.filter_order)
    return normalise(x, config.normalise)


def read_ecg(path, target_fs: float | None = 100, leads=CANONICAL_LEADS, config: ECGConfig | None = None):
    """Read a record as float32 [len(leads), T] in ``leads`` order at ``target_fs`` (None: native rate).

    Without ``config`` the values stay in mV; with it they are also filtered and normalised
    (``read_ecg(path, cfg.fs, cfg.leads, cfg)`` is the full model-input pipeline before cropping).
    """
    x, fs, names = read_record(path)
    x = x[lead_order(names, leads)]
    if target_fs is not None:
        x = resample(x, fs, target_fs)
        fs = target_fs
    return preprocess(x, fs, config) if config is not None else x


def random_crop(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """A random window of ``n`` samples (zero-padded at the end when the record is shorter)."""
    if x.shape[-1] <= n:
        return _pad(x, n)
    start = int(rng.integers(0, x.shape[-1] - n + 1))
    return x[..., start : start + n]


def center_crop(x: np.ndarray, n: int) -> np.ndarray:
    """The middle ``n`` samples (zero-padded at the end when the record is shorter)."""
    if x.shape[-1] <= n:
        return _pad(x, n)
    start = (x.shape[-1] - n) // 2
    return x[..., start : start + n]


def _pad(x: np.ndarray, n: int) -> np.ndarray:
    width = [(0, 0)] * (x.ndim - 1) + [(0, n - x.shape[-1])]
    return np.pad(x, width)


def validate_ecg(
    signal, n_leads: int = 12, min_samples: int | None = None, flat_tol: float = 1e-3
) -> str | None:
    """Why a waveform is unusable ("wrong_shape", "nan_samples", "flat_lead"), or None when it is fine.

    A lead is flat when its peak-to-peak range is at most ``flat_tol`` mV (a disconnected electrode).

    >>> validate_ecg(np.ones((12, 10))) , validate_ecg(np.ones((11, 10)))
    ('flat_lead', 'wrong_shape')
    """
    if not isinstance(signal, np.ndarray) or signal.ndim != 2 or signal.shape[0] != n_leads:
        return "wrong_shape"
    if signal.shape[1] == 0 or (min_samples is not None and signal.shape[1] < min_samples):
        return "wrong_shape"
    if not np.isfinite(signal).all():
        return "nan_samples"
    if (np.ptp(signal, axis=1) <= flat_tol).any():
        return "flat_lead"
    return None


class ECGDataset(torch.utils.data.Dataset):
    """ECGs of an index frame (``ehrclip ecg-index`` output) as float32 tensors [n_leads, crop_len].

    Training draws a random crop, deterministic in (seed, epoch, item) so every worker and a resumed run
    see the same crops (call :meth:`set_epoch` each epoch); evaluation takes the centre crop.
    ``cache=True`` keeps each preprocessed 10-s record in memory after its first read (~48 kB at 100 Hz).
    """

    def __init__(
        self,
        index_frame: pd.DataFrame,
        root,
        config: ECGConfig | None = None,
        train: bool = False,
        cache: bool = False,
        seed: int = 0,
        path_column: str = "path",
    ):
        if path_column not in index_frame.columns:
            raise KeyError(f"ECG index has no {path_column!r} column (columns: {list(index_frame.columns)})")
        self.paths = index_frame[path_column].astype(str).tolist()
        self.root = Path(root)
        self.config = config or ECGConfig()
        self.train, self.seed, self.epoch = train, seed, 0
        self._cache: dict[int, np.ndarray] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def full_record(self, i: int) -> np.ndarray:
        """The whole preprocessed record (before cropping)."""
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        cfg = self.config
        x = read_ecg(self.root / self.paths[i], cfg.fs, cfg.leads, cfg)
        if self._cache is not None:
            self._cache[i] = x
        return x

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.full_record(i)
        if self.train:
            x = random_crop(x, self.config.crop_len, np.random.default_rng([self.seed, self.epoch, i]))
        else:
            x = center_crop(x, self.config.crop_len)
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
