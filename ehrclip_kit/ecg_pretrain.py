"""ECG <-> codes <-> text pretraining (Lalam et al., TMLR 2023) on an ``ehrclip ecg-index`` folder.

Three presets, all built from the general factories of :mod:`ehrclip_kit.models` and trained by the
general :class:`~ehrclip_kit.training.Trainer` (no ECG-specific model class):

* ``ecg-codes``: :func:`~ehrclip_kit.models.pair_model` (ECG ResNet, sEHR-BERT over the codes within +-1 year);
* ``ecg-text``: :func:`~ehrclip_kit.models.pair_model` (ECG ResNet, cached text vectors);
* ``ecg-fac``: :func:`~ehrclip_kit.models.fac_model`: ECG and codes meet in the *fine* space, the ECG's
  fine embedding is projected on into the *coarse* space where the text meets it; loss = fine + coarse.

Inputs are the ECG index folder (``ecg_index.parquet``, ``ecg_index.json`` whose ``root`` locates the
waveforms, ``ecg_codes.parquet``, ``code_vocab.json`` fitted on the train split, ``ecg_text.parquet``).
Pretraining reads the **train split only**; the validation split gives the per-epoch losses and recall@k.

Text modes (``EcgPretrainConfig.text_mode``), embedded once by the frozen offline MiniLM and cached:
``report`` (the paper's report concatenation: the ECG's machine statements plus the discharge notes within
+-1 month; the two are embedded separately and averaged, so the statements weigh as much as the notes),
``entity`` (clinical terms within +-1 year), ``machine`` (machine statements only: cheap, for CPU demos).

>>> cfg = ecg_preset("ecg-fac")
>>> cfg.ecg.fs, cfg.ecg.crop_seconds, modalities(cfg.preset)
(100, 5.0, ('ecg', 'codes', 'text'))
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ehrclip_kit.config import from_dict, to_dict
from ehrclip_kit.data.ecg import ECGConfig, ECGDataset, center_crop, random_crop
from ehrclip_kit.encoders.codes import CodesEncoder, CodesEncoderConfig, collate_codes, encode_code_sequence
from ehrclip_kit.encoders.ecg import ECGEncoderConfig, ECGResNet1d
from ehrclip_kit.io import write_json
from ehrclip_kit.training import TrainConfig

PRESETS = ("ecg-fac", "ecg-codes", "ecg-text")
TEXT_MODES = ("report", "entity", "machine")
WAVES_VERSION = "ecg-waves/v1"  # bump when load_waveforms' output changes


@dataclass
class EcgPretrainConfig:
    """Everything that defines an ECG pretraining run (saved as ``ecg_pretrain_config.json``).

    Defaults are CPU-sized (a few minutes on a laptop for a few thousand ECGs); for the paper's scale widen
    ``ecg_encoder`` and ``codes`` and train longer on a GPU. ``codes`` holds overrides of
    :class:`~ehrclip_kit.encoders.codes.CodesEncoderConfig` (its vocabulary size comes from the index).
    """

    preset: str = "ecg-fac"
    ecg: ECGConfig = field(default_factory=ECGConfig)  # 100 Hz, 5-s crops, band-pass, per-lead z-score
    ecg_encoder: ECGEncoderConfig = field(
        default_factory=lambda: ECGEncoderConfig(width=16, depth=(1, 1, 1), out_dim=128)
    )
    codes: dict[str, Any] = field(
        default_factory=lambda: {"hidden": 64, "layers": 2, "heads": 4, "intermediate": 128, "max_len": 64}
    )
    codes_pretrain_epochs: int = 0  # masked-code pretraining of the sEHR-BERT before alignment (0: none)
    text_mode: str = "report"
    text_model: str | None = None  # local folder or hub id; None: the offline MiniLM
    text_max_chunks: int | None = 2  # 256-token chunks embedded per note (None: all, as in the paper)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=12, batch_size=64, lr=1e-3))
    proj_dim: int = 128  # fine space (and the single space of the pair models)
    coarse_dim: int = 128
    proj_hidden: int | None = None
    loss: str = "clip"
    space_weights: tuple[float, float] = (1.0, 1.0)  # FAC: (fine, coarse)
    record_seconds: float = 10.0  # records are padded / cut to this length once loaded
    seed: int = 0
    cache_dir: str | None = None
    progress: bool = True

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"EcgPretrainConfig.preset must be one of {PRESETS}, got {self.preset!r}")
        if self.text_mode not in TEXT_MODES:
            raise ValueError(
                f"EcgPretrainConfig.text_mode must be one of {TEXT_MODES}, got {self.text_mode!r}"
            )


def ecg_preset(name: str, **overrides) -> EcgPretrainConfig:
    """The CPU-sized config of preset ``name`` (``ecg-fac``, ``ecg-codes``, ``ecg-text``) with field overrides."""
    return EcgPretrainConfig(preset=name, **overrides)


def modalities(preset: str) -> tuple[str, ...]:
    """Batch keys a preset's model reads."""
    known = {"ecg-fac": ("ecg", "codes", "text"), "ecg-codes": ("ecg", "codes"), "ecg-text": ("ecg", "text")}
    return known[preset]


# ------------------------------------------------------------------------------------------ the index
def read_index(index_dir, root=None) -> tuple[pd.DataFrame, Path]:
    """``ecg_index.parquet`` of an ``ehrclip ecg-index`` folder and the folder its paths are relative to.

    ``root`` may be the ECG folder itself or a world / MIMIC root holding ``ecg/``; ``None`` reads the
    ``root`` recorded in ``ecg_index.json``.
    """
    index_dir = Path(index_dir)
    path = index_dir / "ecg_index.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: point --cohort at an `ehrclip ecg-index` output folder")
    frame = pd.read_parquet(path)
    for column in ("ecg_id", "subject_id", "path", "split", "report"):
        if column not in frame.columns:
            raise KeyError(f"column {column!r} missing from {path}")
    if root is None:
        meta = index_dir / "ecg_index.json"
        if not meta.exists():
            raise FileNotFoundError(f"{meta} not found and no waveform root given")
        root = json.loads(meta.read_text())["root"]
    root = Path(root)
    first = frame["path"].iloc[0] if len(frame) else None
    for candidate in (root, root / "ecg"):
        if first is None or (candidate / f"{first}.hea").exists():
            return frame, candidate
    raise FileNotFoundError(f"waveform {first}.hea is neither under {root} nor under {root / 'ecg'}")


def ecg_texts(index_dir, frame: pd.DataFrame, mode: str) -> tuple[list[str], list[str] | None]:
    """The two text parts of each ECG for ``mode``: (primary texts, notes or None).

    ``report``: (machine statements, notes within +-1 month); ``entity``: (entity text, None);
    ``machine``: (machine statements, None). Without ``ecg_text.parquet`` (PTB-XL, or MIMIC-IV-ECG without
    a hosp folder) only ``machine`` and ``report`` work, both from the machine statements alone.
    """
    if mode not in TEXT_MODES:
        raise ValueError(f"text mode must be one of {TEXT_MODES}, got {mode!r}")
    machine = frame["report"].fillna("").astype(str).tolist()
    path = Path(index_dir) / "ecg_text.parquet"
    if mode == "machine":
        return machine, None
    if not path.exists():
        if mode == "entity":
            raise FileNotFoundError(f"text mode 'entity' needs {path} (ecg-index with a hosp folder)")
        return machine, None
    text = frame[["ecg_id"]].merge(pd.read_parquet(path), on="ecg_id", how="left")
    if mode == "entity":
        return text["entity_text"].fillna("").astype(str).tolist(), None
    notes = text["report_text"].fillna("").astype(str).tolist() if "report_text" in text else None
    return machine, notes


def embed_text_vectors(texts: list[str], config: EcgPretrainConfig) -> np.ndarray:
    """Frozen text-model vectors (MiniLM unless ``config.text_model``) of ``texts``; each distinct text is
    embedded once and the result cached on disk (:func:`ehrclip_kit.text_cache.cached_note_embeddings`)."""
    from ehrclip_kit.encoders.text import TextEncoderConfig
    from ehrclip_kit.text_cache import cached_note_embeddings

    unique, inverse = np.unique(np.asarray(texts, dtype=object).astype(str), return_inverse=True)
    text_cfg = TextEncoderConfig(model=config.text_model, max_chunks=config.text_max_chunks)
    frame = pd.DataFrame({"text": unique})
    vectors = cached_note_embeddings(
        frame, config.text_model, config.cache_dir, text_cfg, progress=config.progress
    )
    return np.asarray(vectors, dtype=np.float32)[inverse]


def text_vectors(index_dir, frame: pd.DataFrame, config: EcgPretrainConfig) -> np.ndarray:
    """Cached text vectors ``[len(frame), d]`` for ``config.text_mode`` (report: mean of statements and notes)."""
    primary, notes = ecg_texts(index_dir, frame, config.text_mode)
    vectors = embed_text_vectors(primary, config)
    if notes is not None:
        has = np.array([bool(t.strip()) for t in notes])
        if has.any():
            note_vecs = embed_text_vectors([t for t, h in zip(notes, has, strict=True) if h], config)
            vectors[has] = 0.5 * (vectors[has] + note_vecs)
    return vectors


def code_triples(index_dir, frame: pd.DataFrame, vocab, n_time_buckets: int) -> list[tuple]:
    """``(ids, types, time_buckets)`` per ECG from ``ecg_codes.parquet`` (empty for ECGs without codes)."""
    path = Path(index_dir) / "ecg_codes.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the codes presets need ecg-index run with a hosp folder")
    seqs = frame[["ecg_id"]].merge(pd.read_parquet(path)[["ecg_id", "tokens", "deltas_days"]], how="left")
    out = []
    for tokens, deltas in zip(seqs["tokens"], seqs["deltas_days"], strict=True):
        tokens = [] if tokens is None or (isinstance(tokens, float)) else list(tokens)
        deltas = [] if deltas is None or (isinstance(deltas, float)) else list(deltas)
        out.append(encode_code_sequence(tokens, deltas, vocab, n_time_buckets))
    return out


def load_waveforms(frame: pd.DataFrame, root, config: ECGConfig, record_seconds: float = 10.0,
                   cache_dir=None, progress: bool = True) -> np.ndarray:  # fmt: skip
    """Every record of ``frame`` preprocessed at ``config.fs`` in one float32 array ``[n, leads, T]``.

    Read once with :func:`ehrclip_kit.data.ecg.read_ecg` (canonical lead order, resampling, band-pass,
    normalisation), padded or cut to ``record_seconds``, and cached on disk keyed by the files' sizes and
    modification times and the config, so a second run (or notebook re-execution) skips the WFDB reads.
    """
    from ehrclip_kit.cache import disk_cache

    root = Path(root)
    n_samples = int(round(record_seconds * config.fs))
    stats = [(p, *(lambda s: (s.st_size, s.st_mtime_ns))((root / f"{p}.dat").stat())) for p in frame["path"]]

    def compute() -> np.ndarray:
        reader = ECGDataset(frame, root, config)
        out = np.zeros((len(frame), len(config.leads), n_samples), np.float32)
        for i in tqdm(range(len(frame)), desc="loading ECGs", unit="ecg", disable=not progress):
            x = reader.full_record(i)[:, :n_samples]
            out[i, :, : x.shape[1]] = x
        return out

    key = {"what": WAVES_VERSION, "root": str(root.resolve()), "files": stats, "config": config, "n": n_samples}  # fmt: skip
    return disk_cache(cache_dir, key, compute, name="ecg-waves")


class EcgPairs(Dataset):
    """Aligned ECG crops, code sequences and text vectors of one split, all held in memory.

    Items are ``{"ecg": [leads, crop_len], "codes": (ids, types, buckets), "text": [d]}`` restricted to
    ``modalities``; :meth:`collate` batches them into what a ContrastiveModel takes. ``train=True`` draws
    a random crop that depends only on (seed, epoch, item), so resumed runs see the same crops
    (:meth:`set_epoch`, called by :class:`EpochCallback`); otherwise the centre crop.
    """

    def __init__(self, frame: pd.DataFrame, waves: np.ndarray, config: ECGConfig, codes=None, text=None,
                 train: bool = False, seed: int = 0, modalities=("ecg",), codes_max_len: int = 128):  # fmt: skip
        if len(waves) != len(frame):
            raise ValueError(f"EcgPairs: {len(waves)} waveforms for {len(frame)} index rows")
        for name, part in (("codes", codes), ("text", text)):
            if name in modalities and (part is None or len(part) != len(frame)):
                raise ValueError(f"EcgPairs: modality {name!r} requested but not given for every row")
        self.frame, self.waves, self.config = frame.reset_index(drop=True), waves, config
        self.codes, self.text, self.modalities = codes, text, tuple(modalities)
        self.train, self.seed, self.epoch, self.codes_max_len = train, seed, 0, codes_max_len

    def __len__(self) -> int:
        return len(self.frame)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def crop(self, i: int) -> np.ndarray:
        n = self.config.crop_len
        if self.train:
            return random_crop(self.waves[i], n, np.random.default_rng([self.seed, self.epoch, i]))
        return center_crop(self.waves[i], n)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"ecg": torch.from_numpy(np.ascontiguousarray(self.crop(i)))}
        if "codes" in self.modalities:
            item["codes"] = self.codes[i]
        if "text" in self.modalities:
            item["text"] = torch.from_numpy(self.text[i])
        return item

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {"ecg": torch.stack([it["ecg"] for it in items])}
        if "codes" in self.modalities:
            batch["codes"] = collate_codes([it["codes"] for it in items], max_len=self.codes_max_len)
        if "text" in self.modalities:
            batch["text"] = torch.stack([it["text"] for it in items])
        return batch

    def subset(self, rows, train: bool | None = None) -> EcgPairs:
        """The same data restricted to positions ``rows`` (e.g. a label-scarce training set)."""
        rows = np.asarray(rows, dtype=np.int64)
        codes = None if self.codes is None else [self.codes[i] for i in rows]
        return EcgPairs(
            self.frame.iloc[rows], self.waves[rows], self.config, codes,
            None if self.text is None else self.text[rows], self.train if train is None else train, self.seed,
            self.modalities, self.codes_max_len,
        )  # fmt: skip


class EpochCallback:
    """Trainer callback keeping the dataset's crop epoch equal to the trainer's (also after a resume)."""

    def __init__(self, dataset: EcgPairs):
        self.dataset = dataset

    def on_train_begin(self, trainer) -> None:
        self.dataset.set_epoch(trainer.epoch)

    def on_epoch_end(self, trainer, record) -> None:
        self.dataset.set_epoch(trainer.epoch)


def load_vocab(index_dir):
    from ehrclip_kit.data.codes import CodeVocab

    path = Path(index_dir) / "code_vocab.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the codes presets need ecg-index run with a hosp folder")
    return CodeVocab.load(path)


def build_ecg_dataset(index_dir, world_or_mimic_root=None, config: EcgPretrainConfig | None = None,
                      split: str = "train", vocab=None, drop_empty: bool = True,
                      only: Sequence[str] | None = None) -> EcgPairs:  # fmt: skip
    """The ``split`` rows of an ECG index as an :class:`EcgPairs` with the modalities of ``config.preset``.

    Random crops for ``split == "train"``, centre crops otherwise. With ``drop_empty`` ECGs without any
    code (codes presets) or with an empty text (text presets) are left out: an empty side is the same for
    every such ECG and would pair with all of them. ``only`` restricts the modalities loaded (e.g.
    ``("ecg",)`` for every ECG of the test split, whatever its codes and texts).
    """
    config = config or EcgPretrainConfig()
    frame, root = read_index(index_dir, world_or_mimic_root)
    frame = frame[frame["split"] == split].reset_index(drop=True)
    mods = tuple(only) if only is not None else modalities(config.preset)
    codes = text = None
    keep = np.ones(len(frame), dtype=bool)
    if "codes" in mods:
        vocab = vocab if vocab is not None else load_vocab(index_dir)
        codes_cfg = CodesEncoderConfig.for_vocab(vocab, **config.codes)
        codes = code_triples(index_dir, frame, vocab, codes_cfg.n_time_buckets)
        if drop_empty:
            keep &= np.array([len(c[0]) > 0 for c in codes])
    if "text" in mods:
        primary, notes = ecg_texts(index_dir, frame, config.text_mode)
        has_text = np.array([bool(t.strip()) for t in primary])
        if notes is not None:
            has_text |= np.array([bool(t.strip()) for t in notes])
        if drop_empty:
            keep &= has_text
    rows = np.flatnonzero(keep)
    frame = frame.iloc[rows].reset_index(drop=True)
    if codes is not None:
        codes = [codes[i] for i in rows]
    if len(frame) == 0:  # e.g. a tiny cohort without validation patients
        n = int(round(config.record_seconds * config.ecg.fs))
        waves, text = np.zeros((0, len(config.ecg.leads), n), np.float32), np.zeros((0, 0), np.float32)
    else:
        waves = load_waveforms(
            frame, root, config.ecg, config.record_seconds, config.cache_dir, config.progress
        )
        text = text_vectors(index_dir, frame, config) if "text" in mods else None
    return EcgPairs(frame, waves, config.ecg, codes, text, split == "train", config.seed, mods,
                    config.codes.get("max_len", 64))  # fmt: skip


# ------------------------------------------------------------------------------------------- the model
def build_model(config: EcgPretrainConfig, vocab=None, d_text: int = 384):
    """The preset's ContrastiveModel from the general factories, seeded by ``config.seed``.

    ``ecg-codes`` / ``ecg-text``: :func:`~ehrclip_kit.models.pair_model` (space ``ecg_codes`` / ``ecg_text``,
    heads ``ecg_proj`` and ``codes_proj`` / ``text_proj``); ``ecg-fac``: :func:`~ehrclip_kit.models.fac_model`
    (spaces ``fine`` and ``coarse``). The text side takes cached vectors of size ``d_text``.
    """
    from ehrclip_kit.models import fac_model, pair_model
    from ehrclip_kit.text_cache import CachedTextEncoder

    mods = modalities(config.preset)
    if "codes" in mods and vocab is None:
        raise ValueError(f"preset {config.preset!r} needs the code vocabulary")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        ecg = ECGResNet1d(config.ecg_encoder)
        codes = CodesEncoder(CodesEncoderConfig.for_vocab(vocab, **config.codes)) if "codes" in mods else None
        text = CachedTextEncoder(d_text)
        common = {"loss": config.loss, "hidden": config.proj_hidden}
        if config.preset == "ecg-fac":
            return fac_model(ecg, codes, text, ecg.out_dim, codes.out_dim, d_text, fine_dim=config.proj_dim,
                             coarse_dim=config.coarse_dim, weights=tuple(config.space_weights), **common)  # fmt: skip
        other, name = (codes, "codes") if config.preset == "ecg-codes" else (text, "text")
        return pair_model(ecg, other, names=("ecg", name), dims=(ecg.out_dim, other.out_dim),
                          proj_dim=config.proj_dim, **common)  # fmt: skip


@dataclass
class EcgPretrainResult:
    model: torch.nn.Module
    history: list[dict]
    metrics: dict[str, Any]
    train: EcgPairs
    val: EcgPairs | None
    vocab: Any = None


def pretrain_ecg(config: EcgPretrainConfig, index_dir, root=None, out_dir=None, dist=None,
                 train: EcgPairs | None = None, val: EcgPairs | None = None, vocab=None) -> EcgPretrainResult:  # fmt: skip
    """Pretrain the preset's model on the train split of ``index_dir``; validate on its val split.

    ``train`` / ``val`` (and ``vocab``) reuse what was already built (e.g. by a notebook comparing presets). With
    ``out_dir`` the Trainer checkpoints to ``out_dir/checkpoint`` (resumed when present) and the run folder
    gets ``ecg_pretrain_config.json``, ``code_vocab.json`` and ``metrics.json`` (history, the validation
    losses before training under ``val_before``, sizes, seconds); :func:`load_ecg_pretrained` reads it back.
    """
    from ehrclip_kit.checkpointing import find_checkpoint
    from ehrclip_kit.retrieval_metrics import ContrastiveEvaluator
    from ehrclip_kit.training import Trainer

    t0 = time.perf_counter()
    if vocab is None and "codes" in modalities(config.preset):
        vocab = load_vocab(index_dir)
    train = train if train is not None else build_ecg_dataset(index_dir, root, config, "train", vocab)
    val = val if val is not None else build_ecg_dataset(index_dir, root, config, "val", vocab)
    d_text = train.text.shape[1] if train.text is not None else 384
    model = build_model(config, vocab, d_text)
    metrics: dict[str, Any] = {"preset": config.preset, "n_train": len(train), "n_val": len(val)}
    if config.codes_pretrain_epochs and train.codes is not None:
        from ehrclip_kit.encoders.codes import masked_code_pretraining

        metrics["masked_codes"] = masked_code_pretraining(
            model.encoders["codes"], train.codes, None, epochs=config.codes_pretrain_epochs,
            batch_size=config.train.batch_size, seed=config.seed, progress=config.progress,
        )  # fmt: skip
    evaluate = None
    if len(val) >= 2:
        evaluate = ContrastiveEvaluator(val, collate_fn=val.collate, batch_size=config.train.batch_size)
    train_cfg = dataclasses.replace(config.train, seed=config.seed, progress=config.progress)
    model_config = {"kind": config.preset, "ecg_pretrain": to_dict(config), "d_text": d_text}
    trainer = Trainer(model, train, train_cfg, out_dir=out_dir, collate_fn=train.collate, evaluate=evaluate,
                      callbacks=[EpochCallback(train)], dist=dist, model_config=model_config)  # fmt: skip
    fresh = out_dir is None or find_checkpoint(out_dir) is None
    if evaluate is not None and fresh and trainer.dist.is_main:
        metrics["val_before"] = evaluate(model)  # the chance-level starting point of every curve
    history = trainer.fit(resume=out_dir is not None)
    metrics |= {
        "history": history,
        "step_log": trainer.step_log,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if out_dir is not None and trainer.dist.is_main:
        out_dir = Path(out_dir)
        write_json(out_dir / "ecg_pretrain_config.json", to_dict(config))
        if vocab is not None:
            vocab.save(out_dir / "code_vocab.json")
        write_json(out_dir / "metrics.json", metrics)
    return EcgPretrainResult(model, history, metrics, train, val, vocab)


def space_terms(metrics: dict) -> pd.DataFrame:
    """Each space's contrastive term from :func:`pretrain_ecg`'s metrics: validation before and after training,
    and the mean of the first and last three logged training steps (one row per space)."""
    last, before = metrics["history"][-1], metrics.get("val_before", {})
    steps = pd.DataFrame(metrics.get("step_log") or [])
    rows = {}
    for key in (k for k in last if k.startswith("val/") and k.endswith("/contrastive_loss")):
        space = key.split("/")[1]
        row = {"val_before": before.get(key, np.nan), "val_after": last[key]}
        if f"{space}/contrastive_loss" in steps:
            term = steps[f"{space}/contrastive_loss"]
            row |= {"train_first_steps": term.iloc[:3].mean(), "train_last_steps": term.iloc[-3:].mean()}
        rows[space] = row
    return pd.DataFrame(rows).T


def load_ecg_pretrained(run_dir) -> tuple[torch.nn.Module, EcgPretrainConfig, Any]:
    """Rebuild a :func:`pretrain_ecg` run's model with its weights: ``(model, config, vocab or None)``."""
    from ehrclip_kit.checkpointing import find_checkpoint, load_weights
    from ehrclip_kit.data.codes import CodeVocab

    run_dir = Path(run_dir)
    ckpt = find_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint under {run_dir}: is it an ECG pretraining run folder?")
    saved = json.loads((ckpt / "config.json").read_text())["model"]
    config = from_dict(EcgPretrainConfig, saved["ecg_pretrain"])
    vocab_path = run_dir / "code_vocab.json"
    vocab = CodeVocab.load(vocab_path) if vocab_path.exists() else None
    model = build_model(config, vocab, int(saved["d_text"]))
    load_weights(model, ckpt)
    return model.eval(), config, vocab


# ------------------------------------------------------------------------------------------------- CLI
def add_ecg_arguments(parser: argparse.ArgumentParser) -> None:
    """Options only the ECG presets read (the ``ehrclip pretrain`` parser can add them)."""
    parser.add_argument("--ecg-root", type=Path, default=None,
                        help="ECG waveform folder (default: the root recorded in COHORT/ecg_index.json)")  # fmt: skip
    parser.add_argument("--ecg-text-mode", choices=TEXT_MODES, default=None,
                        help="ECG presets: report (statements + notes +-1 month), entity, machine")  # fmt: skip
    parser.add_argument("--ecg-config", type=Path, default=None,
                        help="JSON file of EcgPretrainConfig fields overriding the preset")  # fmt: skip


def _merge(base: dict, update: dict) -> dict:
    """``base`` with ``update``'s values, nested objects merged key by key (``{"train": {"epochs": 3}}``)."""
    out = dict(base)
    for key, value in update.items():
        out[key] = (
            _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def config_from_args(args: argparse.Namespace) -> EcgPretrainConfig:
    """The preset's config with the ``ehrclip pretrain`` options applied (ECG-only ones when present)."""
    extra = getattr(args, "ecg_config", None)
    fields = _merge(to_dict(ecg_preset(args.preset)), json.loads(Path(extra).read_text()) if extra else {})
    config = from_dict(EcgPretrainConfig, {**fields, "preset": args.preset}, strict=True)
    updates = {"seed": args.seed, "progress": not getattr(args, "no_progress", False)}
    for key, name in (("loss", "loss"), ("text_model", "text_model"), ("text_mode", "ecg_text_mode")):
        if getattr(args, name, None):
            updates[key] = getattr(args, name)
    train = {k: getattr(args, k, None) for k in ("epochs", "batch_size", "lr")}
    updates["train"] = dataclasses.replace(config.train, **{k: v for k, v in train.items() if v})
    return dataclasses.replace(config, **updates)


def run_preset(args: argparse.Namespace) -> int:
    """``ehrclip pretrain --preset ecg-fac|ecg-codes|ecg-text --cohort ECG_INDEX_DIR --out RUN``."""
    from ehrclip_kit import distributed as D

    config = config_from_args(args)
    dist = D.init_distributed()
    try:
        result = pretrain_ecg(config, args.cohort, getattr(args, "ecg_root", None), args.out, dist)
        if dist.is_main:
            last = (result.history or [{}])[-1]
            shown = {
                k: round(v, 4)
                for k, v in last.items()
                if k.endswith(("contrastive_loss", "2text_R@10", "2codes_R@10"))
            }
            print(f"{config.preset}: {result.metrics['n_train']} train ECGs -> {args.out} "
                  f"({result.metrics['seconds']} s) {shown}")  # fmt: skip
    finally:
        D.cleanup()
    return 0
