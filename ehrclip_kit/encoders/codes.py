"""sEHR-BERT: a small BERT over a patient's chronological sequence of structured codes.

Each position is a code id (diagnosis, procedure or medication, from a vocabulary fitted on the training
split), a *code type* (fed through BERT's token-type embeddings) and a *time bucket*: the day offset of the
code from the anchor event (an ECG), bucketed on a log scale (:func:`bucket_day_deltas`) and embedded by a
small table whose vector is added to the code embedding before BERT adds positions and types. The encoder
returns the final [CLS] vector. The BERT is a ``transformers.BertModel`` built from a config in code;
nothing is ever downloaded.

Masked-code pretraining (:func:`masked_code_pretraining`) is BERT's masked language modelling on codes:
15 % of real code positions are chosen; of those 80 % become [MASK], 10 % a random code, 10 % stay; the
model predicts the original ids through a head tied to the input embedding table.

>>> import torch
>>> cfg = CodesEncoderConfig(vocab_size=50, hidden=32, layers=1, heads=2, intermediate=64)
>>> batch = collate_codes([([5, 6, 7], [1, 1, 2], [3, 2, 1])], max_len=8)
>>> CodesEncoder(cfg)(batch).shape
torch.Size([1, 32])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import BertConfig, BertModel

# Special ids of ehrclip_kit.data.codes.CodeVocab ([PAD], [UNK], [CLS], [SEP], [MASK]); a test keeps the two
# in step. Not imported from there so that the encoder does not pull in the data layer (duckdb).
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 1, 2, 3, 4
N_SPECIAL = 5


@dataclass
class CodesEncoderConfig:
    """Shape of :class:`CodesEncoder`; saved as JSON beside checkpoints.

    ``type_vocab``: number of code types (0 is used for [CLS]/[PAD]; e.g. 1 diagnosis, 2 procedure,
    3 medication). ``n_time_buckets``: size of the time-bucket table (0 = no time / special token).
    Ids below ``n_special`` are special tokens: never masked, never used as random replacements.
    """

    vocab_size: int
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    intermediate: int = 256
    max_len: int = 256
    type_vocab: int = 4
    n_time_buckets: int = 32
    dropout: float = 0.1
    pad_id: int = PAD_ID
    cls_id: int = CLS_ID
    mask_id: int = MASK_ID
    n_special: int = N_SPECIAL

    def __post_init__(self) -> None:
        if self.vocab_size <= self.n_special:
            raise ValueError(
                f"CodesEncoderConfig.vocab_size={self.vocab_size} leaves no room for codes "
                f"after {self.n_special} special ids"
            )
        if self.hidden % self.heads:
            raise ValueError(
                f"CodesEncoderConfig.hidden={self.hidden} must be divisible by heads={self.heads}"
            )
        if max(self.pad_id, self.cls_id, self.mask_id) >= self.n_special:
            raise ValueError("CodesEncoderConfig: pad_id, cls_id and mask_id must be below n_special")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def for_vocab(cls, vocab, **overrides) -> CodesEncoderConfig:
        """Config sized for a fitted :class:`ehrclip_kit.data.codes.CodeVocab` (size and special ids)."""
        ids = {"pad_id": vocab.pad_id, "cls_id": vocab.cls_id, "mask_id": vocab.mask_id}
        return cls(vocab_size=len(vocab), n_special=max(ids.values()) + 1, **{**ids, **overrides})

    def bert_config(self) -> BertConfig:
        return BertConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            intermediate_size=self.intermediate,
            max_position_embeddings=self.max_len,
            type_vocab_size=self.type_vocab,
            hidden_dropout_prob=self.dropout,
            attention_probs_dropout_prob=self.dropout,
            pad_token_id=self.pad_id,
        )


def bucket_day_deltas(days: np.ndarray | Sequence[float], n_buckets: int = 32) -> np.ndarray:
    """Map day offsets (negative = before the anchor) to time-bucket ids in ``1 .. n_buckets-1``.

    Magnitudes are bucketed by ``floor(log2(1 + |days|))`` so that resolution is fine near the anchor
    and coarse a year away; offsets before and after the anchor use separate halves of the table.
    Bucket 0 is left for [CLS]/[PAD]. Magnitudes beyond the table share its last bucket.

    >>> bucket_day_deltas([0, 1, 3, 365, -1, -365], n_buckets=32).tolist()
    [1, 2, 3, 9, 17, 24]
    """
    if n_buckets < 3:
        raise ValueError(f"bucket_day_deltas needs n_buckets >= 3, got {n_buckets}")
    d = np.asarray(days, dtype=np.float64)
    if np.isnan(d).any():
        raise ValueError("bucket_day_deltas: day offsets contain NaN")
    half = (n_buckets - 1) // 2
    mag = np.minimum(np.floor(np.log2(1.0 + np.abs(d))), half - 1).astype(np.int64)
    return np.where(d >= 0, 1 + mag, 1 + half + mag)


def encode_code_sequence(
    tokens: Sequence[str], deltas_days: Sequence[float], vocab, n_time_buckets: int = 32
) -> tuple[list[int], list[int], list[int]]:
    """One row of :func:`ehrclip_kit.data.codes.code_sequences` as the ``(ids, types, time_buckets)`` triple
    that :func:`collate_codes` batches (no [CLS]/[SEP]: the collate adds [CLS]; unknown codes -> [UNK]).

    >>> from types import SimpleNamespace
    >>> vocab = SimpleNamespace(encode=lambda t, add_special: [7] * len(t), token_type=lambda t: 1)
    >>> encode_code_sequence(["DX10:I48", "RX:digoxin"], [-30.0, 2.0], vocab)
    ([7, 7], [1, 1], [20, 2])
    """
    if len(tokens) != len(deltas_days):
        raise ValueError(f"encode_code_sequence: {len(tokens)} tokens but {len(deltas_days)} day offsets")
    ids = vocab.encode(list(tokens), add_special=False)
    types = [vocab.token_type(t) for t in tokens]
    return ids, types, bucket_day_deltas(deltas_days, n_time_buckets).tolist()


def collate_codes(
    items: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]],
    max_len: int = 256,
    pad_id: int = PAD_ID,
    cls_id: int = CLS_ID,
    keep: str = "last",
) -> dict[str, torch.Tensor]:
    """Batch ``(code_ids, code_types, time_buckets)`` triples into padded LongTensors with a leading [CLS].

    Sequences longer than ``max_len - 1`` keep their ``keep="last"`` (most recent) or ``"first"`` codes.
    Returns ``input_ids``, ``attention_mask``, ``token_type_ids`` and ``time_buckets``, each ``[B, L]``
    where ``L`` is the longest sequence in the batch (+1 for [CLS]).

    >>> b = collate_codes([([7, 8], [1, 2], [2, 1]), ([9], [3], [4])], max_len=4)
    >>> b["input_ids"].tolist(), b["attention_mask"].tolist()
    ([[2, 7, 8], [2, 9, 0]], [[1, 1, 1], [1, 1, 0]])
    """
    if keep not in ("last", "first"):
        raise ValueError(f"collate_codes: keep must be 'last' or 'first', got {keep!r}")
    if max_len < 2:
        raise ValueError(f"collate_codes: max_len must be >= 2, got {max_len}")
    if not items:
        raise ValueError("collate_codes: empty batch")
    rows = []
    for n, (ids, types, times) in enumerate(items):
        if not len(ids) == len(types) == len(times):
            raise ValueError(
                f"collate_codes: item {n} has {len(ids)} ids, {len(types)} types, {len(times)} time buckets"
            )
        sl = slice(-(max_len - 1), None) if keep == "last" else slice(0, max_len - 1)
        rows.append(([cls_id, *list(ids)[sl]], [0, *list(types)[sl]], [0, *list(times)[sl]]))
    width = max(len(r[0]) for r in rows)
    out = {
        k: torch.zeros(len(rows), width, dtype=torch.long)
        for k in ("input_ids", "token_type_ids", "time_buckets")
    }
    out["input_ids"].fill_(pad_id)
    out["attention_mask"] = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (ids, types, times) in enumerate(rows):
        n = len(ids)
        out["input_ids"][i, :n] = torch.as_tensor(ids)
        out["token_type_ids"][i, :n] = torch.as_tensor(types)
        out["time_buckets"][i, :n] = torch.as_tensor(times)
        out["attention_mask"][i, :n] = 1
    return out


class CodesEncoder(nn.Module):
    """sEHR-BERT encoder: ``forward(batch) -> [B, hidden]`` (the final [CLS] vector).

    ``batch`` is a dict from :func:`collate_codes`; ``token_type_ids`` and ``time_buckets`` may be left
    out (treated as 0). ``.out_dim`` is ``config.hidden``.
    """

    def __init__(self, config: CodesEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.bert = BertModel(config.bert_config(), add_pooling_layer=False)
        self.time_embeddings = nn.Embedding(config.n_time_buckets, config.hidden)
        # Start the time table at zero so a fresh model equals plain BERT; pretraining learns it.
        nn.init.zeros_(self.time_embeddings.weight)
        self.out_dim = config.hidden

    def _check(self, batch: dict[str, torch.Tensor]) -> None:
        ids = batch["input_ids"]
        c = self.config
        if ids.shape[1] > c.max_len:
            raise ValueError(f"CodesEncoder: sequence length {ids.shape[1]} > max_len {c.max_len}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= c.vocab_size):
            raise ValueError(
                f"CodesEncoder: input_ids outside [0, {c.vocab_size}) (vocabulary/config mismatch)"
            )
        tb = batch.get("time_buckets")
        if tb is not None and tb.numel() and (tb.min() < 0 or tb.max() >= c.n_time_buckets):
            raise ValueError(f"CodesEncoder: time_buckets outside [0, {c.n_time_buckets})")
        tt = batch.get("token_type_ids")
        if tt is not None and tt.numel() and (tt.min() < 0 or tt.max() >= c.type_vocab):
            raise ValueError(f"CodesEncoder: token_type_ids outside [0, {c.type_vocab})")

    def sequence_output(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Final hidden states ``[B, L, hidden]`` for every position."""
        self._check(batch)
        ids = batch["input_ids"]
        emb = self.bert.embeddings.word_embeddings(ids)
        if batch.get("time_buckets") is not None:
            emb = emb + self.time_embeddings(batch["time_buckets"])
        out = self.bert(
            inputs_embeds=emb,
            attention_mask=batch.get("attention_mask", (ids != self.config.pad_id).long()),
            token_type_ids=batch.get("token_type_ids"),
        )
        return out.last_hidden_state

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.sequence_output(batch)[:, 0]


class MaskedCodeHead(nn.Module):
    """BERT's MLM head (dense-GELU-LayerNorm, then decode) with the decoder tied to the word embeddings."""

    def __init__(self, encoder: CodesEncoder) -> None:
        super().__init__()
        h = encoder.config.hidden
        self.dense = nn.Linear(h, h)
        self.norm = nn.LayerNorm(h, eps=1e-12)
        self.bias = nn.Parameter(torch.zeros(encoder.config.vocab_size))
        self.word_embeddings = encoder.bert.embeddings.word_embeddings  # shared, not copied

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        h = self.norm(F.gelu(self.dense(hidden)))
        return F.linear(h, self.word_embeddings.weight, self.bias)


def mask_codes(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    config: CodesEncoderConfig,
    generator: torch.Generator,
    mask_prob: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking on code ids: returns ``(masked_ids, labels)`` with labels -100 where nothing is asked.

    Only attended positions with ids >= ``n_special`` are eligible ([PAD], [CLS], [MASK], [UNK] are never
    touched). Every sequence with an eligible position gets at least one, because code sequences are short
    and a sequence with no target teaches nothing.
    """
    eligible = attention_mask.bool() & (input_ids >= config.n_special)
    u = torch.rand(input_ids.shape, generator=generator)
    chosen = eligible & (u < mask_prob)
    # Force one target in sequences that drew none: the eligible position with the smallest draw.
    none = eligible.any(1) & ~chosen.any(1)
    if none.any():
        first = torch.where(eligible, u, torch.full_like(u, 2.0)).argmin(1)
        chosen[none, first[none]] = True
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    r = torch.rand(input_ids.shape, generator=generator)
    to_mask = chosen & (r < 0.8)
    to_random = chosen & (r >= 0.8) & (r < 0.9)
    random_ids = torch.randint(config.n_special, config.vocab_size, input_ids.shape, generator=generator)
    masked = input_ids.clone()
    masked[to_mask] = config.mask_id
    masked[to_random] = random_ids[to_random]
    return masked, labels


def masked_code_pretraining(
    encoder: CodesEncoder,
    sequences: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]],
    splits: Sequence[str] | None,
    *,
    epochs: int = 5,
    batch_size: int = 32,
    lr: float = 5e-4,
    weight_decay: float = 0.01,
    mask_prob: float = 0.15,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> list[dict]:
    """Pretrain ``encoder`` in place by masked-code prediction; returns per-epoch history.

    ``sequences``: ``(code_ids, code_types, time_buckets)`` triples. ``splits``: the patient split of each
    sequence (from :func:`ehrclip_kit.data.splits.assign_splits`); only ``"train"`` rows are used so that
    pretraining never sees validation/test patients. Pass ``None`` only when every sequence given is
    already from the training split. History rows: ``epoch``, ``loss`` (mean masked cross-entropy),
    ``accuracy`` (top-1 on masked positions), ``n_sequences``.
    """
    if splits is not None:
        if len(splits) != len(sequences):
            raise ValueError(f"masked_code_pretraining: {len(splits)} splits for {len(sequences)} sequences")
        keep = [i for i, s in enumerate(splits) if s == "train"]
        sequences = [sequences[i] for i in keep]
    sequences = [s for s in sequences if len(s[0]) > 0]
    if not sequences:
        raise ValueError("masked_code_pretraining: no non-empty training sequences")
    cfg = encoder.config
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # dropout draws from the global RNG; keep caller's state intact
        torch.manual_seed(seed)
        head = MaskedCodeHead(encoder).to(device)
        encoder.to(device).train()
        head.train()
        params = {id(p): p for p in [*encoder.parameters(), *head.parameters()]}.values()
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        history = []
        n_batches = math.ceil(len(sequences) / batch_size)
        bar = tqdm(total=epochs * n_batches, desc="masked-code pretraining", disable=not progress)
        for epoch in range(epochs):
            order = torch.randperm(len(sequences), generator=gen).tolist()
            tot_loss = tot_correct = tot_n = 0.0
            for b in range(n_batches):
                items = [sequences[i] for i in order[b * batch_size : (b + 1) * batch_size]]
                batch = collate_codes(items, max_len=cfg.max_len, pad_id=cfg.pad_id, cls_id=cfg.cls_id)
                masked, labels = mask_codes(batch["input_ids"], batch["attention_mask"], cfg, gen, mask_prob)
                batch = {k: v.to(device) for k, v in {**batch, "input_ids": masked}.items()}
                labels = labels.to(device)
                logits = head(encoder.sequence_output(batch))
                target = labels != -100
                loss = F.cross_entropy(logits[target], labels[target])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                n, loss_value = int(target.sum()), float(loss.detach())
                tot_loss += loss_value * n
                tot_correct += float((logits[target].argmax(-1) == labels[target]).sum())
                tot_n += n
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}")
            history.append(
                {
                    "epoch": epoch,
                    "loss": tot_loss / tot_n,
                    "accuracy": tot_correct / tot_n,
                    "n_sequences": len(sequences),
                }
            )
        bar.close()
    encoder.eval()
    return history
