"""Checkpoint I/O: safetensors weights, RNG states, locating a checkpoint, extracting sub-module weights.

A checkpoint folder (written by :class:`ehrclip_kit.training.Trainer`) holds ``model.safetensors`` (the full
model's state dict), ``config.json``, ``trainer_state.pt`` and ``metrics.json``. To reuse one encoder:

    enc.load_state_dict(encoder_state("runs/pretrain/checkpoint", "ehr"))    # ehrclip_kit.models
"""

from __future__ import annotations

import glob
import json
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_weights(model: nn.Module, path: str | Path) -> None:
    """``model.state_dict()`` to safetensors; tensors sharing memory (tied weights) are saved as copies."""
    from safetensors.torch import save_file

    state, seen = {}, set()
    for key, value in unwrap(model).state_dict().items():
        value = value.detach().cpu().contiguous()
        ptr = value.untyped_storage().data_ptr()
        whole = value.untyped_storage().nbytes() == value.numel() * value.element_size()
        # safetensors refuses shared or partial storages; a copy keeps every key loadable by name.
        if ptr in seen or not whole:
            value = value.clone()
        seen.add(ptr)
        state[key] = value
    save_file(state, str(path))


def load_weights(model: nn.Module, checkpoint: str | Path, strict: bool = True) -> nn.Module:
    """Load ``model.safetensors`` from a checkpoint folder (or the file itself) into ``model``."""
    from safetensors.torch import load_file

    path = Path(checkpoint)
    path = path / "model.safetensors" if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"{path}: no weights file")
    target = unwrap(model)
    device = next(iter(target.state_dict().values()), torch.empty(0)).device
    target.load_state_dict(load_file(str(path), device=str(device)), strict=strict)
    return model


def find_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint folder in ``path`` (an out_dir or a checkpoint folder), or None.

    Also finds the previous checkpoint parked as ``.checkpoint.old-*`` by a crash between the two renames
    of an atomic replace.
    """
    path = Path(path)
    for cand in (path, path / "checkpoint"):
        if (cand / "trainer_state.pt").exists():
            return cand
    parked = sorted(glob.glob(str(path / ".checkpoint.old-*")))
    return Path(parked[-1]) if parked and (Path(parked[-1]) / "trainer_state.pt").exists() else None


def rng_state() -> dict[str, Any]:
    """This process's torch / CUDA / numpy / python RNG states (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        # Plain types so that trainer_state.pt loads with weights_only=True.
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), gauss))
    random.setstate(state["python"])


def _state_dict_of(
    source: nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike,
) -> Mapping[str, torch.Tensor]:
    if isinstance(source, nn.Module):
        return unwrap(source).state_dict()
    if isinstance(source, Mapping):
        return source
    path = Path(source)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no such weights file (expected a checkpoint folder or .safetensors file)"
        )
    from safetensors.torch import load_file

    return load_file(str(path))


def submodule_state(source, prefix: str) -> dict[str, torch.Tensor]:
    """Weights under ``prefix`` (e.g. ``"encoders.ehr."``) with the prefix stripped.

    ``source``: a model (DDP-wrapped or not), a state dict, or a checkpoint folder / ``model.safetensors``.
    """
    state = _state_dict_of(source)
    out, seen = {}, set()
    top = prefix.split(".")[0] + "."
    for key, value in state.items():
        for wrapper in ("module.", "_orig_mod."):
            while key.startswith(wrapper):
                key = key[len(wrapper) :]
        if key.startswith(prefix):
            out[key[len(prefix) :]] = value
        elif key.startswith(top):
            seen.add(key[len(top) :].split(".")[0])
    if not out:
        raise KeyError(f"no weights under {prefix!r}; names with weights under {top!r}: {sorted(seen)}")
    return out


def read_json(path: Path) -> dict:
    """Parse a JSON file, with an error naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable checkpoint config ({err})") from err
