"""The ablation grid: {boosted trees, logistic regression, random init, masked, contrastive, masked +
contrastive} x label fractions x seeds, for both tasks.

Per task and seed the three pretrained encoders are built once (pretraining never sees labels, so every
label fraction reuses them) on the train split; each is then fine-tuned on a seeded, stratified and nested
label fraction of the train split, early-stopped on validation AUROC and scored on the test split.
Outputs: ``results.csv`` (one row per run), ``summary.csv`` (mean and t-based 95 % CI over seeds per cell),
``label_efficiency.html``/``.png`` and ``ablation_config.json``.

``ehrclip ablation --cohort C --out RUN --preset smoke|workshop|paper --label-fractions 0.01,0.05,0.1,1.0 --seeds 5``
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from ehrclip_kit.config import to_dict
from ehrclip_kit.data.datasets import TASKS, load_notes, load_task, with_notes
from ehrclip_kit.downstream import fit_and_test
from ehrclip_kit.encoders.tabular import TabularPreprocessor
from ehrclip_kit.evaluation import mean_ci
from ehrclip_kit.finetune import FinetuneConfig
from ehrclip_kit.io import write_csv, write_json
from ehrclip_kit.masked_pretraining import masked_pretrain
from ehrclip_kit.pretrain import (
    PretrainConfig,
    contrastive_stage,
    note_vectors,
    preset,
    random_encoder,
    split_rows,
)

METHODS = ("xgboost", "logistic", "random", "masked", "contrastive", "masked+contrastive")
METRICS = ("auroc", "auprc", "brier")


@dataclass
class AblationConfig:
    tasks: tuple[str, ...] = TASKS
    methods: tuple[str, ...] = METHODS
    label_fractions: tuple[float, ...] = (0.01, 0.05, 0.1, 1.0)
    seeds: int = 5
    pretrain: PretrainConfig = field(default_factory=lambda: preset("workshop"))
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    n_boot: int = 200  # per-run bootstrap; the summary's CIs are over seeds
    progress: bool = True


def ablation_preset(name: str) -> AblationConfig:
    """``smoke``: a minute on a CPU; ``workshop``: the README table on a CPU; ``paper``: the paper's sizes."""
    if name == "smoke":
        return AblationConfig(
            label_fractions=(0.05, 1.0), seeds=2, pretrain=preset("smoke"),
            finetune=FinetuneConfig(epochs=4, patience=2, batch_size=128), n_boot=0,
        )  # fmt: skip
    if name == "workshop":
        return AblationConfig(
            pretrain=preset("workshop"), finetune=FinetuneConfig(epochs=15, lr=1e-3, patience=4)
        )
    if name == "paper":
        return AblationConfig(pretrain=preset("paper"), finetune=FinetuneConfig(epochs=15, lr=5e-4))
    raise ValueError(f"unknown ablation preset {name!r}; choose smoke, workshop or paper")


def pretrained_encoders(
    frame, features, notes, preprocessor, config: PretrainConfig, seed: int, methods, vectors
):
    """The encoders each fine-tuning method starts from, for one seed."""
    cfg = dataclasses.replace(config, seed=seed, progress=False)
    train, val = split_rows(frame, "train"), split_rows(frame, "val")
    encoders = {}
    if "random" in methods:
        encoders["random"] = random_encoder(preprocessor, cfg.tabnet, seed)
    masked = None
    if {"masked", "masked+contrastive"} & set(methods):
        masked_cfg = dataclasses.replace(cfg.masked, seed=seed, progress=False)
        masked = masked_pretrain(preprocessor, train, val, cfg.tabnet, masked_cfg).encoder
        encoders["masked"] = masked
    pairs_train, pairs_val = with_notes(train, notes), with_notes(val, notes)
    starts = {"contrastive": lambda: random_encoder(preprocessor, cfg.tabnet, seed),
              "masked+contrastive": lambda: copy.deepcopy(masked)}  # fmt: skip
    for name, start in starts.items():
        if name in methods:
            model, _ = contrastive_stage(
                start(), preprocessor, pairs_train, pairs_val, cfg, text_vectors=vectors
            )
            encoders[name] = model.encoders["ehr"]
    return encoders


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and 95 % CI over seeds for every (task, method, label_fraction, metric)."""
    rows = []
    for (task, method, fraction), cell in results.groupby(["task", "method", "label_fraction"], sort=False):
        for metric in METRICS:
            mean, lo, hi = mean_ci(cell[metric].to_numpy())
            rows.append({"task": task, "method": method, "label_fraction": fraction, "metric": metric,
                         "mean": mean, "ci_low": lo, "ci_high": hi, "n": int(cell[metric].notna().sum())})  # fmt: skip
    return pd.DataFrame(rows)


def run_ablation(
    cohort: str | Path, out: str | Path | None, config: AblationConfig
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run the grid; write the outputs when ``out`` is given. Returns ``(results, summary)``."""
    notes = load_notes(cohort) if {"contrastive", "masked+contrastive"} & set(config.methods) else None
    rows = []
    total = len(config.tasks) * config.seeds * len(config.label_fractions) * len(config.methods)
    bar = tqdm(total=total, desc="ablation", disable=not config.progress)
    for task in config.tasks:
        frame, features = load_task(cohort, task)
        preprocessor = TabularPreprocessor().fit(split_rows(frame, "train"), features)
        vectors = None
        if notes is not None:  # the frozen text model's note vectors, shared by every seed
            vectors = {s: note_vectors(with_notes(split_rows(frame, s), notes)["text"].tolist(), config.pretrain)
                       for s in ("train", "val")}  # fmt: skip
        for seed in range(config.seeds):
            t0 = time.perf_counter()
            encoders = pretrained_encoders(frame, features, notes, preprocessor, config.pretrain, seed,
                                           config.methods, vectors)  # fmt: skip
            pretrain_seconds = time.perf_counter() - t0
            for fraction in config.label_fractions:
                for method in config.methods:
                    result = fit_and_test(
                        method, frame, features, fraction, seed, encoders.get(method), preprocessor,
                        dataclasses.replace(config.finetune, progress=False), n_boot=config.n_boot,
                    )  # fmt: skip
                    rows.append({"task": task, "method": method, "label_fraction": fraction, "seed": seed,
                                 **result.metrics, "pretrain_seconds": round(pretrain_seconds, 1)})  # fmt: skip
                    bar.update()
    bar.close()
    results = pd.DataFrame(rows)
    summary = summarise(results)
    if out is not None:
        write_outputs(Path(out), results, summary, config)
    return results, summary


def write_outputs(out: Path, results: pd.DataFrame, summary: pd.DataFrame, config: AblationConfig) -> None:
    from ehrclip_kit.viz import label_efficiency, save_figure

    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "results.csv", results)
    write_csv(out / "summary.csv", summary)
    write_json(out / "ablation_config.json", to_dict(config))
    for task in summary["task"].unique():
        fig = label_efficiency(summary, metric="auroc", task=task)
        save_figure(fig, out / f"label_efficiency_{task}.html", out / f"label_efficiency_{task}.png")


def format_table(summary: pd.DataFrame, metric: str = "auroc") -> str:
    """A markdown table: methods as rows, label fractions as columns, ``mean [lo, hi]`` cells."""
    cells = summary[summary["metric"] == metric].copy()
    cells["cell"] = [
        f"{m:.3f} [{lo:.3f}, {hi:.3f}]"
        for m, lo, hi in zip(cells["mean"], cells["ci_low"], cells["ci_high"], strict=True)
    ]
    table = cells.pivot_table(
        index=["task", "method"], columns="label_fraction", values="cell", aggfunc="first", sort=False
    )
    header = ["task", "method", *[f"{c:g} labels" for c in table.columns]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (task, method), row in table.iterrows():
        lines.append("| " + " | ".join([task, method, *[str(v) for v in row.tolist()]]) + " |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cohort", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", choices=("smoke", "workshop", "paper"), default="workshop")
    parser.add_argument("--label-fractions", default=None, help="comma list, e.g. 0.01,0.05,0.1,1.0")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--tasks", default=None, help="comma list (default: both tasks)")
    parser.add_argument("--methods", default=None, help=f"comma list from {','.join(METHODS)}")


def run(args: argparse.Namespace) -> int:
    config = ablation_preset(args.preset)
    if args.label_fractions:
        config.label_fractions = tuple(float(f) for f in args.label_fractions.split(","))
    if args.seeds:
        config.seeds = args.seeds
    if args.tasks:
        config.tasks = tuple(args.tasks.split(","))
    if args.methods:
        unknown = set(args.methods.split(",")) - set(METHODS)
        if unknown:
            raise SystemExit(f"unknown method(s) {sorted(unknown)}; choose from {METHODS}")
        config.methods = tuple(args.methods.split(","))
    _, summary = run_ablation(args.cohort, args.out, config)
    print(format_table(summary))
    print(f"results -> {args.out}/results.csv, summary -> {args.out}/summary.csv")
    return 0
