"""Baselines on the same cohort features: gradient-boosted trees (XGBoost) and logistic regression.

Both see exactly what the TabNet models see — the feature columns of ``features.json``, the same train
rows after :func:`~ehrclip_kit.evaluation.subsample_labels` with the same ``(label_fraction, seed)`` — and
neither ever fits anything on validation or test rows (validation is used only for XGBoost's early stopping).

XGBoost is the paper's baseline. We depend on ``xgboost-cpu`` (3.2): the same ``xgboost`` module as the
default wheel, but CPU-only, which avoids the default wheel's ~470 MB ``nvidia-nccl`` dependency. Trees
handle missing values natively (NaN goes down a learned default branch) and categorical codes are passed as
pandas categoricals so XGBoost's native categorical splits apply (code 0 = unknown is just one more level).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from ehrclip_kit.encoders.tabular import load_feature_spec
from ehrclip_kit.evaluation import subsample_labels

FeatureSpec = str | os.PathLike | Mapping[str, Any]


def _split_features(features: FeatureSpec) -> tuple[list[str], list[tuple[str, int | None]]]:
    spec = load_feature_spec(features)
    numeric = [f["name"] for f in spec if f["kind"] == "numeric"]
    categorical = [
        (f["name"], len(f["categories"]) if f.get("categories") is not None else None)
        for f in spec
        if f["kind"] == "categorical"
    ]
    return numeric, categorical


def _labels(frame: pd.DataFrame, where: str) -> np.ndarray:
    if "label" not in frame.columns:
        raise KeyError(f"{where} frame has no 'label' column")
    y = frame["label"]
    if y.isna().any() or not y.isin([0, 1]).all():
        raise ValueError(f"{where} frame: 'label' must be 0/1 without missing values")
    return y.to_numpy(dtype=np.int64)


def _check_split(frame: pd.DataFrame, split: str, who: str) -> None:
    if "split" in frame.columns and not (frame["split"] == split).all():
        raise ValueError(f"{who}: the {split} frame holds rows of other splits")


# --------------------------------------------------------------------------------------------------- XGBoost
@dataclass
class XGBoostConfig:
    n_estimators: int = 2000  # an upper bound; early stopping on validation AUROC picks the number
    learning_rate: float = 0.05
    max_depth: int = 4
    min_child_weight: float = 1.0
    subsample: float = 0.8
    colsample_bytree: float = 0.8
    reg_lambda: float = 1.0
    early_stopping_rounds: int = 50
    native_categorical: bool = True
    n_jobs: int = 1
    seed: int = 0
    label_fraction: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class XGBoostBaseline:
    """A fitted XGBoost classifier plus the column layout it expects."""

    def __init__(
        self, model, numeric: list[str], categorical: list[tuple[str, int]], native_categorical: bool
    ):
        self.model, self.numeric, self.categorical = model, numeric, categorical
        self.native_categorical = native_categorical
        self.n_train = 0  # rows actually used for fitting (after label-fraction subsampling)

    def matrix(self, frame: pd.DataFrame) -> pd.DataFrame:
        missing = [c for c in self.numeric + [n for n, _ in self.categorical] if c not in frame.columns]
        if missing:
            raise KeyError(f"cohort frame lacks feature columns {missing}")
        out = frame[self.numeric].astype("float32")
        for name, k in self.categorical:
            codes = pd.to_numeric(frame[name]).fillna(0).astype("int64")
            codes = codes.where((codes >= 0) & (codes < k), 0)  # unknown/out-of-range -> 0 like TabNet's side
            out[name] = pd.Categorical(codes, categories=range(k)) if self.native_categorical else codes
        return out

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        return self.model.predict_proba(self.matrix(frame))[:, 1]

    @property
    def best_iteration(self) -> int:
        return int(self.model.best_iteration)


def train_xgboost(
    train_frame: pd.DataFrame,
    val_frame: pd.DataFrame,
    features: FeatureSpec,
    config: XGBoostConfig | None = None,
) -> XGBoostBaseline:
    """Fit gradient-boosted trees on (a label fraction of) train, early-stopped on validation AUROC."""
    from xgboost import XGBClassifier  # imported here: only the baselines need it

    config = config or XGBoostConfig()
    _check_split(train_frame, "train", "train_xgboost")
    _check_split(val_frame, "val", "train_xgboost")
    train = subsample_labels(train_frame, config.label_fraction, config.seed)
    numeric, categorical = _split_features(features)
    # Without categories in features.json, size the code range from train (codes above it become unknown).
    categorical = [(n, k if k is not None else int(train[n].max()) + 1) for n, k in categorical]
    layout = XGBoostBaseline(None, numeric, categorical, config.native_categorical)
    model = XGBClassifier(
        n_estimators=config.n_estimators,
        learning_rate=config.learning_rate,
        max_depth=config.max_depth,
        min_child_weight=config.min_child_weight,
        subsample=config.subsample,
        colsample_bytree=config.colsample_bytree,
        reg_lambda=config.reg_lambda,
        early_stopping_rounds=config.early_stopping_rounds,
        eval_metric="auc",
        tree_method="hist",
        enable_categorical=config.native_categorical,
        n_jobs=config.n_jobs,
        random_state=config.seed,
    )
    model.fit(
        layout.matrix(train),
        _labels(train, "train"),
        eval_set=[(layout.matrix(val_frame), _labels(val_frame, "val"))],
        verbose=False,
    )
    layout.model, layout.n_train = model, len(train)
    return layout


# ------------------------------------------------------------------------------------- logistic regression
@dataclass
class LogisticConfig:
    C: float = 1.0
    max_iter: int = 2000
    seed: int = 0
    label_fraction: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LogisticBaseline:
    """Median imputation + missing indicators + scaling, one-hot categoricals, balanced logistic regression."""

    def __init__(self, pipeline, numeric: list[str], categorical: list[str]):
        self.pipeline, self.numeric, self.categorical = pipeline, numeric, categorical
        self.n_train = 0

    def matrix(self, frame: pd.DataFrame) -> pd.DataFrame:
        missing = [c for c in self.numeric + self.categorical if c not in frame.columns]
        if missing:
            raise KeyError(f"cohort frame lacks feature columns {missing}")
        out = frame[self.numeric + self.categorical].copy()
        out[self.categorical] = out[self.categorical].fillna(0).astype("int64")
        return out

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        return self.pipeline.predict_proba(self.matrix(frame))[:, 1]


def train_logistic(
    train_frame: pd.DataFrame,
    val_frame: pd.DataFrame | None,
    features: FeatureSpec,
    config: LogisticConfig | None = None,
) -> LogisticBaseline:
    """Fit the logistic-regression baseline on (a label fraction of) train only.

    ``val_frame`` is accepted for a uniform signature with :func:`train_xgboost` and is not used.
    """
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    config = config or LogisticConfig()
    _check_split(train_frame, "train", "train_logistic")
    train = subsample_labels(train_frame, config.label_fraction, config.seed)
    numeric, categorical = _split_features(features)
    cat_names = [n for n, _ in categorical]
    transformers = []
    if numeric:
        num_pipe = Pipeline(
            [("impute", SimpleImputer(strategy="median", add_indicator=True, keep_empty_features=True)),
             ("scale", StandardScaler())]
        )  # fmt: skip
        transformers.append(("num", num_pipe, numeric))
    if cat_names:
        # Unknown or unseen codes encode as all zeros, like the reference level.
        transformers.append(("cat", OneHotEncoder(handle_unknown="ignore"), cat_names))
    pipeline = Pipeline(
        [
            ("prep", ColumnTransformer(transformers)),
            ("clf", LogisticRegression(C=config.C, class_weight="balanced", max_iter=config.max_iter,
                                       random_state=config.seed)),
        ]
    )  # fmt: skip
    model = LogisticBaseline(pipeline, numeric, cat_names)
    pipeline.fit(model.matrix(train), _labels(train, "train"))
    model.n_train = len(train)
    return model


BASELINES: dict[str, Callable[..., Any]] = {"xgboost": train_xgboost, "logistic": train_logistic}
CONFIGS: dict[str, type] = {"xgboost": XGBoostConfig, "logistic": LogisticConfig}


def train_baseline(
    name: str, train_frame: pd.DataFrame, val_frame: pd.DataFrame, features: FeatureSpec, **config: Any
):
    """Uniform entry point for the ablation grid: ``train_baseline("xgboost", tr, va, spec, seed=1)``."""
    if name not in BASELINES:
        raise KeyError(f"unknown baseline {name!r}; choose from {sorted(BASELINES)}")
    return BASELINES[name](train_frame, val_frame, features, CONFIGS[name](**config))
