"""Text-free fine-tuning of a (pre)trained EHR encoder for a binary outcome.

The encoder can come from any stage — random init, masked pretraining, contrastive pretraining, or both —
because every stage ends in the same :class:`~ehrclip_kit.encoders.tabular.TabNetEhrEncoder`; contrastive
checkpoints are read with :func:`load_encoder_state`. Following arXiv 2505.17643, the early layers (the
categorical embeddings and TabNet's initial splitter) are frozen, a small feed-forward head is added, and
training minimises an imbalance-aware BCE with early stopping on validation AUROC. Only the EHR table is
used: no note is needed at inference.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm.auto import tqdm

from ehrclip_kit.encoders.tabular import TabNetEhrEncoder, TabularPreprocessor
from ehrclip_kit.evaluation import subsample_labels
from ehrclip_kit.masked_pretraining import resolve_device


@dataclass
class FinetuneConfig:
    """Fine-tuning settings; defaults follow the paper (15 epochs, lr 5e-4, frozen embedding + splitter).

    ``pos_weight="auto"`` up-weights positives to balance the classes, which helps ranking (AUROC) under
    imbalance but inflates predicted risks: use ``pos_weight=None`` when calibration / Brier score matter.
    """

    epochs: int = 15
    lr: float = 5e-4
    weight_decay: float = 1e-5
    batch_size: int = 256
    freeze_prefixes: tuple[str, ...] = ("embedder", "encoder.initial_splitter")
    head_hidden: int = 64
    dropout: float = 0.1
    patience: int = 3  # epochs without a better validation AUROC before stopping
    pos_weight: float | str | None = "auto"  # "auto" = n_negative / n_positive of the (subsampled) train set
    clip_value: float | None = 1.0  # gradient-norm clipping (pytorch-tabnet's default)
    # An "epoch" is at least this many optimiser steps (more passes over the data when it is small), so a
    # 1 %-label run is not stopped after a handful of updates while the full-label run gets hundreds.
    min_steps_per_epoch: int = 20
    lambda_sparse: float = 0.0  # optional TabNet mask-sparsity penalty (pytorch-tabnet default: 1e-3)
    seed: int = 0
    label_fraction: float = 1.0
    device: str = "auto"
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EhrClassifier(nn.Module):
    """Encoder + feed-forward head -> one logit per admission."""

    def __init__(self, encoder: TabNetEhrEncoder, head_hidden: int = 64, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        if head_hidden > 0:
            self.head = nn.Sequential(
                nn.Linear(encoder.out_dim, head_hidden),
                nn.ReLU(),
                nn.Dropout(dropout),
                nn.Linear(head_hidden, 1),
            )
        else:
            self.head = nn.Linear(encoder.out_dim, 1)

    def forward_with_sparsity(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        h, m_loss = self.encoder.forward_with_sparsity(x)
        return self.head(h).squeeze(-1), m_loss

    def forward(self, x) -> torch.Tensor:
        return self.forward_with_sparsity(x)[0]


# ------------------------------------------------------------------------------------------- loading/freezing
def load_encoder_state(
    encoder: nn.Module, path_or_state: str | os.PathLike | Mapping[str, torch.Tensor], prefix: str = ""
) -> list[str]:
    """Load the tensors under ``prefix`` of a state dict (or a ``.safetensors`` file) into ``encoder``.

    For a contrastive checkpoint written by the trainer the EHR encoder lives under
    ``prefix="encoders.ehr."``. Raises ``KeyError`` naming every missing or unexpected key, and
    ``ValueError`` on shape mismatches. Names that are *aliases* of one shared tensor (TabNet shares its GLU
    layers between steps; ``safetensors.torch.save_model`` keeps one name per shared tensor) are filled from
    whichever alias is present. Returns the list of loaded encoder keys.
    """
    if isinstance(path_or_state, Mapping):
        state, where = dict(path_or_state), "state dict"
    else:
        from safetensors.torch import load_file

        where = str(path_or_state)
        state = load_file(where)
    sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not sub:
        raise KeyError(f"{where}: no tensor starts with prefix {prefix!r}")
    target = encoder.state_dict()
    # Group target names by the storage they point to, so aliases of one shared tensor count as one.
    alias_groups: dict[int, list[str]] = {}
    for name, tensor in target.items():
        alias_groups.setdefault(tensor.data_ptr() if tensor.numel() else id(tensor), []).append(name)
    full, missing = {}, []
    for names in alias_groups.values():
        present = [n for n in names if n in sub]
        if not present:
            missing += names
            continue
        for n in names:
            full[n] = sub[present[0]]
    unexpected = sorted(set(sub) - set(target))
    if missing or unexpected:
        raise KeyError(
            f"{where} (prefix {prefix!r}) does not match the encoder: missing {sorted(missing)[:10]}"
            f"{' ...' if len(missing) > 10 else ''} ({len(missing)} in all), unexpected {unexpected[:10]}"
            f"{' ...' if len(unexpected) > 10 else ''} ({len(unexpected)} in all)"
        )
    bad = [
        f"{k}: {tuple(v.shape)} vs {tuple(target[k].shape)}"
        for k, v in full.items()
        if v.shape != target[k].shape
    ]
    if bad:
        raise ValueError(f"{where}: shape mismatch for " + "; ".join(bad[:10]))
    encoder.load_state_dict(full, strict=True)
    return sorted(full)


def freeze_by_prefix(module: nn.Module, prefixes: Sequence[str]) -> list[str]:
    """Set ``requires_grad=False`` on parameters whose name (any alias) starts with one of ``prefixes``.

    A prefix matches at a name boundary ("encoder.initial_splitter" does not match "encoder.initial_splitterX").
    Returns the frozen parameter names (first alias of each).
    """
    frozen = []
    prefixes = tuple(prefixes)
    names_of: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    for name, param in module.named_parameters():
        if any(n == p or n.startswith(p + ".") for n in names_of[id(param)] for p in prefixes):
            param.requires_grad_(False)
            frozen.append(name)
    if prefixes and not frozen:
        raise ValueError(f"freeze prefixes {prefixes} match no parameter of {type(module).__name__}")
    return frozen


# --------------------------------------------------------------------------------------------- training
def _labels(frame: pd.DataFrame, where: str) -> np.ndarray:
    if "label" not in frame.columns:
        raise KeyError(f"{where} frame has no 'label' column")
    y = frame["label"].to_numpy()
    if pd.isna(y).any() or not np.isin(y, (0, 1)).all():
        raise ValueError(f"{where} frame: 'label' must be 0/1 without missing values")
    return y.astype(np.float32)


def _auroc(y: np.ndarray, p: np.ndarray, where: str) -> float:
    if len(np.unique(y)) < 2:
        raise ValueError(f"{where} split has a single class: AUROC (early stopping) is undefined")
    return float(roc_auc_score(y, p))


@torch.no_grad()
def _predict_x(model: nn.Module, x: np.ndarray, device, batch_size: int = 2048) -> np.ndarray:
    was_training = model.training
    model.eval()
    out = [
        torch.sigmoid(model(torch.as_tensor(x[i : i + batch_size], device=device))).float().cpu().numpy()
        for i in range(0, len(x), batch_size)
    ]
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def predict_proba(
    model: nn.Module, preprocessor: TabularPreprocessor, frame: pd.DataFrame, batch_size: int = 2048
) -> np.ndarray:
    """Predicted probability of the positive class for each row of ``frame`` (EHR features only)."""
    device = next(model.parameters()).device
    return _predict_x(model, preprocessor.transform(frame), device, batch_size)


def finetune(
    encoder: TabNetEhrEncoder,
    preprocessor: TabularPreprocessor,
    train_frame: pd.DataFrame,
    val_frame: pd.DataFrame,
    config: FinetuneConfig | None = None,
) -> tuple[EhrClassifier, list[dict[str, float]]]:
    """Fine-tune a copy of ``encoder`` with a new head; return ``(model, history)``.

    ``label_fraction`` keeps that share of the train rows per class (:func:`subsample_labels`, seeded by
    ``seed``); validation is never subsampled. After training the weights of the best validation-AUROC
    epoch are restored; ``history`` has one dict per epoch (``epoch, train_loss, val_auroc, best``) and the
    model carries ``best_epoch``, ``n_train`` and ``frozen_parameters``. The caller's encoder is left untouched.
    """
    config = config or FinetuneConfig()
    for frame, split in ((train_frame, "train"), (val_frame, "val")):
        if "split" in frame.columns and not (frame["split"] == split).all():
            raise ValueError(f"finetune: the {split} frame holds rows of other splits")
    device = resolve_device(config.device)
    train = subsample_labels(train_frame, config.label_fraction, config.seed)
    y_train, y_val = _labels(train, "train"), _labels(val_frame, "val")
    x_train, x_val = preprocessor.transform(train), preprocessor.transform(val_frame)
    if encoder.input_dim != x_train.shape[1]:
        raise ValueError(f"encoder expects {encoder.input_dim} inputs, preprocessor gives {x_train.shape[1]}")
    n_pos = float(y_train.sum())
    if config.pos_weight == "auto":
        pos_weight = (len(y_train) - n_pos) / max(n_pos, 1.0)
    else:
        pos_weight = None if config.pos_weight is None else float(config.pos_weight)
    loss_fn = nn.BCEWithLogitsLoss(
        pos_weight=None if pos_weight is None else torch.tensor(pos_weight, device=device)
    )

    devices = [device.index or 0] if device.type == "cuda" else []
    history: list[dict[str, float]] = []
    with torch.random.fork_rng(devices=devices):  # head init and dropout draw from the seeded global RNG
        torch.manual_seed(config.seed)
        model = EhrClassifier(copy.deepcopy(encoder), config.head_hidden, config.dropout).to(device)
        model.frozen_parameters = [
            "encoder." + n for n in freeze_by_prefix(model.encoder, config.freeze_prefixes)
        ]
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        order_rng = np.random.default_rng(config.seed)
        best_auc, best_state, stale = -np.inf, None, 0
        model.best_epoch, model.n_train = -1, len(y_train)
        bar = tqdm(range(config.epochs), desc="fine-tuning", disable=not config.progress)
        for epoch in bar:
            model.train()
            batches = []
            while not batches or len(batches) < config.min_steps_per_epoch:
                perm = order_rng.permutation(len(x_train))
                passes = [perm[i : i + config.batch_size] for i in range(0, len(perm), config.batch_size)]
                if len(passes) > 1 and len(passes[-1]) < 2:  # BatchNorm cannot train on one row
                    passes = passes[:-1]
                batches += passes
            total = 0.0
            for idx in batches:
                xb = torch.as_tensor(x_train[idx], device=device)
                yb = torch.as_tensor(y_train[idx], device=device)
                logits, m_loss = model.forward_with_sparsity(xb)
                loss = loss_fn(logits, yb)
                if config.lambda_sparse:
                    loss = loss - config.lambda_sparse * m_loss  # pytorch-tabnet's sign convention
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.clip_value:
                    nn.utils.clip_grad_norm_(params, config.clip_value)
                optimizer.step()
                total += loss.item() * len(idx)
            val_auc = _auroc(y_val, _predict_x(model, x_val, device), "validation")
            improved = val_auc > best_auc
            history.append(
                {
                    "epoch": epoch,
                    "train_loss": total / max(sum(len(b) for b in batches), 1),
                    "val_auroc": val_auc,
                    "best": improved,
                }
            )
            bar.set_postfix(loss=f"{history[-1]['train_loss']:.3f}", val_auroc=f"{val_auc:.3f}")
            if improved:
                best_auc, model.best_epoch, stale = val_auc, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
                if stale >= config.patience:
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return model, history
