"""Small helpers the teaching notebooks share (parameters, one shared world, cached pretraining, tables).

The notebooks in ``notebooks/`` are narrative plus short calls; what they would otherwise repeat lives here:

* :func:`param` reads a notebook parameter from ``EHRCLIP_NB_<NAME>`` (so CI and the browser test can
  shrink every notebook without editing it) and falls back to a CPU-sized default.
* :func:`prepare_world_and_cohort` builds the synthetic world and its cohort folder once per
  (patients, seed, text signal) under ``OUT/worlds/`` and reuses them, so every notebook reads one world.
* :func:`pretrain_stages` runs masked and contrastive pretraining once per cohort/config/seed and keeps the
  encoders of every stage in a cache file; the notebooks after 00 reuse it instead of retraining.
* :func:`record_metrics` writes ``OUT/<name>_metrics.json``, which CI checks with loose bounds.

>>> import os
>>> os.environ["EHRCLIP_NB_EPOCHS"] = "2"
>>> param("EPOCHS", 5), param("SEED", 0)
(2, 0)
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

ENV_PREFIX = "EHRCLIP_NB_"
TASK = "readmission_30d"


# ------------------------------------------------------------------------------------------ parameters
def param(name: str, default: Any) -> Any:
    """``$EHRCLIP_NB_<NAME>`` cast to the type of ``default`` (bool, int, float or str), else ``default``.

    >>> os.environ["EHRCLIP_NB_FLAG"] = "no"
    >>> param("FLAG", True)
    False
    """
    raw = os.environ.get(ENV_PREFIX + name.upper())
    if raw is None or raw == "":
        return default
    try:
        if isinstance(default, bool):
            if raw.strip().lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(raw)
            return raw.strip().lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise ValueError(
            f"environment variable {ENV_PREFIX + name.upper()}={raw!r} is not a valid {type(default).__name__}"
        ) from None
    return raw


def notebook_params(**defaults: Any) -> dict[str, Any]:
    """Every ``name=default`` resolved through :func:`param` (``notebook_params(seed=0)`` reads EHRCLIP_NB_SEED)."""
    return {name: param(name, default) for name, default in defaults.items()}


def project_root(start: Path | None = None) -> Path | None:
    """The checkout holding ``pyproject.toml`` and ``ehrclip_kit/`` above ``start`` (default: cwd), if any."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "ehrclip_kit").is_dir():
            return folder
    return None


def resolve_out(out: str | os.PathLike) -> Path:
    """The output folder, created. A relative path is taken from the project root when the notebook runs
    inside a checkout (Jupyter starts kernels in ``notebooks/``), so every notebook shares ``runs/``."""
    path = Path(out).expanduser()
    if not path.is_absolute():
        path = (project_root() or Path.cwd()) / path
    path.mkdir(parents=True, exist_ok=True)
    return path


def record_metrics(out_dir: str | os.PathLike, name: str, metrics: Mapping[str, Any]) -> Path:
    """Write ``OUT/<name>_metrics.json`` atomically (numpy scalars and arrays become plain JSON)."""
    from ehrclip_kit.io import write_json

    def plain(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple | np.ndarray | pd.Series):
            return [plain(v) for v in list(value)]
        if isinstance(value, np.generic):
            return value.item()
        return value

    path = Path(out_dir) / f"{name}_metrics.json"
    write_json(path, plain(dict(metrics)))
    return path


def text_cache_dir(out_dir: str | os.PathLike) -> Path:
    """Where note embeddings are cached: ``$EHRCLIP_CACHE`` when set (shared across runs), else ``OUT/cache``.

    Embedding the notes with the frozen text model is the slowest step on a CPU; every notebook (and the
    ablation grid) finds the vectors here after the first one computed them.
    """
    return Path(os.environ.get("EHRCLIP_CACHE") or Path(out_dir) / "cache")


def device_summary() -> str:
    """One line saying where torch will run (the trainer and the text cache pick a GPU when present)."""
    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name(0)} (bf16 autocast in the trainer)"
    return f"CPU: {torch.get_num_threads()} torch threads (no GPU found)"


# ------------------------------------------------------------------------------------------ world/cohort
@dataclass
class WorldPaths:
    """Where the shared synthetic world and its cohort folder live, and whether they were reused."""

    root: Path
    world: Path
    cohort: Path
    reused: bool
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)


def prepare_world_and_cohort(
    out_dir: str | os.PathLike, n_patients: int, seed: int = 0, text_signal: float = 0.8, ecg: bool = False
) -> WorldPaths:
    """Build (or reuse) ``OUT/worlds/p<n>_s<seed>_ts<signal>/{world,cohort}``.

    Both folders are written atomically by their builders, so a complete ``cohort/features.json`` means a
    finished world; anything less is rebuilt. ``ecg=True`` also writes the synthetic ECGs (rebuilding a world
    that lacks them).
    """
    root = Path(out_dir) / "worlds" / f"p{int(n_patients)}_s{int(seed)}_ts{float(text_signal):g}"
    world, cohort = root / "world", root / "cohort"
    info_path = root / "world_summary.json"
    t0 = time.perf_counter()
    have_ecg = (world / "ecg").is_dir()
    if (cohort / "features.json").is_file() and info_path.is_file() and (have_ecg or not ecg):
        summary = json.loads(info_path.read_text())
        return WorldPaths(root, world, cohort, True, round(time.perf_counter() - t0, 2), summary)
    from ehrclip_kit.data.recipes import build_cohort
    from ehrclip_kit.data.synthetic import generate_world
    from ehrclip_kit.io import write_json

    summary = generate_world(world, n_patients=n_patients, seed=seed, text_signal=text_signal, ecg=ecg,
                             progress=False)  # fmt: skip
    summary["cohort"] = build_cohort(world, cohort, verbose=False)["tasks"]
    write_json(info_path, summary)
    return WorldPaths(root, world, cohort, False, round(time.perf_counter() - t0, 2), summary)


def load_truth(cohort: str | os.PathLike, frame: pd.DataFrame) -> pd.DataFrame:
    """The world's latent truth (``truth.parquet``) aligned row by row with ``frame`` (by hadm_id)."""
    path = Path(cohort) / "truth.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the latent truth exists only for synthetic worlds")
    truth = pd.read_parquet(path).drop(columns=["subject_id", "age", "sex"], errors="ignore")
    return frame[["hadm_id"]].merge(truth, on="hadm_id", how="left", validate="one_to_one")


# ------------------------------------------------------------------------------------------ pretraining
def pretrain_config(preset_name: str = "smoke", epochs: int | None = None, masked_epochs: int | None = None,
                    seed: int = 0, cache_dir: str | os.PathLike | None = None, max_chunks: int | None = None):  # fmt: skip
    """A :func:`ehrclip_kit.pretrain.preset` with the notebook's overrides (quiet, cached text vectors)."""
    from ehrclip_kit.pretrain import preset

    config = preset(preset_name)
    config = dataclasses.replace(config, seed=seed, progress=False,
                                 cache_dir=None if cache_dir is None else str(cache_dir))  # fmt: skip
    if epochs is not None:
        config.contrastive = dataclasses.replace(config.contrastive, epochs=int(epochs), log_every=1)
    if masked_epochs is not None:
        config.masked = dataclasses.replace(config.masked, epochs=int(masked_epochs))
    if max_chunks is not None:
        config.text = dataclasses.replace(config.text, max_chunks=int(max_chunks))
    return config


def split_note_vectors(frame: pd.DataFrame, notes: pd.DataFrame, config,
                       splits: Sequence[str] = ("train", "val", "test")) -> dict[str, tuple[pd.DataFrame, np.ndarray]]:  # fmt: skip
    """Per split: the rows that have a note (with a ``text`` column) and their cached text-model vectors.

    The texts are grouped exactly as :func:`ehrclip_kit.ablation.run_ablation` groups them, so the ablation
    grid finds these vectors in the cache instead of embedding the notes again.
    """
    from ehrclip_kit.data.datasets import with_notes
    from ehrclip_kit.pretrain import note_vectors, split_rows

    out = {}
    for split in splits:
        rows = with_notes(split_rows(frame, split), notes)
        out[split] = (rows, note_vectors(rows["text"].tolist(), config))
    return out


@dataclass
class Stages:
    """Encoders of every pretraining stage, fitted on the train split of one task table."""

    preprocessor: Any
    encoders: dict[str, Any]  # "random", "masked", "masked+contrastive"
    model: Any  # the contrastive model (heads included)
    masked_history: list[dict]
    contrastive_history: list[dict]
    masked_network: Any = None  # pytorch-tabnet's pretraining network (with its decoder)
    seconds: float = 0.0
    reused: bool = False


def pretrain_stages(frame: pd.DataFrame, features: dict, config, vectors: Mapping[str, tuple[pd.DataFrame, np.ndarray]],
                    cache_dir: str | os.PathLike | None = None) -> Stages:  # fmt: skip
    """Random, masked and masked + contrastive encoders for ``config``; cached on disk when ``cache_dir``.

    The cache key covers the cohort rows, the feature spec and the whole config (seed included), so a
    changed world or setting retrains. Pickled with ``torch.save``: only ever load files you wrote yourself.
    """
    from ehrclip_kit.config import to_dict
    from ehrclip_kit.encoders.tabular import TabularPreprocessor
    from ehrclip_kit.io import atomic_path
    from ehrclip_kit.masked_pretraining import masked_pretrain
    from ehrclip_kit.pretrain import contrastive_stage, random_encoder, split_rows

    digest = hashlib.sha256()
    digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    digest.update(
        json.dumps([features.get("features"), to_dict(config)], sort_keys=True, default=str).encode()
    )
    path = Path(cache_dir) / f"stages-{digest.hexdigest()[:20]}.pt" if cache_dir is not None else None
    if path is not None and path.is_file():
        stages = torch.load(path, weights_only=False)
        stages.reused = True
        return stages
    t0 = time.perf_counter()
    train, val = split_rows(frame, "train"), split_rows(frame, "val")
    preprocessor = TabularPreprocessor().fit(train, features)
    masked_cfg = dataclasses.replace(config.masked, seed=config.seed, progress=False)
    masked = masked_pretrain(preprocessor, train, val, config.tabnet, masked_cfg)
    model, history = contrastive_stage(
        copy.deepcopy(masked.encoder), preprocessor, vectors["train"][0], vectors["val"][0], config,
        text_vectors={"train": vectors["train"][1], "val": vectors["val"][1]},
    )  # fmt: skip
    model = model.cpu().eval()
    encoders = {"random": random_encoder(preprocessor, config.tabnet, config.seed), "masked": masked.encoder,
                "masked+contrastive": model.encoders["ehr"]}  # fmt: skip
    stages = Stages(preprocessor, encoders, model, masked.history, history, masked.network,
                    round(time.perf_counter() - t0, 1))  # fmt: skip
    if path is not None:
        with atomic_path(path) as tmp:
            torch.save(stages, tmp)
    return stages


@torch.no_grad()
def embed_rows(
    encoder: torch.nn.Module, preprocessor, frame: pd.DataFrame, batch_size: int = 1024
) -> np.ndarray:
    """EHR encoder outputs ``[len(frame), d]`` (eval mode; the caller's training mode is restored)."""
    x = preprocessor.transform(frame)
    device = next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    try:
        parts = [encoder(torch.as_tensor(x[i : i + batch_size], device=device)).float().cpu().numpy()
                 for i in range(0, len(x), batch_size)]  # fmt: skip
    finally:
        encoder.train(was_training)
    return np.concatenate(parts) if parts else np.zeros((0, encoder.out_dim), np.float32)


@torch.no_grad()
def project_pairs(
    model, preprocessor, rows: pd.DataFrame, text_vectors: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Both sides of the shared space: ``(ehr_proj, text_proj)`` for the rows and their note vectors."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        batch = {"ehr": torch.as_tensor(preprocessor.transform(rows), device=device),
                 "text": torch.as_tensor(np.asarray(text_vectors, np.float32), device=device)}  # fmt: skip
        emb = model.embed(batch, ["ehr_proj", "text_proj"])
    finally:
        model.train(was_training)
    return emb["ehr_proj"].float().cpu().numpy(), emb["text_proj"].float().cpu().numpy()


# ------------------------------------------------------------------------------------------ tables
def layout_table(root: str | os.PathLike) -> pd.DataFrame:
    """Files of a MIMIC-IV-shaped folder: path, size and the CSV header (first line only is read)."""
    from ehrclip_kit.data.recipes import read_header

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    rows = []
    for path in sorted(root.rglob("*.csv*")):
        if path.suffix in (".gz", ".csv") and "ecg" not in path.relative_to(root).parts[:1]:
            rows.append({"file": str(path.relative_to(root)), "MB": round(path.stat().st_size / 1e6, 2),
                         "columns": ", ".join(read_header(path))})  # fmt: skip
    return pd.DataFrame(rows)


def feature_table(frame: pd.DataFrame, features: dict) -> pd.DataFrame:
    """One row per feature of ``features.json``: kind, source table, share missing, median or #categories."""
    rows = []
    for spec in features["features"]:
        col = frame[spec["name"]]
        categorical = spec["kind"] == "categorical"
        missing = (col == 0).mean() if categorical else col.isna().mean()
        rows.append({"feature": spec["name"], "kind": spec["kind"], "source": spec.get("source", ""),
                     "missing": round(float(missing), 3),
                     "median_or_levels": len(spec.get("categories", [])) - 1 if categorical else col.median()})  # fmt: skip
    return pd.DataFrame(rows)


def note_example(world: str | os.PathLike, cohort: str | os.PathLike, hadm_id: int | None = None,
                 max_tokens: int = 256) -> dict[str, Any]:  # fmt: skip
    """One discharge note before and after cleaning: raw text, its sections (kept or dropped), the cleaned
    text as the cohort stores it, and its token chunks (decoded) from the offline MiniLM tokenizer."""
    from ehrclip_kit.data.notes import NoteCleaningConfig, chunk_token_ids, parse_sections
    from ehrclip_kit.encoders.text import load_text_tokenizer

    raw = pd.read_csv(Path(world) / "note" / "discharge.csv.gz", usecols=["hadm_id", "text"])
    cleaned = pd.read_parquet(Path(cohort) / "notes.parquet")
    if hadm_id is None:  # a note of median length: typical, not an outlier
        lengths = cleaned["text"].str.len()
        hadm_id = int(cleaned.loc[(lengths - lengths.median()).abs().idxmin(), "hadm_id"])
    raw_text = raw.loc[raw["hadm_id"] == hadm_id, "text"].iloc[-1]
    clean_text = cleaned.loc[cleaned["hadm_id"] == hadm_id, "text"].iloc[-1]

    def key(heading: str) -> str:  # headings compare letters-only, as clean_note compares them
        return "".join(ch for ch in heading.lower() if ch.isalpha())

    drop = {key(h) for h in NoteCleaningConfig().drop_sections}
    sections = pd.DataFrame(
        [{"heading": h or "(preamble)", "chars": len(b), "kept": not (h and key(h) in drop)}
         for h, b in parse_sections(raw_text)]
    )  # fmt: skip
    tokenizer = load_text_tokenizer()
    chunks = chunk_token_ids(clean_text, tokenizer, max_tokens)
    return {"hadm_id": hadm_id, "raw": raw_text, "sections": sections, "cleaned": clean_text,
            "chunk_lengths": [len(c) for c in chunks], "chunks": [tokenizer.decode(c) for c in chunks]}  # fmt: skip


def term_rates(rows: pd.DataFrame, terms: Sequence[str], by: str = "label") -> pd.DataFrame:
    """Share of notes (``rows["text"]``) that mention each whole-word term, per value of ``by``."""
    import re

    out = {}
    for term in terms:
        hit = rows["text"].str.contains(rf"\b{re.escape(term)}\b", regex=True)
        out[term] = hit.groupby(rows[by]).mean()
    return pd.DataFrame(out).rename_axis(by)


def subgroup_metrics(
    rows: pd.DataFrame, probabilities: Mapping[str, np.ndarray], groups: Mapping[str, Any]
) -> pd.DataFrame:
    """AUROC and Brier score of each method's test probabilities within subgroups of ``rows``.

    ``groups`` maps a grouping name to one value per row (e.g. note-length tertile); a subgroup with a single
    class gets AUROC NaN. Small subgroups give wide uncertainty: read ``n`` and ``n_pos`` first.
    """
    from sklearn.metrics import roc_auc_score

    y = rows["label"].to_numpy()
    out = []
    for grouping, values in groups.items():
        values = pd.Series(np.asarray(values), index=rows.index)
        for level in values.dropna().unique():
            sel = (values == level).to_numpy()
            for method, p in probabilities.items():
                auroc = roc_auc_score(y[sel], p[sel]) if len(np.unique(y[sel])) == 2 else np.nan
                out.append({"grouping": grouping, "group": level, "method": method, "n": int(sel.sum()),
                            "n_pos": int(y[sel].sum()), "auroc": auroc, "brier": float(np.mean((p[sel] - y[sel]) ** 2))})  # fmt: skip
    return pd.DataFrame(out)


def error_groups(rows: pd.DataFrame, notes: pd.DataFrame | None = None) -> dict[str, pd.Series]:
    """Subgroups for error analysis: note length (tertiles), how many labs were measured, and age band."""
    groups = {}
    if notes is not None:
        length = (
            rows[["hadm_id"]].merge(notes[["hadm_id", "text"]], on="hadm_id", how="left")["text"].str.len()
        )
        groups["note length"] = pd.qcut(
            length.to_numpy(), 3, labels=["short", "medium", "long"], duplicates="drop"
        )
    counts = [c for c in rows.columns if c.startswith("lab_") and c.endswith("_count")]
    if counts:
        n_labs = (rows[counts].fillna(0) > 0).sum(axis=1)
        groups["labs measured"] = np.where(n_labs <= n_labs.median(), "few labs", "many labs")
    if "age" in rows.columns:
        groups["age"] = pd.cut(
            rows["age"], [0, 50, 70, 200], labels=["<50", "50-70", ">70"], right=False
        ).astype(str)
    return {
        name: pd.Series(np.asarray(values, dtype=object), index=rows.index) for name, values in groups.items()
    }


def parameter_summary(model: torch.nn.Module) -> pd.DataFrame:
    """Trainable and frozen parameter counts per top-level block (``encoder.embedder``, ``head``...)."""
    rows: dict[str, dict[str, int]] = {}
    for name, p in model.named_parameters():
        block = ".".join(name.split(".")[:2]) if name.startswith("encoder.") else name.split(".")[0]
        entry = rows.setdefault(block, {"trainable": 0, "frozen": 0})
        entry["trainable" if p.requires_grad else "frozen"] += p.numel()
    return pd.DataFrame(rows).T.rename_axis("block")


def by_feature(importance: pd.Series, preprocessor) -> pd.Series:
    """Sum a per-column importance onto features (a lab's value and its missing indicator are one feature)."""
    owner = dict(zip(preprocessor.columns, preprocessor.column_features, strict=True))
    return importance.groupby(importance.index.map(lambda c: owner.get(c, c))).sum().rename(importance.name)


def knn_auroc(embeddings: np.ndarray, y: np.ndarray, k: int = 15) -> float:
    """Leave-one-out k-NN (cosine) AUROC of a binary attribute: how well a neighbourhood predicts it."""
    from sklearn.metrics import roc_auc_score

    x = embeddings / np.clip(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12, None)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    k = min(k, len(x) - 1)
    neighbours = np.argpartition(-sims, k, axis=1)[:, :k]
    y = np.asarray(y, dtype=float)
    return float(roc_auc_score(y, y[neighbours].mean(axis=1))) if len(np.unique(y)) == 2 else float("nan")


def temperature_table(n: int = 64, dim: int = 32, noise: float = 1.0, seed: int = 0) -> pd.DataFrame:
    """CLIP loss of noisy matching pairs and of unrelated pairs at several logit scales (1 / temperature).

    Chance level is log(n): what a model that cannot tell pairs apart scores.
    """
    from ehrclip_kit.losses import ClipLoss

    g = torch.Generator().manual_seed(seed)
    a = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)
    paired = torch.nn.functional.normalize(a + noise * torch.randn(n, dim, generator=g) / dim**0.5, dim=-1)
    unrelated = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)
    loss = ClipLoss()
    rows = []
    for scale in (1.0, 1 / 0.07, 30.0, 100.0):
        s = torch.tensor(scale)
        rows.append({"logit scale": round(scale, 1), "temperature": round(1 / scale, 4),
                     "matching pairs": float(loss(a, paired, s)["contrastive_loss"]),
                     "unrelated pairs": float(loss(a, unrelated, s)["contrastive_loss"]),
                     "chance log(n)": float(np.log(n))})  # fmt: skip
    return pd.DataFrame(rows)


def feature_level_model(model: torch.nn.Module, preprocessor, batch_size: int = 16384):
    """``f(raw [N, n_features]) -> logits [N]``: the model seen from the cohort's raw feature columns.

    Columns are ``preprocessor.feature_names`` (categorical codes first, numeric values with NaN for missing).
    Explaining this function with a model-agnostic SHAP explainer gives each *feature* one attribution: a
    lab's value and its missing indicator move together, and categorical codes are swapped whole, so they
    receive attribution (gradients through an embedding lookup would give them none).
    """
    names = preprocessor.feature_names
    device = next(model.parameters()).device

    @torch.no_grad()
    def f(raw: np.ndarray) -> np.ndarray:
        model.eval()
        x = preprocessor.transform(pd.DataFrame(np.asarray(raw, dtype=np.float64), columns=names))
        return np.concatenate([model(torch.as_tensor(x[i : i + batch_size], device=device)).double().cpu().numpy()
                               for i in range(0, len(x), batch_size)])  # fmt: skip

    return f
