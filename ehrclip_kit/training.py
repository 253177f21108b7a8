"""A small trainer: AdamW, warm-up + cosine, gradient accumulation, bf16 on GPU, DDP, exact resume.

The model is any ``nn.Module`` whose ``forward(batch)`` returns a dict with a scalar ``"loss"`` (a
:class:`~ehrclip_kit.models.ContrastiveModel` does); the loss knows nothing about this loop.

* **Data order** depends only on ``(seed, epoch)`` (:func:`epoch_batches`), identical on every rank, so a
  resumed run skips exactly the batches it had consumed. ``batch_size`` is *per process*: N processes with
  batch B see the same global batches as one process with batch N·B.
* **Checkpoints** (``out_dir/checkpoint/``, replaced atomically, written by rank 0 only) every
  ``checkpoint_every`` optimiser steps, at each epoch end and at the end: ``model.safetensors``,
  ``config.json``, ``trainer_state.pt`` (optimizer, scheduler, every rank's RNG states, counters,
  history), ``metrics.json``. ``fit(resume=True)`` continues from it bit-exactly (same weights as an
  uninterrupted run), provided the dataset returns the same item for the same index.
* **Logs**: ``trainer.step_log`` (every ``log_every`` steps: loss, each ``<space>/...`` term, lr,
  pairs/s; averaged over ranks) and the per-epoch ``history`` that ``fit`` returns (train loss, lr,
  temperatures and whatever ``evaluate`` reports).

Typical use (items are dicts ``{"ehr": tensor, "text": tensor}`` that the default collate stacks)::

    model = ehr_text_model(ehr_encoder, d_ehr=128, d_text=384)
    trainer = Trainer(model, train_set, TrainConfig(epochs=13, batch_size=64), out_dir="runs/pretrain",
                      evaluate=ContrastiveEvaluator(val_set), dist=init_distributed())
    history = trainer.fit()           # resumes from runs/pretrain/checkpoint when present
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from ehrclip_kit import distributed as D
from ehrclip_kit.checkpointing import (
    find_checkpoint,
    load_weights,
    read_json,
    rng_state,
    save_weights,
    set_rng_state,
    unwrap,
)
from ehrclip_kit.config import from_dict, to_dict
from ehrclip_kit.distributed import epoch_batches
from ehrclip_kit.io import atomic_dir, write_json
from ehrclip_kit.models import local_losses


@dataclass
class TrainConfig:
    """Optimisation settings (saved as ``config.json["train"]`` beside every checkpoint)."""

    epochs: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01  # not applied to biases, norms and temperatures (tensors with < 2 dims)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int | None = None  # None: warmup_frac of the total optimiser steps
    warmup_frac: float = 0.05
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr
    batch_size: int = 64  # per process
    grad_accum: int = 1
    checkpoint_every: int = 0  # optimiser steps; 0 = only at epoch ends and at the end
    seed: int = 0
    amp: str = "auto"  # "auto" (bf16 on CUDA), "bf16" (CUDA only), "off"
    max_grad_norm: float | None = 1.0
    num_workers: int = 0
    drop_last: bool = True
    shuffle: bool = True
    max_steps: int | None = None  # stop after this many optimiser steps (the schedule ends there too)
    log_every: int = 10
    progress: bool = True
    # DDP: set when some trainable weights get no gradient (e.g. a transformer's unused pooler).
    find_unused_parameters: bool = False

    def __post_init__(self):
        if self.amp not in ("auto", "bf16", "off"):
            raise ValueError(f"TrainConfig.amp must be 'auto', 'bf16' or 'off', got {self.amp!r}")
        for name in ("epochs", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0 or (self.max_steps is not None and self.max_steps < 1):
            raise ValueError("TrainConfig.checkpoint_every must be >= 0 and max_steps >= 1 (or None)")


# Changing these between a run and its resume would change which batches were consumed.
_RESUME_KEYS = ("batch_size", "grad_accum", "seed", "drop_last", "shuffle")


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier for optimiser step ``step`` (0-based): linear warm-up to 1, then cosine to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    # +1 so that the first decay step is already below the peak and the last one is near the floor.
    progress = min(1.0, (step - warmup_steps + 1) / max(1, total_steps - warmup_steps + 1))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def move_to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) dict / list / tuple batch to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if hasattr(obj, "items"):  # dicts and dict-likes such as transformers' BatchEncoding
        return {k: move_to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(move_to_device(v, device) for v in obj) if type(obj) in (list, tuple) else obj
    return obj


class Callback:
    """Hooks; subclass and override what you need (or pass any object with some of these methods).

    Set ``trainer.stop_training = True`` in a hook to stop after the current step (a checkpoint is saved).
    """

    def on_train_begin(self, trainer: Trainer) -> None: ...
    def on_step_end(self, trainer: Trainer, logs: dict[str, float]) -> None: ...
    def on_epoch_end(self, trainer: Trainer, record: dict[str, float]) -> None: ...
    def on_checkpoint(self, trainer: Trainer, path: Path) -> None: ...
    def on_train_end(self, trainer: Trainer, history: list[dict]) -> None: ...


class Trainer:
    """Train ``model`` on ``train_dataset`` (items collated into the batch dict the model takes).

    Args:
        evaluate: ``callable(model) -> dict`` run at each epoch end on rank 0, in eval mode, without
            gradients and with losses computed locally (e.g. :class:`ehrclip_kit.retrieval_metrics.ContrastiveEvaluator`).
        dist: from :func:`ehrclip_kit.distributed.init_distributed`; default one process on CUDA if present.
        model_config: JSON-able description of how to rebuild the model, saved in ``config.json``.
    """

    def __init__(
        self,
        model: nn.Module,
        train_dataset: Dataset,
        config: TrainConfig,
        out_dir: str | Path | None = None,
        collate_fn: Callable | None = None,
        evaluate: Callable[[nn.Module], dict] | None = None,
        callbacks: Iterable[Any] = (),
        dist: D.DistInfo | None = None,
        model_config: dict | None = None,
    ):
        self.config, self.dataset, self.evaluate = config, train_dataset, evaluate
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.collate_fn, self.callbacks, self.model_config = (
            collate_fn or default_collate,
            list(callbacks),
            model_config,
        )
        self.dist = dist or D.DistInfo(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        self.device = self.dist.device
        self.model = model.to(self.device)
        self.net: nn.Module = self.model  # what forward is called on (DDP wrapper when distributed)
        if self.dist.world_size > 1:
            if hasattr(model, "configure_distributed"):
                model.configure_distributed(self.dist.rank, self.dist.world_size)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(
                model, device_ids=ids, find_unused_parameters=config.find_unused_parameters
            )
        self.n_batches = len(self._batches(0))
        if self.n_batches == 0:
            raise ValueError(
                f"the training dataset has {len(train_dataset)} examples, fewer than one global batch "
                f"({config.batch_size} x {self.dist.world_size} processes); lower batch_size or set drop_last=False"
            )
        self.steps_per_epoch = math.ceil(self.n_batches / config.grad_accum)
        self.total_steps = config.epochs * self.steps_per_epoch
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)
        warmup = (
            config.warmup_steps
            if config.warmup_steps is not None
            else round(config.warmup_frac * self.total_steps)
        )
        self.warmup_steps = int(warmup)
        self.optimizer = torch.optim.AdamW(
            self._param_groups(), lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: cosine_with_warmup(s, self.warmup_steps, self.total_steps, config.min_lr_ratio),
        )
        self.epoch = self.global_step = self.batch_in_epoch = 0
        self.history: list[dict] = []
        self.step_log: list[dict] = []
        self.stop_training = False
        self._epoch_loss = torch.zeros((), device=self.device)
        self._epoch_count = 0
        self._saved_at: tuple | None = None

    # ------------------------------------------------------------------------------------------ pieces
    def _param_groups(self) -> list[dict]:
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        if not decay and not no_decay:
            raise ValueError("the model has no trainable parameters")
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def _batches(self, epoch: int) -> list[list[int]]:
        c = self.config
        return epoch_batches(
            len(self.dataset),
            c.batch_size,
            epoch,
            c.seed,
            self.dist.rank,
            self.dist.world_size,
            c.drop_last,
            c.shuffle,
        )

    def _autocast(self) -> contextlib.AbstractContextManager:
        cuda = self.device.type == "cuda"
        if self.config.amp == "bf16" and not cuda:
            warnings.warn(
                "amp='bf16' autocasts on CUDA only; training in float32 on this device", stacklevel=3
            )
        use = self.config.amp != "off" and cuda and torch.cuda.is_bf16_supported()
        return torch.autocast("cuda", dtype=torch.bfloat16) if use else contextlib.nullcontext()

    def _call(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(self, *args)

    # ------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path | None:
        """Write ``out_dir/checkpoint`` (rank 0; every rank must call it, it gathers RNG states)."""
        if self.out_dir is None:
            return None
        rng = D.gather_objects(rng_state(), self.dist)
        target = self.out_dir / "checkpoint"
        if self.dist.is_main:
            state = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": rng,
                "epoch": self.epoch,
                "global_step": self.global_step,
                "batch_in_epoch": self.batch_in_epoch,
                "epoch_loss": float(self._epoch_loss),
                "epoch_count": self._epoch_count,
                "history": self.history,
                "step_log": self.step_log,
                "world_size": self.dist.world_size,
            }
            structure = getattr(unwrap(self.model), "structure", None)
            with atomic_dir(target) as tmp:
                save_weights(self.model, tmp / "model.safetensors")
                write_json(
                    tmp / "config.json",
                    {
                        "train": to_dict(self.config),
                        "model": self.model_config,
                        "structure": structure() if callable(structure) else None,
                    },
                )
                torch.save(state, tmp / "trainer_state.pt")
                write_json(
                    tmp / "metrics.json",
                    {
                        "epoch": self.epoch,
                        "global_step": self.global_step,
                        "history": self.history,
                        "step_log": self.step_log,
                    },
                )
            self._call("on_checkpoint", target)
        self._saved_at = (self.global_step, self.epoch, self.batch_in_epoch)
        D.barrier(self.dist)
        return target

    def resume(self, path: str | Path | None = None) -> bool:
        """Restore weights, optimizer, scheduler, RNG and counters from a checkpoint; False if none found."""
        where = path if path is not None else self.out_dir
        ckpt = find_checkpoint(where) if where is not None else None
        if ckpt is None:
            return False
        saved = from_dict(TrainConfig, read_json(ckpt / "config.json")["train"])
        changed = [k for k in _RESUME_KEYS if getattr(saved, k) != getattr(self.config, k)]
        state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
        if changed or state["world_size"] != self.dist.world_size:
            raise ValueError(
                f"{ckpt}: cannot resume exactly: {changed or 'world_size'} differ from the saved run; "
                "use the same settings or a new out_dir"
            )
        load_weights(self.model, ckpt)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self._epoch_loss = torch.tensor(state["epoch_loss"], dtype=torch.float32, device=self.device)
        self._epoch_count = state["epoch_count"]
        self.history, self.step_log = state["history"], state["step_log"]
        set_rng_state(state["rng"][self.dist.rank])
        self._saved_at = (self.global_step, self.epoch, self.batch_in_epoch)
        return True

    # ------------------------------------------------------------------------------------------- loop
    def fit(self, resume: bool = True) -> list[dict]:
        """Train to the end (``epochs`` or ``max_steps``); returns the per-epoch history."""
        c = self.config
        if not (resume and self.resume()):
            seed = c.seed + self.dist.rank  # different dropout per rank; data order does not use it
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)
        self.stop_training = False
        self._call("on_train_begin")
        bar = tqdm(
            total=self.total_steps,
            initial=self.global_step,
            disable=not (c.progress and self.dist.is_main),
            desc="train",
            dynamic_ncols=True,
        )
        try:
            while self.epoch < c.epochs:
                if self.batch_in_epoch < self.n_batches and not self._should_stop():
                    self._train_epoch(bar)
                if self.batch_in_epoch < self.n_batches:  # stopped mid-epoch (max_steps or a callback)
                    break
                # Also reached when resuming from a checkpoint taken at the epoch's last step.
                self._end_epoch()
                if self._should_stop():
                    break
        finally:
            bar.close()
        if self._saved_at != (self.global_step, self.epoch, self.batch_in_epoch):
            self.save_checkpoint()
        self._call("on_train_end", self.history)
        return self.history

    def _should_stop(self) -> bool:
        return self.stop_training or self.global_step >= self.total_steps

    def _train_epoch(self, bar) -> None:
        c, n = self.config, self.n_batches
        batches = self._batches(self.epoch)[self.batch_in_epoch :]
        # Own generator: creating the iterator must not draw from the global RNG (exact resume).
        loader = DataLoader(
            self.dataset,
            batch_sampler=batches,
            collate_fn=self.collate_fn,
            num_workers=c.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(c.seed + self.epoch),
        )
        self.model.train()
        window: dict[str, torch.Tensor] = {}  # sums of the scalar outputs over the accumulation window
        t0, rows = time.perf_counter(), 0
        for batch in loader:
            i = self.batch_in_epoch
            start = (i // c.grad_accum) * c.grad_accum
            size = min(c.grad_accum, n - start)
            last = i == start + size - 1
            batch = move_to_device(batch, self.device)
            sync = contextlib.nullcontext() if last or self.net is self.model else self.net.no_sync()
            with sync:
                with self._autocast():
                    out = self.net(batch)
                (out["loss"] / size).backward()
            self._epoch_loss += out["loss"].detach().float()
            self._epoch_count += 1
            for key, value in out.items():
                if isinstance(value, torch.Tensor) and value.ndim == 0:
                    window[key] = window.get(key, 0) + value.detach().float()
            rows += _batch_rows(batch)
            self.batch_in_epoch += 1
            if not last:
                continue
            lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
            self._optimizer_step()
            logs = {"step": self.global_step, "epoch": self.epoch + 1, "lr": lr}  # epochs count from 1
            if self.global_step % c.log_every == 0 or self.global_step == self.total_steps:
                # One collective for every term: loss, per-space losses, temperatures.
                means = D.all_reduce_mean(torch.stack(list(window.values())) / size, self.dist.world_size)
                logs.update({k: float(v) for k, v in zip(window, means, strict=True)})
                logs["pairs_per_s"] = rows * self.dist.world_size / max(time.perf_counter() - t0, 1e-9)
                self.step_log.append(logs)
                bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
                t0, rows = time.perf_counter(), 0
            window = {}
            bar.update(1)
            self._call("on_step_end", logs)
            if c.checkpoint_every and self.global_step % c.checkpoint_every == 0:
                self.save_checkpoint()
            if self._should_stop():
                break

    def _optimizer_step(self) -> None:
        if self.config.max_grad_norm:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        clamp = getattr(self.model, "clamp_logit_scales", None)
        if callable(clamp):
            clamp()
        self.global_step += 1

    def _end_epoch(self) -> None:
        train_loss = D.all_reduce_mean(self._epoch_loss / max(self._epoch_count, 1), self.dist.world_size)
        record = {
            "epoch": self.epoch + 1,
            "step": self.global_step,
            "train_loss": float(train_loss),
            "lr": self.scheduler.get_last_lr()[0],
        }
        for name, p in getattr(unwrap(self.model), "logit_scales", {}).items():
            record[f"{name}/logit_scale"] = float(p.detach().exp())
        metrics = None
        if self.evaluate is not None and self.dist.is_main:
            self.model.eval()
            with torch.no_grad(), local_losses(self.model):
                metrics = {k: float(v) for k, v in self.evaluate(self.model).items()}
            self.model.train()
        record.update(D.broadcast_object(metrics, self.dist) or {})
        self.history.append(record)
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        self._epoch_loss, self._epoch_count = torch.zeros((), device=self.device), 0
        self._call("on_epoch_end", record)
        self.save_checkpoint()


def _batch_rows(batch: Any) -> int:
    """Number of examples in a collated batch (first tensor's first dimension)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    values: Sequence = (
        list(batch.values()) if hasattr(batch, "values") else batch if isinstance(batch, list | tuple) else []
    )
    for v in values:
        rows = _batch_rows(v)
        if rows:
            return rows
    return 0
