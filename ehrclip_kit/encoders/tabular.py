"""Static EHR features of an admission -> a fixed-size vector: preprocessing and the TabNet encoder.

Two pieces, used together everywhere (masked pretraining, contrastive pretraining, fine-tuning, explain):

* :class:`TabularPreprocessor` turns a cohort table (see ``features.json``) into a float32 matrix. Every
  statistic it uses (medians, means, standard deviations, which codes exist, which columns get a missing
  indicator) is fitted on the **train split only**, so validation and test patients never leak into it.
* :class:`TabNetEhrEncoder` is pytorch-tabnet's ``EmbeddingGenerator`` + ``TabNetEncoder``, composed exactly
  as ``pytorch_tabnet.tab_network.TabNetPretraining`` composes them (attribute names ``embedder`` and
  ``encoder``), so masked-pretraining weights map onto it name for name. Its output is what
  ``TabNetNoEmbeddings`` feeds to its final mapping: the sum over decision steps of the ReLU'd step outputs.

Column layout of the matrix: categorical codes first (``cat_idxs = 0..k-1``), then the standardised numeric
columns, then one ``<name>__missing`` indicator per numeric feature that had missing values in train.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from pytorch_tabnet.tab_network import EmbeddingGenerator, TabNetEncoder
from pytorch_tabnet.utils import create_group_matrix
from torch import nn

from ehrclip_kit.io import write_json

MISSING_SUFFIX = "__missing"


# --------------------------------------------------------------------------------------------- features.json
def load_feature_spec(features: str | os.PathLike | Mapping[str, Any]) -> list[dict[str, Any]]:
    """Read ``features.json`` (a path or the already-loaded dict) and check each entry.

    >>> load_feature_spec({"features": [{"name": "age", "kind": "numeric", "source": "hosp/patients"}]})[0]["kind"]
    'numeric'
    """
    where = "features spec"
    if not isinstance(features, Mapping):
        where = str(features)
        with open(features) as f:
            features = json.load(f)
    entries = features.get("features")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{where}: expected a non-empty 'features' list")
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        name, kind = entry.get("name"), entry.get("kind")
        if not name or kind not in ("numeric", "categorical"):
            raise ValueError(
                f"{where}: feature #{i} needs a name and kind 'numeric'|'categorical', got {entry}"
            )
        if name in seen:
            raise ValueError(f"{where}: feature {name!r} is listed twice")
        seen.add(name)
        if kind == "categorical" and entry.get("categories") is not None and len(entry["categories"]) < 1:
            raise ValueError(f"{where}: categorical feature {name!r} has an empty 'categories' list")
    return [dict(e) for e in entries]


def _without_gross_outliers(values: np.ndarray, median: float, clip_z: float) -> np.ndarray:
    """Drop values more than ``clip_z`` robust SDs (IQR / 1.349) from the median, for the mean/std only.

    EHR tables hold unit errors and 999999 placeholders; three such values in a thousand inflate a plain
    standard deviation ~100-fold and squash every real value of the column to one point. They still get
    transformed (to +-clip_z); they just do not set the scale.
    """
    q1, q3 = np.percentile(values, [25, 75])
    robust_sd = (q3 - q1) / 1.349
    if robust_sd <= 1e-12:  # mostly one value (counts, flags): nothing robust to compare with
        return values
    keep = np.abs(values - median) <= clip_z * robust_sd
    return values[keep] if keep.any() else values


def _train_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows of the train split; a frame without a ``split`` column is taken to be train already."""
    if "split" not in frame.columns:
        return frame
    train = frame[frame["split"] == "train"]
    if train.empty:
        raise ValueError("cohort frame has a 'split' column but no rows with split == 'train'")
    return train


def _numeric_column(frame: pd.DataFrame, name: str) -> np.ndarray:
    if name not in frame.columns:
        raise KeyError(f"cohort frame has no feature column {name!r} (listed in features.json)")
    try:
        return pd.to_numeric(frame[name], errors="raise").to_numpy(dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError) as err:
        raise ValueError(f"feature column {name!r} is not numeric: {err}") from err


# ------------------------------------------------------------------------------------------- preprocessing
class TabularPreprocessor:
    """Impute, standardise and lay out cohort features for TabNet, with statistics from train only.

    * numeric: missing -> train median; then ``(x - train mean) / train std`` clipped to ``+-clip_z``, with
      mean and std computed without gross outliers (see :func:`_without_gross_outliers`);
      a ``<name>__missing`` 0/1 column is appended for each numeric feature with any missing value in train.
    * categorical: int codes kept (0 = unknown); codes never seen in train (or outside ``0..K-1``) become 0,
      so the embedding rows used at test time were all trained. ``K`` comes from ``features.json``.

    >>> frame = pd.DataFrame({"split": ["train"] * 3, "hr": [60.0, None, 100.0], "sex": [1, 2, 1]})
    >>> spec = {"features": [{"name": "hr", "kind": "numeric"},
    ...                      {"name": "sex", "kind": "categorical", "categories": ["__unknown__", "F", "M"]}]}
    >>> pre = TabularPreprocessor().fit(frame, spec)
    >>> pre.columns, pre.cat_idxs, pre.cat_dims
    (['sex', 'hr', 'hr__missing'], [0], [3])
    >>> pre.transform(frame).tolist()
    [[1.0, -1.0, 0.0], [2.0, 0.0, 1.0], [1.0, 1.0, 0.0]]
    """

    def __init__(self, clip_z: float = 8.0, missing_indicators: bool = True):
        self.clip_z = float(clip_z)
        self.missing_indicators = bool(missing_indicators)
        self.numeric: list[dict[str, Any]] = []  # name, median, mean, std, indicator
        self.categorical: list[dict[str, Any]] = []  # name, n_categories, seen codes
        self.fitted = False

    # -- fitting ------------------------------------------------------------------------------------------
    def fit(
        self, frame: pd.DataFrame, features: str | os.PathLike | Mapping[str, Any]
    ) -> TabularPreprocessor:
        """Fit on the rows with ``split == 'train'`` (all rows when the frame has no ``split`` column)."""
        spec = load_feature_spec(features)
        train = _train_rows(frame)
        self.numeric, self.categorical = [], []
        for entry in spec:
            name = entry["name"]
            values = _numeric_column(train, name)
            if entry["kind"] == "numeric":
                observed = values[~np.isnan(values)]
                if observed.size == 0:
                    # Nothing to learn from: the column becomes a constant 0 (plus its all-ones indicator).
                    median, mean, std = 0.0, 0.0, 1.0
                else:
                    median = float(np.median(observed))
                    inliers = _without_gross_outliers(observed, median, self.clip_z)
                    mean, std = float(inliers.mean()), float(inliers.std())
                    std = std if np.isfinite(std) and std > 1e-12 else 1.0
                indicator = self.missing_indicators and bool(np.isnan(values).any())
                self.numeric.append(dict(name=name, median=median, mean=mean, std=std, indicator=indicator))
            else:
                codes = np.nan_to_num(values, nan=0.0)
                if np.any(codes != np.round(codes)):
                    raise ValueError(f"categorical feature column {name!r} holds non-integer codes")
                codes = codes.astype(np.int64)
                cats = entry.get("categories")
                n_categories = len(cats) if cats is not None else int(max(codes.max(initial=0), 0)) + 1
                seen = sorted({int(c) for c in np.unique(codes) if 0 < c < n_categories})
                self.categorical.append(dict(name=name, n_categories=max(n_categories, 1), seen=seen))
        self.fitted = True
        return self

    # -- layout -------------------------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError(
                "TabularPreprocessor is not fitted: call .fit(train_frame, features_json) first"
            )

    @property
    def columns(self) -> list[str]:
        """Names of the output columns, in order."""
        self._check_fitted()
        names = [c["name"] for c in self.categorical] + [n["name"] for n in self.numeric]
        return names + [n["name"] + MISSING_SUFFIX for n in self.numeric if n["indicator"]]

    @property
    def column_features(self) -> list[str]:
        """The source feature of each output column (a missing indicator belongs to its feature)."""
        return [c.removesuffix(MISSING_SUFFIX) for c in self.columns]

    @property
    def feature_names(self) -> list[str]:
        """Feature names as in features.json, categorical first."""
        return [c["name"] for c in self.categorical] + [n["name"] for n in self.numeric]

    @property
    def cat_idxs(self) -> list[int]:
        self._check_fitted()
        return list(range(len(self.categorical)))

    @property
    def cat_dims(self) -> list[int]:
        self._check_fitted()
        return [c["n_categories"] for c in self.categorical]

    @property
    def n_inputs(self) -> int:
        return len(self.columns)

    # -- transform ----------------------------------------------------------------------------------------
    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        """Return the float32 matrix ``[len(frame), n_inputs]`` (categorical codes stored as floats)."""
        self._check_fitted()
        out = np.empty((len(frame), self.n_inputs), dtype=np.float32)
        j = 0
        for cat in self.categorical:
            codes = np.nan_to_num(_numeric_column(frame, cat["name"]), nan=0.0).astype(np.int64)
            out[:, j] = np.where(np.isin(codes, cat["seen"]), codes, 0)
            j += 1
        indicators = []
        for num in self.numeric:
            values = _numeric_column(frame, num["name"])
            missing = np.isnan(values)
            z = (np.where(missing, num["median"], values) - num["mean"]) / num["std"]
            out[:, j] = np.clip(z, -self.clip_z, self.clip_z)
            j += 1
            if num["indicator"]:
                indicators.append(missing)
        for missing in indicators:
            out[:, j] = missing
            j += 1
        return out

    def transform_tensors(self, frame: pd.DataFrame) -> dict[str, torch.Tensor]:
        """``{"x": float32 tensor [N, n_inputs]}``: the batch form the contrastive datasets use."""
        return {"x": torch.from_numpy(self.transform(frame))}

    # -- persistence --------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        self._check_fitted()
        return {
            "kind": "TabularPreprocessor",
            "clip_z": self.clip_z,
            "missing_indicators": self.missing_indicators,
            "numeric": self.numeric,
            "categorical": self.categorical,
            "columns": self.columns,
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> TabularPreprocessor:
        if state.get("kind") != "TabularPreprocessor":
            raise ValueError(f"not a TabularPreprocessor state (kind={state.get('kind')!r})")
        pre = cls(clip_z=state["clip_z"], missing_indicators=state["missing_indicators"])
        pre.numeric = [dict(n) for n in state["numeric"]]
        pre.categorical = [dict(c, seen=list(c["seen"])) for c in state["categorical"]]
        pre.fitted = True
        if "columns" in state and list(state["columns"]) != pre.columns:
            raise ValueError(
                "TabularPreprocessor state is inconsistent: stored columns differ from the layout"
            )
        return pre

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> TabularPreprocessor:
        return cls.from_dict(json.loads(Path(path).read_text()))


# ------------------------------------------------------------------------------------------------ encoder
@dataclass
class TabNetConfig:
    """TabNet hyper-parameters (names as in pytorch-tabnet). Defaults follow arXiv 2505.17643 (n_d = 128)."""

    n_d: int = 128
    n_a: int = 128
    n_steps: int = 3
    gamma: float = 1.3
    n_independent: int = 2
    n_shared: int = 2
    cat_emb_dim: int = 4
    virtual_batch_size: int = 128
    momentum: float = 0.02
    mask_type: str = "sparsemax"
    epsilon: float = 1e-15

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _tensor_attrs_to_buffers(module: nn.Module, names: Sequence[str]) -> None:
    """pytorch-tabnet keeps its group matrices as plain tensor attributes, which ``.to(device)`` ignores.

    Re-registering them as non-persistent buffers makes them follow the module to the GPU while keeping
    the state dict exactly pytorch-tabnet's (so weights still map name for name).
    """
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, torch.Tensor) and name not in module._buffers:
            delattr(module, name)
            module.register_buffer(name, value.detach().clone(), persistent=False)


def make_tabnet_device_safe(network: nn.Module) -> nn.Module:
    """Apply :func:`_tensor_attrs_to_buffers` to every pytorch-tabnet submodule of ``network``."""
    for sub in network.modules():
        if isinstance(sub, TabNetEncoder):
            _tensor_attrs_to_buffers(sub, ["group_attention_matrix"])
        elif isinstance(sub, EmbeddingGenerator):
            _tensor_attrs_to_buffers(sub, ["embedding_group_matrix"])
        elif type(sub).__name__ == "RandomObfuscator":
            _tensor_attrs_to_buffers(sub, ["group_matrix"])
    return network


class TabNetEhrEncoder(nn.Module):
    """TabNet encoder for one admission's feature row: ``(B, n_inputs) -> (B, n_d)``.

    ``embedder`` (categorical embeddings) and ``encoder`` (``TabNetEncoder``) carry the same names as in
    ``TabNetPretraining``; freeze "embedding and initial splitter" with the prefixes ``"embedder"`` and
    ``"encoder.initial_splitter"``. Note that the initial splitter owns the *shared* GLU linear layers
    that every decision step reuses (pytorch-tabnet shares them by reference), so freezing it freezes those.

    >>> enc = TabNetEhrEncoder(5, cat_idxs=[0], cat_dims=[3], n_d=8, n_a=8, virtual_batch_size=4)
    >>> enc(torch.tensor([[1.0, 0.1, 0.2, 0.3, 0.0], [2.0, 0.0, 0.0, 1.0, 1.0]])).shape
    torch.Size([2, 8])
    """

    def __init__(
        self,
        input_dim: int,
        cat_idxs: Sequence[int] = (),
        cat_dims: Sequence[int] = (),
        cat_emb_dim: int | Sequence[int] = 4,
        n_d: int = 128,
        n_a: int = 128,
        n_steps: int = 3,
        gamma: float = 1.3,
        n_independent: int = 2,
        n_shared: int = 2,
        virtual_batch_size: int = 128,
        momentum: float = 0.02,
        mask_type: str = "sparsemax",
        epsilon: float = 1e-15,
    ):
        super().__init__()
        cat_idxs, cat_dims = [int(i) for i in cat_idxs], [int(d) for d in cat_dims]
        if len(cat_idxs) != len(cat_dims):
            raise ValueError(f"cat_idxs ({len(cat_idxs)}) and cat_dims ({len(cat_dims)}) differ in length")
        if cat_idxs != sorted(cat_idxs) or any(not 0 <= i < input_dim for i in cat_idxs):
            raise ValueError(
                f"cat_idxs must be sorted column indices below input_dim={input_dim}: {cat_idxs}"
            )
        emb_dims = [int(cat_emb_dim)] * len(cat_idxs) if isinstance(cat_emb_dim, int) else list(cat_emb_dim)
        if len(emb_dims) != len(cat_idxs):
            raise ValueError("cat_emb_dim must be an int or one size per categorical column")
        self.hparams = dict(
            input_dim=int(input_dim), cat_idxs=cat_idxs, cat_dims=cat_dims, cat_emb_dim=emb_dims, n_d=n_d,
            n_a=n_a, n_steps=n_steps, gamma=gamma, n_independent=n_independent, n_shared=n_shared,
            virtual_batch_size=virtual_batch_size, momentum=momentum, mask_type=mask_type, epsilon=epsilon,
        )  # fmt: skip
        # Same construction as TabNetPretraining.__init__ (embedder, then encoder on the embedded width).
        self.embedder = EmbeddingGenerator(
            input_dim, cat_dims, cat_idxs, emb_dims, create_group_matrix([], input_dim)
        )
        self.encoder = TabNetEncoder(
            input_dim=self.embedder.post_embed_dim,
            output_dim=self.embedder.post_embed_dim,
            n_d=n_d,
            n_a=n_a,
            n_steps=n_steps,
            gamma=gamma,
            n_independent=n_independent,
            n_shared=n_shared,
            epsilon=epsilon,
            virtual_batch_size=virtual_batch_size,
            momentum=momentum,
            mask_type=mask_type,
            group_attention_matrix=self.embedder.embedding_group_matrix,
        )
        make_tabnet_device_safe(self)
        self.out_dim = int(n_d)
        self.input_dim = int(input_dim)

    @classmethod
    def from_preprocessor(cls, preprocessor: TabularPreprocessor, config: TabNetConfig | None = None):
        """Build an encoder whose input layout matches a fitted preprocessor."""
        config = config or TabNetConfig()
        return cls(preprocessor.n_inputs, preprocessor.cat_idxs, preprocessor.cat_dims, **config.to_dict())

    @staticmethod
    def _as_tensor(x) -> torch.Tensor:
        # Contrastive batches may hand over the preprocessor's {"x": tensor} dict.
        return x["x"] if isinstance(x, Mapping) else x

    def forward_with_sparsity(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """Representation and TabNet's mask-entropy term ``M_loss`` (for an optional sparsity penalty)."""
        steps_output, m_loss = self.encoder(self.embedder(self._as_tensor(x)))
        # TabNetEncoder already applies ReLU to each step; TabNetNoEmbeddings sums the steps like this.
        return torch.sum(torch.stack(steps_output, dim=0), dim=0), m_loss

    def forward(self, x) -> torch.Tensor:
        return self.forward_with_sparsity(x)[0]

    def forward_masks(self, x) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """``(M_explain, masks)`` in the *embedded* column space, as pytorch-tabnet's ``forward_masks``.

        Use :func:`embedded_to_input_importance` to sum embedding dimensions back to input columns.
        """
        return self.encoder.forward_masks(self.embedder(self._as_tensor(x)))

    def embedded_columns(self) -> np.ndarray:
        """For each embedded dimension, the index of the input column it comes from."""
        group = self.embedder.embedding_group_matrix.detach().cpu().numpy()  # (input_dim, post_embed_dim)
        return np.argmax(group > 0, axis=0)


def embedded_to_input_importance(values: torch.Tensor | np.ndarray, encoder: TabNetEhrEncoder) -> np.ndarray:
    """Sum ``(N, post_embed_dim)`` importances (e.g. ``M_explain``) back to ``(N, input_dim)`` columns."""
    values = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    owner = encoder.embedded_columns()
    out = np.zeros((values.shape[0], encoder.input_dim), dtype=np.float64)
    np.add.at(out.T, owner, values.T)
    return out
