from __future__ import annotations

import numpy as np
import pytest
import torch

from ehrclip_kit.encoders.codes import (
    CLS_ID,
    MASK_ID,
    N_SPECIAL,
    PAD_ID,
    CodesEncoder,
    CodesEncoderConfig,
    bucket_day_deltas,
    collate_codes,
    encode_code_sequence,
    mask_codes,
    masked_code_pretraining,
)
from ehrclip_kit.encoders.ecg import ECGEncoderConfig, ECGResNet1d

torch.set_num_threads(1)


# ---------------------------------------------------------------- ECG ResNet


@pytest.mark.parametrize("depth", [(1,), (1, 1), (2, 1, 1), (1, 1, 1, 1)])
@pytest.mark.parametrize("T", [250, 500, 1001])
def test_ecg_resnet_output_shape_any_length_and_depth(depth, T):
    enc = ECGResNet1d(ECGEncoderConfig(width=4, depth=depth, out_dim=24)).eval()
    assert enc(torch.randn(3, 12, T)).shape == (3, 24)
    assert enc.out_dim == 24


def test_ecg_resnet_without_out_dim_returns_last_stage_width():
    enc = ECGResNet1d(ECGEncoderConfig(width=4, depth=(1, 1, 1), out_dim=None)).eval()
    assert enc.out_dim == 16
    assert enc(torch.randn(2, 12, 300)).shape == (2, 16)


def test_ecg_resnet_stages_downsample_time_and_double_channels():
    enc = ECGResNet1d(ECGEncoderConfig(width=4, depth=(1, 1, 1))).eval()
    fmap = enc.feature_map(torch.randn(1, 12, 800))
    # stem /2, then each of 3 stages /2 -> 800 / 16
    assert fmap.shape == (1, 16, 50)


def test_ecg_resnet_gradients_reach_every_parameter():
    torch.manual_seed(0)
    enc = ECGResNet1d(ECGEncoderConfig(width=4, depth=(2, 1), out_dim=8, dropout=0.0))
    # The last BN of each block starts at zero (identity blocks); give it weight so the branch is live.
    for m in enc.modules():
        if hasattr(m, "bn2"):
            torch.nn.init.ones_(m.bn2.weight)
    x = torch.randn(4, 12, 200, requires_grad=True)
    enc(x).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_ecg_resnet_rejects_wrong_lead_count_and_bad_config():
    enc = ECGResNet1d(ECGEncoderConfig(width=4, depth=(1,)))
    with pytest.raises(ValueError, match="12 leads"):
        enc(torch.randn(2, 8, 100))
    with pytest.raises(ValueError, match="odd"):
        ECGEncoderConfig(kernel=4)
    with pytest.raises(ValueError, match="depth"):
        ECGEncoderConfig(depth=())


def test_ecg_config_round_trips_through_dict():
    cfg = ECGEncoderConfig(width=8, depth=[2, 2], out_dim=None)
    assert ECGEncoderConfig(**cfg.to_dict()) == cfg and cfg.depth == (2, 2)


# ---------------------------------------------------------------- codes: collate, buckets, masking


def test_bucket_day_deltas_is_monotone_signed_and_capped():
    pos = bucket_day_deltas(np.arange(0, 400), n_buckets=32)
    neg = bucket_day_deltas(-np.arange(1, 400), n_buckets=32)
    assert (np.diff(pos) >= 0).all() and (np.diff(neg) >= 0).all()
    assert set(pos).isdisjoint(set(neg)) and pos.min() == 1 and neg.max() <= 31
    assert bucket_day_deltas([10**9], n_buckets=8)[0] == bucket_day_deltas([10**6], n_buckets=8)[0] == 3
    with pytest.raises(ValueError, match="NaN"):
        bucket_day_deltas([np.nan])


def test_collate_codes_pads_prepends_cls_and_keeps_most_recent():
    b = collate_codes([([10, 11, 12, 13], [1, 2, 1, 2], [5, 4, 3, 2]), ([20], [3], [1])], max_len=3)
    assert b["input_ids"].tolist() == [[2, 12, 13], [2, 20, 0]]
    assert b["token_type_ids"].tolist() == [[0, 1, 2], [0, 3, 0]]
    assert b["time_buckets"].tolist() == [[0, 3, 2], [0, 1, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    first = collate_codes([([10, 11, 12, 13], [1, 1, 1, 1], [1, 1, 1, 1])], max_len=3, keep="first")
    assert first["input_ids"].tolist() == [[2, 10, 11]]
    with pytest.raises(ValueError, match="item 0"):
        collate_codes([([1, 2], [1], [1, 1])])


def test_masking_never_touches_pad_or_cls_and_follows_80_10_10():
    cfg = CodesEncoderConfig(vocab_size=500, hidden=16, layers=1, heads=2, intermediate=32)
    rng = np.random.default_rng(0)
    items = [(rng.integers(5, 500, n).tolist(), [1] * n, [1] * n) for n in rng.integers(1, 60, 400)]
    b = collate_codes(items, max_len=64)
    masked, labels = mask_codes(b["input_ids"], b["attention_mask"], cfg, torch.Generator().manual_seed(0))
    pad = b["attention_mask"] == 0
    assert (masked[pad] == cfg.pad_id).all() and (masked[:, 0] == cfg.cls_id).all()
    assert (labels[pad] == -100).all() and (labels[:, 0] == -100).all()
    chosen = labels != -100
    assert chosen.any(1).all(), "every sequence with codes gets at least one target"
    assert (labels[chosen] == b["input_ids"][chosen]).all()
    real = b["attention_mask"].bool().clone()
    real[:, 0] = False
    assert 0.13 < chosen.sum() / real.sum() < 0.19
    share_mask = (masked[chosen] == cfg.mask_id).float().mean()
    share_same = (masked[chosen] == b["input_ids"][chosen]).float().mean()
    assert 0.76 < share_mask < 0.84 and 0.07 < share_same < 0.14
    assert (masked[~chosen] == b["input_ids"][~chosen]).all()


# ---------------------------------------------------------------- codes encoder


def test_special_ids_match_the_code_vocabulary():
    from ehrclip_kit.data.codes import CodeVocab

    vocab = CodeVocab.fit([["DX10:I48", "RX:digoxin", "PR10:02H"], ["DX10:I48"]])
    assert (vocab.pad_id, vocab.cls_id, vocab.mask_id) == (PAD_ID, CLS_ID, MASK_ID)
    cfg = CodesEncoderConfig.for_vocab(vocab, hidden=16, layers=1, heads=2, intermediate=32)
    assert cfg.vocab_size == len(vocab) == 8 and cfg.n_special == N_SPECIAL
    item = encode_code_sequence(["DX10:I48", "RX:digoxin", "DX9:999"], [-400.0, 0.0, 3.0], vocab)
    assert item == (
        [5, 7, vocab.unk_id],  # DX10:I48 most frequent; PR < RX on ties
        [1, 3, 1],
        bucket_day_deltas([-400, 0, 3]).tolist(),
    )
    out = CodesEncoder(cfg).eval()(collate_codes([item], cls_id=vocab.cls_id, pad_id=vocab.pad_id))
    assert out.shape == (1, 16)


def _tiny_cfg(**kw):
    return CodesEncoderConfig(
        **{
            "vocab_size": 41,
            "hidden": 32,
            "layers": 2,
            "heads": 2,
            "intermediate": 64,
            "max_len": 32,
            "dropout": 0.0,
            **kw,
        }
    )


def test_codes_encoder_shape_and_padding_invariance():
    torch.manual_seed(0)
    enc = CodesEncoder(_tiny_cfg()).eval()
    short = ([5, 6, 7], [1, 2, 3], [3, 2, 1])
    batch = collate_codes([short, ([8] * 10, [1] * 10, [1] * 10)], max_len=32)
    out = enc(batch)
    assert out.shape == (2, 32) and enc.out_dim == 32
    alone = enc(collate_codes([short], max_len=32))
    # Padding must be invisible to the [CLS] vector.
    torch.testing.assert_close(out[:1], alone, atol=1e-5, rtol=1e-5)


def test_codes_encoder_uses_types_and_time():
    torch.manual_seed(0)
    enc = CodesEncoder(_tiny_cfg()).eval()
    torch.nn.init.normal_(enc.time_embeddings.weight)
    base = enc(collate_codes([([5, 6], [1, 1], [1, 1])]))
    other_time = enc(collate_codes([([5, 6], [1, 1], [1, 9])]))
    other_type = enc(collate_codes([([5, 6], [1, 2], [1, 1])]))
    assert not torch.allclose(base, other_time) and not torch.allclose(base, other_type)
    with pytest.raises(ValueError, match="input_ids outside"):
        enc(collate_codes([([99], [1], [1])]))


def _structured_sequences(n, rng):
    """Each patient draws codes from one of six disjoint "conditions" of six codes: a masked code is
    predictable (up to the condition) from the others, so the loss can fall from ln(41) to ~ln(5)."""
    out = []
    for _ in range(n):
        cond = int(rng.integers(0, 6))
        length = int(rng.integers(4, 10))
        ids = (5 + 6 * cond + rng.integers(0, 6, length)).tolist()
        out.append((ids, [1] * length, bucket_day_deltas(np.arange(length)).tolist()))
    return out


def test_masked_code_pretraining_lowers_loss_and_uses_train_only():
    rng = np.random.default_rng(0)
    seqs = _structured_sequences(240, rng)
    splits = ["train"] * 160 + ["val"] * 40 + ["test"] * 40
    enc = CodesEncoder(_tiny_cfg(dropout=0.1))
    before = enc.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    hist = masked_code_pretraining(
        enc, seqs, splits, epochs=20, batch_size=16, lr=2e-3, seed=0, progress=False
    )
    assert [h["n_sequences"] for h in hist] == [160] * 20
    assert hist[-1]["loss"] < 0.7 * hist[0]["loss"], [round(h["loss"], 2) for h in hist]
    assert hist[-1]["accuracy"] > 0.12  # chance is 1/36
    assert not torch.equal(before, enc.bert.encoder.layer[0].attention.self.query.weight)
    assert not enc.training


def test_masked_code_pretraining_is_seeded():
    rng = np.random.default_rng(1)
    seqs = _structured_sequences(40, rng)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)  # same init; the function's own seed drives masking, order and dropout
        enc = CodesEncoder(_tiny_cfg(layers=1, dropout=0.1))
        runs.append(masked_code_pretraining(enc, seqs, None, epochs=2, batch_size=8, seed=7, progress=False))
    assert runs[0] == runs[1]
    with pytest.raises(ValueError, match="splits"):
        masked_code_pretraining(enc, seqs, ["train"], epochs=1, progress=False)
