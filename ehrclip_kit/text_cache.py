"""Text-embedding cache: embed every note once, then train on the cached vectors.

When *all* text layers are frozen the text tower is a fixed function of the note, so re-running a
transformer over every note in every epoch is wasted work. This mode embeds each note once
(:func:`ehrclip_kit.encoders.text.embed_notes`), stores the array as ``.npy`` and trains only the EHR tower
and the projection heads on it (:class:`CachedTextEncoder` passes the cached vectors through).

The cache key covers everything that changes the vectors: the model weights (file hashes of a local
folder, or the hub id), the cleaning config, ``max_tokens`` / ``max_chunks``, the pooling recipe and the
note texts in order. Change any of them and the cache is recomputed; otherwise it is read back. Storage is
the kit's generic :func:`ehrclip_kit.cache.disk_cache` (atomic ``.npy`` + a meta file).

>>> import tempfile, pandas as pd
>>> notes = pd.DataFrame({"hadm_id": [1, 2], "text": ["chest pain", "shortness of breath"]})
>>> vectors = cached_note_embeddings(notes, None, tempfile.mkdtemp(), progress=False)  # doctest: +SKIP
>>> vectors.shape                                                                      # doctest: +SKIP
(2, 384)
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ehrclip_kit.cache import disk_cache
from ehrclip_kit.data.notes import NoteCleaningConfig, as_note_text, clean_note
from ehrclip_kit.encoders.text import (
    TextEncoder,
    TextEncoderConfig,
    default_text_model_path,
    embed_notes,
    file_sha256,
)

POOLING_RECIPE = "first-token-per-chunk/mean-over-chunks/v1"  # bump when embed_notes' output changes
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def model_fingerprint(model_path: str | os.PathLike | None) -> dict[str, Any]:
    """What identifies a model's weights: sha256 of each weight/config file of a folder, or the hub id."""
    path = Path(default_text_model_path() if model_path is None else model_path)
    if not path.is_dir():
        # A hub id resolved from the local HF cache: the id is the best identity we have offline.
        return {"hub_id": str(model_path)}
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and (p.suffix in _WEIGHT_SUFFIXES or p.name == "config.json")
    )
    if not any(p.suffix in _WEIGHT_SUFFIXES for p in files):
        raise FileNotFoundError(f"no model weights (*.safetensors / *.bin) under {path}")
    return {"files": {str(p.relative_to(path)): file_sha256(p) for p in files}}


def texts_digest(texts: list[str]) -> str:
    """sha256 (hex) of the note texts in order; length-prefixed so ["ab", "c"] != ["a", "bc"]."""
    digest = hashlib.sha256()
    for text in texts:
        encoded = text.encode("utf-8", errors="surrogatepass")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()


def cache_key_parts(
    texts: list[str],
    model_path: str | os.PathLike | None,
    config: TextEncoderConfig,
    cleaning: NoteCleaningConfig | None,
) -> dict[str, Any]:
    """Everything the cached vectors depend on (hashed by :func:`ehrclip_kit.cache.disk_cache`)."""
    return {
        "what": "note-embeddings",
        "pooling": POOLING_RECIPE,
        "model": model_fingerprint(model_path),
        "cleaning": cleaning,
        "max_tokens": config.max_tokens,
        "max_chunks": config.max_chunks,
        "n_notes": len(texts),
        "texts_sha256": texts_digest(texts),
    }


def cached_note_embeddings(
    notes_df,
    model_path: str | os.PathLike | None,
    cache_dir: str | os.PathLike | None,
    config: TextEncoderConfig | None = None,
    cleaning: NoteCleaningConfig | None = None,
    text_column: str = "text",
    batch_chunks: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    refresh: bool = False,
) -> np.ndarray:
    """Note embeddings ``float32 [len(notes_df), hidden]`` in row order, computed once per cache key.

    ``model_path``: a local model folder or hub id (``None``: the offline MiniLM). ``cleaning``: apply
    :func:`clean_note` with this config first; ``None`` uses the texts as they are (the cohort's
    ``notes.parquet`` is already cleaned). ``cache_dir``: ``None`` uses ``$EHRCLIP_CACHE`` or
    ``./.cache/ehrclip``. Entries are ``.npy`` files written atomically by :func:`ehrclip_kit.cache.disk_cache`,
    so an interrupted run leaves no half cache. ``refresh`` recomputes regardless.
    """
    config = config or TextEncoderConfig()
    if text_column not in notes_df.columns:
        raise KeyError(f"notes table has no {text_column!r} column (columns: {list(notes_df.columns)})")
    raw = notes_df[text_column].tolist()
    texts = [clean_note(t, cleaning) for t in raw] if cleaning is not None else [as_note_text(t) for t in raw]

    def compute() -> np.ndarray:
        # Every text layer is frozen in this mode; freeze_layers only changes what is trainable, not vectors.
        encoder = TextEncoder(model_path, config=dataclasses.replace(config, model=None), freeze_layers=0)
        if device is not None:
            encoder.to(torch.device(device))
        elif torch.cuda.is_available():
            encoder.to(torch.device("cuda"))
        tokenizer = encoder.load_tokenizer()
        return embed_notes(texts, encoder, tokenizer, batch_chunks=batch_chunks, progress=progress)

    key_parts = cache_key_parts(texts, model_path, config, cleaning)
    return disk_cache(cache_dir, key_parts, compute, name="note-embeddings", refresh=refresh)


class CachedTextEncoder(nn.Module):
    """The text tower of the cache mode: cached vectors ``[B, dim]`` in, the same vectors (float32) out.

    Lets a :class:`~ehrclip_kit.models.ContrastiveModel` use ``{"text": CachedTextEncoder(384)}`` with
    ``batch["text"]`` holding rows of the cached array; only the heads and the EHR tower train.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out_dim = int(dim)

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        if vectors.shape[-1] != self.out_dim:
            raise ValueError(f"cached text vectors have {vectors.shape[-1]} dims, expected {self.out_dim}")
        return vectors.float()
