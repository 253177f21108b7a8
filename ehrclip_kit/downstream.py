"""Text-free downstream prediction: fine-tune an EHR encoder from any stage, or fit a baseline, and test it.

Methods: ``random`` (TabNet from random init), a pretraining run folder (masked, contrastive or both,
written by ``ehrclip pretrain``), and the baselines ``xgboost`` and ``logistic``. Only the EHR features are
used: the note is never needed at inference. Test-split metrics: AUROC, AUPRC and Brier score with 95 %
bootstrap CIs, and a calibration table.

``ehrclip finetune --cohort C --task readmission_30d --encoder RUN|random --out OUT``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ehrclip_kit.data.datasets import load_task
from ehrclip_kit.encoders.tabular import TabNetConfig, TabNetEhrEncoder, TabularPreprocessor
from ehrclip_kit.evaluation import binary_metrics, calibration_curve
from ehrclip_kit.finetune import FinetuneConfig, finetune, predict_proba
from ehrclip_kit.io import write_csv, write_json, write_parquet
from ehrclip_kit.pretrain import random_encoder, split_rows

BASELINE_METHODS = ("xgboost", "logistic")


@dataclasses.dataclass
class Evaluated:
    """One fitted model's test predictions and metrics."""

    method: str
    probabilities: np.ndarray
    metrics: dict[str, Any]
    history: list[dict] | None = None


def fit_and_test(
    method: str,
    frame: pd.DataFrame,
    features: dict,
    label_fraction: float,
    seed: int,
    encoder: TabNetEhrEncoder | None = None,
    preprocessor: TabularPreprocessor | None = None,
    finetune_config: FinetuneConfig | None = None,
    n_boot: int = 1000,
) -> Evaluated:
    """Train ``method`` on ``label_fraction`` of the train split (seeded), early-stop on val, score test."""
    train, val, test = (split_rows(frame, s) for s in ("train", "val", "test"))
    if len(test) == 0 or test["label"].nunique() < 2:
        raise ValueError("the test split needs both classes to report AUROC; use a larger cohort")
    t0 = time.perf_counter()
    history = None
    if method in BASELINE_METHODS:
        from ehrclip_kit.baselines import train_baseline

        model = train_baseline(method, train, val, features, label_fraction=label_fraction, seed=seed)
        proba, n_train = model.predict_proba(test), model.n_train
    else:
        if encoder is None or preprocessor is None:
            raise ValueError(f"method {method!r} needs an encoder and its preprocessor")
        config = dataclasses.replace(
            finetune_config or FinetuneConfig(), label_fraction=label_fraction, seed=seed
        )
        model, history = finetune(encoder, preprocessor, train, val, config)
        proba, n_train = predict_proba(model, preprocessor, test), model.n_train
    metrics = binary_metrics(test["label"].to_numpy(), proba, n_boot=n_boot, seed=seed)
    metrics.update(n_train=int(n_train), seconds=round(time.perf_counter() - t0, 2))
    return Evaluated(method, proba, metrics, history)


def encoder_from_source(
    source: str, frame: pd.DataFrame, features: dict, tabnet: TabNetConfig, seed: int
) -> tuple[TabNetEhrEncoder, TabularPreprocessor, str]:
    """``random`` -> a fresh encoder (preprocessor fitted on train); else a pretraining run folder."""
    if source == "random":
        preprocessor = TabularPreprocessor().fit(split_rows(frame, "train"), features)
        return random_encoder(preprocessor, tabnet, seed), preprocessor, "random"
    from ehrclip_kit.pretrain import load_pretrained

    encoder, preprocessor, config = load_pretrained(source)
    return encoder, preprocessor, "+".join(config.stages) or "random"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cohort", type=Path, required=True)
    parser.add_argument("--task", default="readmission_30d")
    parser.add_argument(
        "--encoder", default="random", help="'random', 'xgboost', 'logistic' or a pretrain run folder"
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--label-fraction", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument(
        "--freeze", default="embedder,encoder.initial_splitter", help="comma list of module prefixes"
    )
    parser.add_argument("--n-d", type=int, default=32, help="TabNet width for --encoder random")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    frame, features = load_task(args.cohort, args.task)
    config = FinetuneConfig(
        epochs=args.epochs, lr=args.lr, freeze_prefixes=tuple(p for p in args.freeze.split(",") if p),
        progress=not args.no_progress,
    )  # fmt: skip
    encoder = preprocessor = None
    method = args.encoder
    if args.encoder not in BASELINE_METHODS:
        tabnet = TabNetConfig(n_d=args.n_d, n_a=args.n_d)
        encoder, preprocessor, method = encoder_from_source(args.encoder, frame, features, tabnet, args.seed)
    result = fit_and_test(
        method, frame, features, args.label_fraction, args.seed, encoder, preprocessor, config
    )
    test = split_rows(frame, "test")
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "metrics.json", {"task": args.task, "method": method, "label_fraction": args.label_fraction,
                                          "seed": args.seed, **result.metrics, "history": result.history})  # fmt: skip
    write_parquet(args.out / "test_predictions.parquet",
                  test[["subject_id", "hadm_id", "label"]].assign(probability=result.probabilities))  # fmt: skip
    write_csv(args.out / "calibration.csv", calibration_curve(test["label"].to_numpy(), result.probabilities))
    m = result.metrics
    print(
        f"{args.task} {method} @ {args.label_fraction:g} labels: AUROC {m['auroc']:.3f} "
        f"[{m['auroc_lo']:.3f}, {m['auroc_hi']:.3f}], AUPRC {m['auprc']:.3f}, Brier {m['brier']:.3f} -> {args.out}"
    )
    return 0
