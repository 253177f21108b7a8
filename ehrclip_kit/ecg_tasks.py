"""Uses of a pretrained ECG model: zero-shot retrieval and classification, OOD detection, fine-tuning.

* **Zero-shot** (:func:`zero_shot`): each class is a phrase ("atrial fibrillation") put into prompt
  templates ("ECG showing {}"), embedded by the same frozen text model as the training texts and sent
  through the model's text head; an ECG's score for the class is its cosine to the class prototype in the
  space where ECG and text meet (``ecg_text`` or FAC's ``coarse``). Top-k ECGs per class give
  precision/recall@k against labels (synthetic truth, machine statements, PTB-XL SCP codes); the scores
  give one AUROC per class. Chance precision is the class prevalence.
* **OOD** (:func:`ood_evaluation`): Mahalanobis and k-NN detectors fitted on training-ECG embeddings score
  held-out ECGs and shifted copies (heavy noise, left/right arm electrode swap, time reversal, another
  data set such as PTB-XL); AUROC of shifted (positive) vs clean.
* **Fine-tuning** (:func:`label_efficiency`): the ECG encoder plus a linear head trained on a labelled task
  (e.g. atrial fibrillation) from pretrained vs random weights at several label fractions and seeds, with
  test AUROC / AUPRC and a t-based CI over seeds.

>>> sorted(SHIFTS)
['lead_swap', 'noise', 'reverse']
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ehrclip_kit.data.ecg import CANONICAL_LEADS, normalise
from ehrclip_kit.ecg_pretrain import EcgPairs, EcgPretrainConfig, embed_text_vectors
from ehrclip_kit.evaluation import binary_metrics, mean_ci, subsample_labels
from ehrclip_kit.ood import KNNDetector, MahalanobisDetector, add_noise, ood_auroc, reverse_time, swap_leads
from ehrclip_kit.retrieval import DEFAULT_TEMPLATES, precision_recall_at_k, zero_shot_auroc, zero_shot_scores

# Label column -> the phrase a user would type. The label names are shared by MIMIC machine statements and
# PTB-XL SCP codes (ehrclip_kit.data.ecg_index.LABELS).
DEFAULT_QUERIES = {
    "label_af": "atrial fibrillation",
    "label_sinus_tachycardia": "sinus tachycardia",
    "label_lbbb": "left bundle branch block",
    "label_rbbb": "right bundle branch block",
    "label_avb1": "first degree AV block",
    "label_lvh": "left ventricular hypertrophy",
    "label_mi": "myocardial infarction",
    "label_normal": "normal ECG",
}
# PTB-XL diagnostic superclasses (columns superclass_<name> of a PTB-XL ecg-index).
SUPERCLASS_QUERIES = {
    "superclass_NORM": "normal ECG",
    "superclass_MI": "myocardial infarction",
    "superclass_STTC": "ST/T change",
    "superclass_CD": "conduction disturbance",
    "superclass_HYP": "hypertrophy",
}
# Findings the synthetic generator drew for each ECG (ecg_truth.parquet), as columns truth_<finding>.
TRUTH_QUERIES = {
    "truth_af": "atrial fibrillation",
    "truth_lbbb": "left bundle branch block",
    "truth_rbbb": "right bundle branch block",
    "truth_avb1": "first degree AV block",
    "truth_lvh": "left ventricular hypertrophy",
    "truth_mi_inferior": "inferior myocardial infarction",
    "truth_mi_anterior": "anterior myocardial infarction",
}


def with_truth(frame: pd.DataFrame, ecg_root) -> pd.DataFrame:
    """``frame`` (ECG index rows) plus ``truth_<finding>`` 0/1 columns from a synthetic world's
    ``ecg_truth.parquet`` (in ``ecg_root``, the folder the index paths are relative to), joined on study_id."""
    from pathlib import Path

    path = Path(ecg_root) / "ecg_truth.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: synthetic truth exists only for `ehrclip synth` worlds")
    names = [k.removeprefix("truth_") for k in TRUTH_QUERIES]
    truth = pd.read_parquet(path, columns=["study_id", *names])
    truth = truth.rename(columns={n: f"truth_{n}" for n in names}).astype(
        dict.fromkeys(["study_id"], "int64")
    )
    out = frame.merge(truth.astype({f"truth_{n}": "int8" for n in names}), on="study_id", how="left")
    if out[f"truth_{names[0]}"].isna().any():
        raise ValueError(f"{path}: some ECGs of the index have no synthetic truth row (another world?)")
    return out


# ------------------------------------------------------------------------------------------ embedding
def _root(model, name: str) -> str:
    while name in model.head_sources:
        name = model.head_sources[name]
    return name


def query_space(model, query: str = "text") -> tuple[str, str]:
    """``(ecg_head, query_head)`` of the space where ECGs meet ``query`` embeddings (text or codes)."""
    for s in model.spaces:
        roots = (_root(model, s.a), _root(model, s.b))
        if roots == ("ecg", query):
            return s.a, s.b
        if roots == (query, "ecg"):
            return s.b, s.a
    raise ValueError(
        f"the model has no space joining 'ecg' and {query!r}: spaces {[s.name for s in model.spaces]}"
    )


def eval_crops(data: EcgPairs) -> np.ndarray:
    """Centre crops ``[n, leads, crop_len]`` of every ECG of ``data`` (what the model sees at evaluation)."""
    view = data.subset(np.arange(len(data)), train=False)
    if not len(view):
        return np.zeros((0, len(data.config.leads), data.config.crop_len), np.float32)
    return np.stack([view.crop(i) for i in range(len(view))])


@torch.no_grad()
def embed_ecgs(model, crops: np.ndarray | EcgPairs, name: str = "ecg", batch_size: int = 256) -> np.ndarray:
    """Embedding ``name`` (the encoder output ``"ecg"`` or a head such as ``"ecg_coarse"``) of ECG crops."""
    x = eval_crops(crops) if isinstance(crops, EcgPairs) else np.asarray(crops, dtype=np.float32)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        for i in range(0, len(x), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size])).to(device)
            out.append(model.embed({"ecg": batch}, name)[name].float().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@torch.no_grad()
def embed_texts(
    model, texts: Sequence[str], config: EcgPretrainConfig, name: str | None = None
) -> np.ndarray:
    """Texts through the frozen text model (cached) and the model's text head ``name`` (default: the one
    meeting the ECGs)."""
    name = name or query_space(model, "text")[1]
    vectors = torch.from_numpy(embed_text_vectors(list(texts), config))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        return model.embed({"text": vectors.to(device)}, name)[name].float().cpu().numpy()
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------------------ zero-shot
def zero_shot(model, ecg_emb: np.ndarray, labels: pd.DataFrame, config: EcgPretrainConfig,
              queries: Mapping[str, str] | None = None, templates: Sequence[str] = DEFAULT_TEMPLATES,
              ks: Sequence[int] = (1, 5, 10)) -> dict[str, pd.DataFrame]:  # fmt: skip
    """Zero-shot retrieval and classification of ECGs (embedded in the text-meeting head) by class phrases.

    ``queries`` maps a 0/1 label column of ``labels`` to its phrase (default :data:`DEFAULT_QUERIES`, those
    present). Returns ``scores`` (cosine per ECG and class), ``retrieval`` (label, query, k, precision,
    recall, prevalence = chance precision, lift = precision / prevalence) and ``auroc`` (per class).
    """
    queries = dict(queries or {k: v for k, v in DEFAULT_QUERIES.items() if k in labels.columns})
    missing = [c for c in queries if c not in labels.columns]
    if missing or not queries:
        raise ValueError(f"zero_shot: label columns {missing or 'none'} not found in {list(labels.columns)}")
    if len(labels) != len(ecg_emb):
        raise ValueError(f"zero_shot: {len(labels)} label rows for {len(ecg_emb)} ECG embeddings")
    prompts = {label: [t.format(q) for t in templates] for label, q in queries.items()}
    flat = [p for ps in prompts.values() for p in ps]
    emb = embed_texts(model, flat, config)
    per_class, start = {}, 0
    for label, ps in prompts.items():
        per_class[label], start = emb[start : start + len(ps)], start + len(ps)
    scores = zero_shot_scores(ecg_emb, per_class)
    y = labels[list(queries)].to_numpy().astype(bool)
    k_max = min(max(ks), len(scores))
    top = np.argsort(-scores.to_numpy(), axis=0, kind="stable")[:k_max].T  # [n_classes, k]
    rows = []
    for j, (label, query) in enumerate(queries.items()):
        found = precision_recall_at_k(top[j : j + 1], y[:, j][None], [k for k in ks if k <= k_max])
        prevalence = float(y[:, j].mean())
        for r in found.to_dict("records"):
            lift = r["precision"] / prevalence if prevalence else math.nan
            rows.append({"label": label, "query": query, "k": r["k"], "precision": r["precision"],
                         "recall": r["recall"], "prevalence": prevalence, "lift": lift})  # fmt: skip
    auroc = zero_shot_auroc(scores, labels[list(queries)]).assign(query=list(queries.values()))
    return {"scores": scores, "retrieval": pd.DataFrame(rows), "auroc": auroc}


def retrieve(model, query: str, ecg_emb: np.ndarray, config: EcgPretrainConfig, k: int = 5,
             templates: Sequence[str] = DEFAULT_TEMPLATES) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The ``k`` ECGs closest to a free-text ``query``: ``(scores, row ids)``, best first."""
    scores = zero_shot_scores(
        ecg_emb, {query: embed_texts(model, [t.format(query) for t in templates], config)}
    )
    order = np.argsort(-scores[query].to_numpy(), kind="stable")[:k]
    return scores[query].to_numpy()[order], order


def retrieval_widget(model, data: EcgPairs, ecg_emb: np.ndarray, config: EcgPretrainConfig, k: int = 3,
                     value: str = "atrial fibrillation"):  # fmt: skip
    """A text box + button: type a query, see the ``k`` retrieved ECGs drawn as 12-lead plots."""
    import ipywidgets as widgets

    from ehrclip_kit.viz import ecg_12lead

    box = widgets.Text(value=value, description="Query", placeholder="e.g. left bundle branch block")
    button, out = widgets.Button(description="Retrieve ECGs"), widgets.Output()

    def show(_=None) -> None:
        # The Output's contents are set directly instead of displaying inside `with out:`: no message
        # capture, so it behaves the same in a live kernel and in headless runs (papermill / nbclient).
        scores, ids = retrieve(model, box.value, ecg_emb, config, k)
        drawn = []
        for rank, (s, i) in enumerate(zip(scores, ids, strict=True), start=1):
            title = f"#{rank} (cosine {s:.3f}): {data.frame['report'].iloc[i]}"
            fig = ecg_12lead(data.waves[i], data.config.fs, CANONICAL_LEADS, seconds=5.0, title=title)
            # plotly's own mime bundle (what its notebook renderer sends), independent of pio.renderers.
            bundle = {"application/vnd.plotly.v1+json": json.loads(fig.to_json()), "text/plain": title}
            drawn.append({"output_type": "display_data", "data": bundle, "metadata": {}})
        out.outputs = tuple(drawn)

    button.on_click(show)
    show()  # the first query's answer is there before any click
    return widgets.VBox([widgets.HBox([box, button]), out])


# ------------------------------------------------------------------------------------------------ OOD
def limb_reversal(x: np.ndarray) -> np.ndarray:
    """Left/right arm electrode swap in canonical lead order: I inverted, II <-> III, aVR <-> aVL."""
    out = swap_leads(swap_leads(x, 1, 2), 3, 4)
    out[..., 0, :] *= -1
    return out


SHIFTS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "noise": lambda x, rng: add_noise(x, snr_db=-3.0, rng=rng),
    "lead_swap": lambda x, rng: limb_reversal(x),
    "reverse": lambda x, rng: reverse_time(x),
}


def shifted(crops: np.ndarray, kind: str, seed: int = 0, config=None) -> np.ndarray:
    """Shift ``crops`` by ``kind`` (:data:`SHIFTS`) then re-normalise as the model's inputs are."""
    if kind not in SHIFTS:
        raise ValueError(f"unknown shift {kind!r}; choose from {sorted(SHIFTS)}")
    mode = getattr(config, "normalise", "per_lead")
    return normalise(SHIFTS[kind](np.asarray(crops), np.random.default_rng(seed)), mode)


def ood_evaluation(model, train_crops: np.ndarray, test_crops: np.ndarray, shifts: Sequence[str] = tuple(SHIFTS),
                   external: Mapping[str, np.ndarray] | None = None, name: str = "ecg", k: int = 10,
                   seed: int = 0) -> tuple[pd.DataFrame, dict[str, dict[str, tuple]]]:  # fmt: skip
    """AUROC of Mahalanobis and k-NN scores, shifted/external ECGs (positive) vs clean test ECGs.

    Detectors are fitted on embedding ``name`` of ``train_crops``. Returns a table (shift, detector,
    auroc, n_in, n_out) and ``{shift: {detector: (in_scores, out_scores)}}`` for
    :func:`ehrclip_kit.viz.ood_histograms`.
    """
    train_emb = embed_ecgs(model, train_crops, name)
    detectors = {"mahalanobis": MahalanobisDetector().fit(train_emb), "knn": KNNDetector(k=k).fit(train_emb)}
    clean = embed_ecgs(model, test_crops, name)
    in_scores = {d: det.score(clean) for d, det in detectors.items()}
    sets = {s: shifted(test_crops, s, seed) for s in shifts} | dict(external or {})
    rows, scores = [], {}
    for shift, crops in sets.items():
        emb = embed_ecgs(model, crops, name)
        scores[shift] = {}
        for d, det in detectors.items():
            out = det.score(emb)
            scores[shift][d] = (in_scores[d], out)
            rows.append({"shift": shift, "detector": d, "auroc": ood_auroc(in_scores[d], out),
                         "n_in": len(clean), "n_out": len(emb)})  # fmt: skip
    return pd.DataFrame(rows), scores


# ---------------------------------------------------------------------------------------- fine-tuning
@dataclass
class EcgFinetuneConfig:
    """Fine-tuning the ECG encoder + a linear head on one binary label."""

    epochs: int = 5
    min_steps: int = 30  # tiny label fractions still get this many optimiser steps
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    freeze_encoder: bool = False  # True: linear probe
    n_boot: int = 200
    device: str = "auto"  # "auto": CUDA when available
    progress: bool = False


def finetune_ecg(encoder_factory: Callable[[], nn.Module], state: Mapping[str, torch.Tensor] | None,
                 train: EcgPairs, test: EcgPairs, label: str, fraction: float = 1.0, seed: int = 0,
                 config: EcgFinetuneConfig | None = None) -> dict[str, Any]:  # fmt: skip
    """Train encoder (``state`` loaded, or random) + linear head on ``fraction`` of ``train``'s labels.

    Returns test ``binary_metrics`` plus n_train, n_pos and the per-epoch training loss (``loss_curve``).
    """
    from tqdm.auto import tqdm

    config = config or EcgFinetuneConfig()
    frame = train.frame.assign(label=train.frame[label].astype(int), _row=np.arange(len(train)))
    rows = subsample_labels(frame, fraction, seed)["_row"].to_numpy()
    y_train = frame["label"].to_numpy()[rows].astype(np.float32)
    data = train.subset(rows, train=True)
    device = torch.device(
        config.device if config.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(
        devices=[]
    ):  # init and dropout from `seed`; the caller's RNG is left as it was
        torch.manual_seed(seed)
        encoder = encoder_factory()
        if state is not None:
            encoder.load_state_dict(state)
        head = nn.Linear(encoder.out_dim, 1)
        encoder, head = encoder.to(device), head.to(device)
        encoder.requires_grad_(not config.freeze_encoder)
        params = [p for p in [*encoder.parameters(), *head.parameters()] if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        pos = max(float(y_train.sum()), 1.0)
        loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor((len(y_train) - pos) / pos, device=device))
        per_epoch = max(1, math.ceil(len(rows) / config.batch_size))
        epochs = max(config.epochs, math.ceil(config.min_steps / per_epoch))
        curve = []
        for epoch in tqdm(range(epochs), desc=f"fine-tune {fraction:g}", disable=not config.progress):
            data.set_epoch(epoch)
            order, total = torch.randperm(len(rows), generator=gen).numpy(), 0.0
            encoder.train(not config.freeze_encoder)
            for b in range(per_epoch):
                idx = order[b * config.batch_size : (b + 1) * config.batch_size]
                x = torch.from_numpy(np.stack([data.crop(i) for i in idx])).to(device)
                loss = loss_fn(head(encoder(x)).squeeze(-1), torch.from_numpy(y_train[idx]).to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            curve.append(total / len(rows))
    encoder.eval()
    with torch.no_grad():
        crops = torch.from_numpy(eval_crops(test))
        p = torch.cat([torch.sigmoid(head(encoder(crops[i : i + 256].to(device)))).squeeze(-1).cpu()
                       for i in range(0, len(crops), 256)])  # fmt: skip
    metrics = binary_metrics(
        test.frame[label].to_numpy().astype(int), p.numpy(), n_boot=config.n_boot, seed=seed
    )
    return metrics | {"n_train": len(rows), "n_train_pos": int(y_train.sum()), "loss_curve": curve}


def label_efficiency(encoder_factory: Callable[[], nn.Module], inits: Mapping[str, Mapping | None],
                     train: EcgPairs, test: EcgPairs, label: str, fractions: Sequence[float] = (0.01, 0.1, 1.0),
                     seeds: Sequence[int] = (0, 1, 2), config: EcgFinetuneConfig | None = None
                     ) -> tuple[pd.DataFrame, pd.DataFrame]:  # fmt: skip
    """Every init (``{"pretrained": state, "random": None}``) x fraction x seed; returns (runs, summary).

    ``summary`` has the columns :func:`ehrclip_kit.viz.label_efficiency` draws: task, method,
    label_fraction, metric, mean, ci_low, ci_high, n (CI over seeds, :func:`ehrclip_kit.evaluation.mean_ci`,
    clipped to [0, 1]).
    """
    runs = []
    for method, state in inits.items():
        for fraction in fractions:
            for seed in seeds:
                found = finetune_ecg(encoder_factory, state, train, test, label, fraction, seed, config)
                runs.append({"method": method, "label_fraction": fraction, "seed": seed} | found)
    runs = pd.DataFrame(runs)
    summary = []
    for (method, fraction), part in runs.groupby(["method", "label_fraction"], sort=False):
        for metric in ("auroc", "auprc"):
            mean, lo, hi = mean_ci(part[metric])
            lo, hi = max(lo, 0.0), min(hi, 1.0)  # a t-interval over few seeds can leave [0, 1]
            summary.append({"task": label, "method": method, "label_fraction": fraction, "metric": metric,
                            "mean": mean, "ci_low": lo, "ci_high": hi, "n": len(part)})  # fmt: skip
    return runs, pd.DataFrame(summary)


def finetune_curves(runs: pd.DataFrame) -> list[dict]:
    """Mean training loss per epoch of each (method, label fraction), as rows for
    :func:`ehrclip_kit.viz.training_curves` (small fractions run more epochs: see ``min_steps``)."""
    rows: dict[int, dict] = {}
    for (method, fraction), part in runs.groupby(["method", "label_fraction"], sort=False):
        curves = part["loss_curve"].tolist()
        width = max(map(len, curves))
        mean = np.nanmean([list(c) + [np.nan] * (width - len(c)) for c in curves], axis=0)
        for epoch, value in enumerate(mean, start=1):
            rows.setdefault(epoch, {"epoch": epoch})[f"{method} {fraction:.0%} loss"] = float(value)
    return [rows[e] for e in sorted(rows)]


def ptbxl_crops(root, config: EcgPretrainConfig) -> tuple[pd.DataFrame, np.ndarray]:
    """A PTB-XL folder's validated records (the PTB-XL recipe) as centre crops: an external OOD set."""
    from ehrclip_kit.data.ecg import center_crop
    from ehrclip_kit.data.ecg_index import build_ptbxl_index
    from ehrclip_kit.ecg_pretrain import load_waveforms

    frame, _, _ = build_ptbxl_index(root, fs=config.ecg.fs)
    waves = load_waveforms(frame, root, config.ecg, config.record_seconds, config.cache_dir, config.progress)
    return frame, np.stack([center_crop(w, config.ecg.crop_len) for w in waves])
