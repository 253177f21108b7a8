"""Masked-feature pretraining of the TabNet encoder, then an audited hand-over of its weights.

The network is pytorch-tabnet's own ``TabNetPretraining`` (embedder -> random obfuscation -> TabNet encoder
-> TabNet decoder) and the loss is pytorch-tabnet's ``UnsupervisedLoss`` (reconstruction error on the
hidden entries, scaled by each embedded column's batch variance). We drive it with a short loop of our own
so that the randomness comes from one explicit seed, the validation loss is a *masked* reconstruction loss
(pytorch-tabnet's eval mode reconstructs with nothing hidden), and only the train split is ever seen.

``transfer_pretrained_weights`` then copies the embedder and encoder into a :class:`TabNetEhrEncoder`
through an explicit name map and raises unless every tensor of the encoder's state dict was filled with a
tensor of the same shape: pytorch-tabnet's ``load_weights_from_unsupervised`` silently skips names that do
not match, which would leave a "pretrained" encoder partly random without anyone noticing.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from pytorch_tabnet.metrics import UnsupervisedLoss
from pytorch_tabnet.tab_network import TabNetPretraining
from pytorch_tabnet.utils import create_group_matrix
from torch import nn
from tqdm.auto import tqdm

from ehrclip_kit.encoders.tabular import (
    TabNetConfig,
    TabNetEhrEncoder,
    TabularPreprocessor,
    make_tabnet_device_safe,
)


@dataclass
class MaskedPretrainConfig:
    """Masked reconstruction settings; Adam ``lr``, ``batch_size``, ``clip_value`` and the ratio are
    pytorch-tabnet's defaults. Without the gradient clipping the variance-scaled loss spikes on some batches
    and the network settles near "predict the mean" (train loss ~0.95 instead of ~0.85 on the test cohort).
    """

    pretraining_ratio: float = 0.2  # share of features hidden per row
    epochs: int = 50
    batch_size: int = 1024
    lr: float = 2e-2
    weight_decay: float = 0.0
    clip_value: float | None = 1.0  # gradient-norm clipping, pytorch-tabnet's default (it matters: see below)
    patience: int = 5  # epochs without validation improvement before stopping
    n_shared_decoder: int = 1
    n_indep_decoder: int = 1
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TransferReport:
    """What :func:`transfer_pretrained_weights` copied: ``target name -> source name``, and what it left."""

    mapping: dict[str, str] = field(default_factory=dict)
    unused_source: list[str] = field(default_factory=list)  # e.g. the decoder, which the encoder lacks

    @property
    def n_transferred(self) -> int:
        return len(self.mapping)


@dataclass
class MaskedPretrainResult:
    encoder: TabNetEhrEncoder  # pretrained weights, ready for contrastive training or fine-tuning
    network: TabNetPretraining  # the full pretraining network (with decoder), on CPU
    history: list[dict[str, float]]
    best_epoch: int
    transfer: TransferReport


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def build_pretraining_network(
    preprocessor: TabularPreprocessor,
    tabnet: TabNetConfig | None = None,
    config: MaskedPretrainConfig | None = None,
    seed: int | None = None,
) -> TabNetPretraining:
    """pytorch-tabnet's ``TabNetPretraining`` for the preprocessor's column layout (device-safe).

    With ``seed`` the weights are drawn from ``torch.manual_seed(seed)`` without touching the caller's RNG;
    ``seed=config.seed`` gives exactly the network :func:`masked_pretrain` starts from, the fair "before
    training" baseline for reconstruction errors.
    """
    tabnet, config = tabnet or TabNetConfig(), config or MaskedPretrainConfig()
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_pretraining_network(preprocessor, tabnet, config)
    hp = tabnet.to_dict()
    cat_emb_dim = [hp.pop("cat_emb_dim")] * len(preprocessor.cat_idxs)
    network = TabNetPretraining(
        preprocessor.n_inputs,
        pretraining_ratio=config.pretraining_ratio,
        cat_idxs=preprocessor.cat_idxs,
        cat_dims=preprocessor.cat_dims,
        cat_emb_dim=cat_emb_dim,
        n_shared_decoder=config.n_shared_decoder,
        n_indep_decoder=config.n_indep_decoder,
        group_attention_matrix=create_group_matrix([], preprocessor.n_inputs),
        **hp,
    )
    return make_tabnet_device_safe(network)


# ------------------------------------------------------------------------------------------ weight transfer
def _source_network(source: Any) -> tuple[nn.Module, dict[str, str]]:
    """The module holding the weights and its ``source prefix -> encoder prefix`` map."""
    network = getattr(source, "network", source)  # TabNetPretrainer / TabNetClassifier wrappers
    if hasattr(network, "tabnet") and hasattr(network.tabnet, "encoder"):  # supervised pytorch_tabnet TabNet
        return network, {"embedder.": "embedder.", "tabnet.encoder.": "encoder."}
    if hasattr(network, "embedder") and hasattr(network, "encoder"):  # TabNetPretraining, TabNetEhrEncoder
        return network, {"embedder.": "embedder.", "encoder.": "encoder."}
    raise TypeError(f"cannot find a TabNet embedder + encoder in {type(source).__name__}")


def transfer_pretrained_weights(source: Any, encoder: TabNetEhrEncoder) -> TransferReport:
    """Copy the embedder and encoder weights of ``source`` into ``encoder``; raise unless all were copied.

    ``source`` is a ``TabNetPretraining`` (or ``TabNetPretrainer``), a supervised pytorch-tabnet ``TabNet``
    or another ``TabNetEhrEncoder``. Every parameter *and* buffer (BatchNorm running statistics included)
    of ``encoder.state_dict()`` must receive a tensor of identical shape, and every embedder/encoder tensor
    of the source must land somewhere; otherwise ``ValueError`` lists the offending names.
    """
    network, prefixes = _source_network(source)
    src = network.state_dict()
    target = encoder.state_dict()
    report, mapped, problems = TransferReport(), {}, []
    for name, tensor in src.items():
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        if prefix is None:
            report.unused_source.append(name)
            continue
        target_name = prefixes[prefix] + name[len(prefix) :]
        if target_name not in target:
            problems.append(f"source {name!r} has no counterpart {target_name!r} in the encoder")
        elif target[target_name].shape != tensor.shape:
            problems.append(
                f"shape mismatch {name!r} {tuple(tensor.shape)} -> {target_name!r} {tuple(target[target_name].shape)}"
            )
        else:
            mapped[target_name] = tensor
            report.mapping[target_name] = name
    problems += [
        f"encoder tensor {name!r} received no pretrained weight" for name in target if name not in mapped
    ]
    if problems:
        shown = "\n  ".join(problems[:20]) + (
            f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        )
        raise ValueError(f"pretrained weights do not fit the encoder ({len(problems)} problems):\n  {shown}")
    # strict=True: a second line of defence should the name map above ever miss something.
    encoder.load_state_dict({k: v.detach().clone() for k, v in mapped.items()}, strict=True)
    return report


# ------------------------------------------------------------------------------------------------ training
def _obfuscate(network: TabNetPretraining, embedded: torch.Tensor, generator: torch.Generator):
    """Same as ``RandomObfuscator.forward`` but drawing from ``generator`` (reproducible evaluation masks)."""
    group = network.masker.group_matrix
    probs = torch.full((embedded.shape[0], group.shape[0]), network.pretraining_ratio)
    groups = torch.bernoulli(probs, generator=generator).to(embedded.device)
    obf_vars = groups @ group
    return (1 - obf_vars) * embedded, groups, obf_vars


@torch.no_grad()
def _masked_outputs(network, x: np.ndarray, seed: int, device, batch_size: int = 4096):
    """Eval-mode reconstructions with a seeded mask: (reconstruction, embedded input, obfuscated vars)."""
    was_training = network.training
    network.eval()
    generator = torch.Generator().manual_seed(seed)
    outs = []
    try:
        for start in range(0, len(x), batch_size):
            xb = torch.as_tensor(x[start : start + batch_size], device=device)
            embedded = network.embedder(xb)
            masked, groups, obf_vars = _obfuscate(network, embedded, generator)
            steps_out, _ = network.encoder(masked, prior=1 - groups)
            outs.append((network.decoder(steps_out), embedded, obf_vars))
    finally:
        network.train(was_training)
    return tuple(torch.cat([o[i] for o in outs]).cpu() for i in range(3))


def masked_reconstruction_loss(
    network: TabNetPretraining, x: np.ndarray, seed: int = 0, device=None
) -> float:
    """pytorch-tabnet's ``UnsupervisedLoss`` over all of ``x`` with a fixed, seeded mask (lower is better)."""
    device = device or next(network.parameters()).device
    res, embedded, obf_vars = _masked_outputs(network, x, seed, device)
    return float(UnsupervisedLoss(res, embedded, obf_vars))


def reconstruction_error_per_feature(
    network: TabNetPretraining,
    preprocessor: TabularPreprocessor,
    frame: pd.DataFrame,
    seed: int = 0,
    repeats: int = 5,
) -> pd.DataFrame:
    """Normalised reconstruction error of each input column when it is hidden.

    ``nmse`` is the squared error on masked entries divided by the column's variance (summed over the
    embedding dimensions of a categorical column): 1.0 is as good as predicting the mean, 0.0 is perfect.
    Columns that other columns predict well (e.g. a lab and its missing indicator) come out low.
    """
    x = preprocessor.transform(frame)
    device = next(network.parameters()).device
    owner = np.argmax(network.embedder.embedding_group_matrix.cpu().numpy() > 0, axis=0)
    sq_err = np.zeros(preprocessor.n_inputs)
    count = np.zeros(preprocessor.n_inputs)
    for r in range(repeats):
        res, embedded, obf = (
            t.numpy().astype(np.float64) for t in _masked_outputs(network, x, seed + r, device)
        )
        var = embedded.var(axis=0)
        var[var == 0] = 1.0
        per_dim = ((res - embedded) ** 2 * obf).sum(axis=0) / var
        np.add.at(sq_err, owner, per_dim)
        # One obfuscated row-column counts once even when the column spans several embedding dimensions.
        first_dim = np.unique(owner, return_index=True)[1]
        count += obf[:, first_dim].sum(axis=0)
    kinds = ["categorical"] * len(preprocessor.cat_idxs)
    kinds += ["numeric"] * (preprocessor.n_inputs - len(kinds))
    return pd.DataFrame(
        {
            "column": preprocessor.columns,
            "feature": preprocessor.column_features,
            "kind": kinds,
            "nmse": sq_err / np.maximum(count, 1),
            "n_masked": count.astype(int),
        }
    )


def masked_pretrain(
    preprocessor: TabularPreprocessor,
    train_frame: pd.DataFrame,
    val_frame: pd.DataFrame | None = None,
    tabnet: TabNetConfig | None = None,
    config: MaskedPretrainConfig | None = None,
) -> MaskedPretrainResult:
    """Train ``TabNetPretraining`` on the train split and return a pretrained :class:`TabNetEhrEncoder`.

    Early stopping watches the seeded masked loss on ``val_frame`` (on train when no val is given) and the
    best epoch's weights are the ones transferred. Frames with a ``split`` column must hold only the split
    they are passed as, so validation or test patients cannot slip into pretraining.
    """
    tabnet, config = tabnet or TabNetConfig(), config or MaskedPretrainConfig()
    for frame, split in ((train_frame, "train"), (val_frame, "val")):
        if frame is not None and "split" in frame.columns and not (frame["split"] == split).all():
            raise ValueError(f"masked_pretrain: the {split} frame holds rows of other splits")
    device = resolve_device(config.device)
    x_train = preprocessor.transform(train_frame)
    x_val = preprocessor.transform(val_frame) if val_frame is not None else x_train
    if len(x_train) < 2:
        raise ValueError("masked_pretrain needs at least 2 training rows (BatchNorm)")

    history: list[dict[str, float]] = []
    # fork_rng: the weight init and the obfuscation masks draw from torch's global RNG; we seed it here and
    # restore the caller's RNG state afterwards.
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        network = build_pretraining_network(preprocessor, tabnet, config).to(device)
        encoder = TabNetEhrEncoder.from_preprocessor(preprocessor, tabnet)  # its init is overwritten below
        optimizer = torch.optim.Adam(network.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        order_rng = np.random.default_rng(config.seed)
        best_loss, best_epoch, best_state, stale = np.inf, -1, None, 0
        bar = tqdm(range(config.epochs), desc="masked pretraining", disable=not config.progress)
        for epoch in bar:
            network.train()
            perm = order_rng.permutation(len(x_train))
            batches = [perm[i : i + config.batch_size] for i in range(0, len(perm), config.batch_size)]
            if len(batches) > 1 and len(batches[-1]) < config.batch_size:
                # drop_last, as pytorch-tabnet does: the loss divides by per-batch column variances, and a
                # small remainder batch makes them tiny (a rare missing indicator) and the step explode.
                batches = batches[:-1]
            total, n_seen = 0.0, 0
            for idx in batches:
                xb = torch.as_tensor(x_train[idx], device=device)
                res, embedded, obf_vars = network(xb)
                # Exactly TabNetPretrainer._train_batch: no sparsity term during pretraining.
                loss = UnsupervisedLoss(res, embedded, obf_vars)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.clip_value:
                    nn.utils.clip_grad_norm_(network.parameters(), config.clip_value)
                optimizer.step()
                total, n_seen = total + loss.item() * len(idx), n_seen + len(idx)
            val_loss = masked_reconstruction_loss(network, x_val, seed=config.seed + 1, device=device)
            history.append({"epoch": epoch, "train_loss": total / max(n_seen, 1), "val_loss": val_loss})
            bar.set_postfix(train=f"{total / max(n_seen, 1):.3f}", val=f"{val_loss:.3f}")
            if val_loss < best_loss - 1e-6:
                best_loss, best_epoch, stale = val_loss, epoch, 0
                best_state = copy.deepcopy(network.state_dict())
            else:
                stale += 1
                if stale >= config.patience:
                    break
    if best_state is not None:
        network.load_state_dict(best_state)
    network = network.cpu().eval()
    report = transfer_pretrained_weights(network, encoder)
    return MaskedPretrainResult(encoder, network, history, best_epoch, report)


def pretraining_summary(result: MaskedPretrainResult) -> Mapping[str, Any]:
    """Small JSON-able summary (for ``metrics.json`` beside a checkpoint)."""
    return {
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "best_val_loss": min((h["val_loss"] for h in result.history), default=float("nan")),
        "n_transferred": result.transfer.n_transferred,
        "unused_source": result.transfer.unused_source,
    }
