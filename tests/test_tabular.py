"""Preprocessing, the TabNet encoder, masked pretraining and the audited weight transfer."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
from pytorch_tabnet.tab_network import TabNet

from ehrclip_kit.encoders.tabular import (
    TabNetConfig,
    TabNetEhrEncoder,
    TabularPreprocessor,
    embedded_to_input_importance,
)
from ehrclip_kit.masked_pretraining import (
    MaskedPretrainConfig,
    build_pretraining_network,
    masked_pretrain,
    masked_reconstruction_loss,
    reconstruction_error_per_feature,
    transfer_pretrained_weights,
)

torch.set_num_threads(1)
SMALL = TabNetConfig(n_d=16, n_a=16, n_steps=2, virtual_batch_size=64)


# ------------------------------------------------------------------------------------------ preprocessing
def test_preprocessor_statistics_come_from_train_only(tiny_cohort):
    frame, spec = tiny_cohort
    fitted = TabularPreprocessor().fit(frame, spec).to_dict()
    # Wreck every non-train value (numbers, codes, missingness): the fitted state must not move.
    other = frame["split"] != "train"
    wrecked = frame.copy()
    wrecked.loc[other, "lab_a"] = 1e5
    wrecked.loc[other, "lab_d"] = np.nan
    wrecked.loc[other, "unit"] = 4 - wrecked.loc[other, "unit"].clip(upper=4)
    wrecked.loc[other, "stage"] = 0
    assert TabularPreprocessor().fit(wrecked, spec).to_dict() == fitted
    # Fitting on the whole frame equals fitting on its train rows.
    assert TabularPreprocessor().fit(frame[~other], spec).to_dict() == fitted
    # ... and the statistics are the train statistics.
    train = frame.loc[~other, "lab_a"].dropna().to_numpy(dtype=np.float64)
    lab_a = next(n for n in fitted["numeric"] if n["name"] == "lab_a")
    assert lab_a["median"] == pytest.approx(np.median(train))
    assert lab_a["mean"] == pytest.approx(train.mean())
    assert lab_a["std"] == pytest.approx(train.std())


def test_numeric_imputation_standardisation_and_clipping(tiny_cohort):
    frame, spec = tiny_cohort
    pre = TabularPreprocessor(clip_z=8.0).fit(frame, spec)
    x = pre.transform(frame)
    assert x.dtype == np.float32 and x.shape == (len(frame), pre.n_inputs)
    assert np.isfinite(x).all()
    j = pre.columns.index("lab_a")
    stats = next(n for n in pre.numeric if n["name"] == "lab_a")
    nan_rows = frame["lab_a"].isna().to_numpy()
    np.testing.assert_allclose(x[nan_rows, j], (stats["median"] - stats["mean"]) / stats["std"], rtol=1e-5)
    train = (frame["split"] == "train").to_numpy()
    observed = train & ~nan_rows
    assert abs(x[observed, j].mean()) < 1e-4 and abs(x[observed, j].std() - 1) < 1e-3
    # noise_4 carries 1e6 outliers: they are clipped to +8 standard deviations.
    k = pre.columns.index("noise_4")
    assert x[:, k].max() == pytest.approx(8.0)


def test_missing_indicators_only_for_features_missing_in_train(tiny_cohort):
    frame, spec = tiny_cohort
    pre = TabularPreprocessor().fit(frame, spec)
    indicators = [c for c in pre.columns if c.endswith("__missing")]
    expected = sorted(c + "__missing" for c in ("lab_a", "lab_b", "lab_c", "lab_e", "noise_0"))
    assert sorted(indicators) == expected
    assert pre.columns[-len(indicators) :] == indicators  # appended after the numeric block
    x = pre.transform(frame)
    for col in indicators:
        np.testing.assert_array_equal(x[:, pre.columns.index(col)], frame[col[: -len("__missing")]].isna())
    # A feature complete in train gets no indicator even if test rows miss it; it is simply imputed.
    test = frame[frame["split"] == "test"].copy()
    test["lab_d"] = np.nan
    xt = pre.transform(test)
    stats = next(n for n in pre.numeric if n["name"] == "lab_d")
    np.testing.assert_allclose(
        xt[:, pre.columns.index("lab_d")], (stats["median"] - stats["mean"]) / stats["std"]
    )
    assert TabularPreprocessor(missing_indicators=False).fit(frame, spec).n_inputs == pre.n_inputs - 5


def test_categorical_layout_and_unseen_codes_become_unknown(tiny_cohort):
    frame, spec = tiny_cohort
    pre = TabularPreprocessor().fit(frame, spec)
    assert pre.columns[:3] == ["stage", "sex", "unit"] and pre.cat_idxs == [0, 1, 2]
    assert pre.cat_dims == [5, 3, 6]  # from features.json, including the never-used code
    rows = frame.iloc[:5].copy()
    rows["unit"] = [5, 99, -3, 2, 1]  # unseen in train, out of range, negative, seen, seen
    rows["sex"] = [np.nan, 1, 2, 1, 2]
    x = pre.transform(rows)
    np.testing.assert_array_equal(x[:, 2], [0, 0, 0, 2, 1])
    np.testing.assert_array_equal(x[:, 1], [0, 1, 2, 1, 2])


def test_preprocessor_json_round_trip_and_clear_errors(tiny_cohort, tmp_path):
    frame, spec = tiny_cohort
    pre = TabularPreprocessor().fit(frame, spec)
    pre.save(tmp_path / "pre.json")
    again = TabularPreprocessor.load(tmp_path / "pre.json")
    json.dumps(pre.to_dict())
    np.testing.assert_array_equal(again.transform(frame), pre.transform(frame))
    assert again.cat_dims == pre.cat_dims and again.columns == pre.columns
    with pytest.raises(KeyError, match="lab_c"):
        pre.transform(frame.drop(columns=["lab_c"]))
    bad = frame.copy()
    bad["lab_a"] = "high"
    with pytest.raises(ValueError, match="lab_a"):
        pre.transform(bad)
    with pytest.raises(ValueError, match="train"):
        TabularPreprocessor().fit(frame[frame["split"] == "test"], spec)
    with pytest.raises(RuntimeError, match="fit"):
        TabularPreprocessor().transform(frame)


# ---------------------------------------------------------------------------------------------- encoder
def _x(frame, spec, n=64):
    pre = TabularPreprocessor().fit(frame, spec)
    return pre, torch.from_numpy(pre.transform(frame.iloc[:n]))


def test_encoder_equals_pytorch_tabnet_sum_of_relu_steps(tiny_cohort):
    frame, spec = tiny_cohort
    pre, x = _x(frame, spec)
    torch.manual_seed(0)
    enc = TabNetEhrEncoder.from_preprocessor(pre, SMALL).eval()
    h = enc(x)
    assert h.shape == (len(x), SMALL.n_d) and enc.out_dim == SMALL.n_d
    # Reference 1: pytorch-tabnet's supervised TabNet with our weights and an identity final mapping
    # returns exactly the representation TabNetNoEmbeddings sums from the steps.
    ref = TabNet(pre.n_inputs, 1, n_d=16, n_a=16, n_steps=2, cat_idxs=pre.cat_idxs, cat_dims=pre.cat_dims,
                 cat_emb_dim=[4, 4, 4], virtual_batch_size=64, group_attention_matrix=torch.eye(pre.n_inputs))  # fmt: skip
    report = transfer_pretrained_weights(ref, enc)  # supervised TabNet as a source: tabnet.encoder -> encoder
    # Left behind: the classifier layer and TabNetNoEmbeddings' own initial_bn, which its forward never uses.
    assert {n.split(".")[1] for n in report.unused_source} == {"final_mapping", "initial_bn"}
    ref.tabnet.final_mapping = torch.nn.Identity()
    ref.eval()
    h = enc(x)
    torch.testing.assert_close(h, ref(x)[0], rtol=0, atol=0)
    # Reference 2: the steps of TabNetEncoder are already ReLU'd; the output is their plain sum.
    steps, _ = enc.encoder(enc.embedder(x))
    assert all((s >= 0).all() for s in steps)
    torch.testing.assert_close(h, steps[0] + steps[1])
    assert torch.equal(enc({"x": x}), h)  # the contrastive batch form


def test_forward_masks_and_importance_sum_back_to_columns(tiny_cohort):
    frame, spec = tiny_cohort
    pre, x = _x(frame, spec, n=32)
    enc = TabNetEhrEncoder.from_preprocessor(pre, SMALL).eval()
    m_explain, masks = enc.forward_masks(x)
    post = pre.n_inputs + 3 * (SMALL.cat_emb_dim - 1)
    assert m_explain.shape == (32, post) and set(masks) == {0, 1}
    for m in masks.values():  # sparsemax masks are distributions over embedded columns
        torch.testing.assert_close(m.sum(dim=1), torch.ones(32))
    per_column = embedded_to_input_importance(m_explain, enc)
    assert per_column.shape == (32, pre.n_inputs)
    np.testing.assert_allclose(per_column.sum(1), m_explain.sum(1).detach().numpy(), rtol=1e-5)
    # The group matrices follow .to(): they are (non-persistent) buffers, not plain attributes.
    buffers = dict(enc.named_buffers())
    assert (
        "encoder.group_attention_matrix" in buffers
        and "encoder.group_attention_matrix" not in enc.state_dict()
    )


# ------------------------------------------------------------------------------------ masked pretraining
@pytest.fixture(scope="module")
def pretrained():
    from conftest import make_tiny_cohort

    frame, spec = make_tiny_cohort()
    train, val = (frame[frame["split"] == s].reset_index(drop=True) for s in ("train", "val"))
    pre = TabularPreprocessor().fit(train, spec)
    cfg = MaskedPretrainConfig(epochs=25, batch_size=64, patience=25, seed=3, progress=False)
    return pre, train, val, masked_pretrain(pre, train, val, SMALL, cfg), cfg


def test_masked_pretraining_reduces_reconstruction_loss(pretrained):
    pre, train, _, result, cfg = pretrained
    x = pre.transform(train)
    untrained = build_pretraining_network(pre, SMALL, cfg, seed=cfg.seed)
    before = masked_reconstruction_loss(untrained, x, seed=11)
    after = masked_reconstruction_loss(result.network, x, seed=11)
    # A random decoder is far off; the trained one beats "predict each column's mean" (loss ~1).
    assert before > 10 and after < 0.99, (before, after)
    assert len(result.history) == 25 and result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.best_epoch == min(range(25), key=lambda i: result.history[i]["val_loss"])
    errors = reconstruction_error_per_feature(result.network, pre, train, repeats=2)
    assert list(errors["column"]) == pre.columns and (errors["n_masked"] > 0).all()
    assert np.isfinite(errors["nmse"]).all()
    # It learned the structure: lab_a is predictable from its proxies (lab_c, lab_f, stage), noise is not.
    nmse = errors.set_index("column")["nmse"]
    assert nmse["lab_a"] < 0.8 and nmse["noise_2"] > 0.9, nmse.round(2).to_dict()


def test_seeded_build_is_the_network_masked_pretraining_starts_from(pretrained):
    pre, train, _, _, cfg = pretrained
    start = masked_pretrain(pre, train, None, SMALL, dataclasses.replace(cfg, epochs=0))  # no step taken
    torch.manual_seed(cfg.seed + 1)  # the caller's RNG must not matter ...
    rebuilt = build_pretraining_network(pre, SMALL, cfg, seed=cfg.seed).state_dict()
    after = torch.rand(1)
    torch.manual_seed(cfg.seed + 1)
    assert torch.equal(after, torch.rand(1))  # ... and is left where it was
    assert all(torch.equal(v, rebuilt[k]) for k, v in start.network.state_dict().items())
    other = build_pretraining_network(pre, SMALL, cfg, seed=cfg.seed + 1).state_dict()
    assert not all(torch.equal(v, other[k]) for k, v in rebuilt.items())


def test_every_encoder_tensor_is_transferred(pretrained):
    pre, *_, result, _ = pretrained
    source = result.network.state_dict()
    fresh = TabNetEhrEncoder.from_preprocessor(pre, SMALL)
    target = fresh.state_dict()
    differing = [k for k in target if not torch.equal(target[k], source[k])]
    assert len(differing) > len(target) // 2  # a fresh encoder really is different ...
    report = transfer_pretrained_weights(result.network, fresh)
    after = fresh.state_dict()
    assert set(report.mapping) == set(after) and report.n_transferred == len(after)
    for name, tensor in after.items():  # ... and afterwards every parameter and buffer equals its source
        assert torch.equal(tensor, source[report.mapping[name]]), name
    assert all(n.startswith("decoder.") for n in report.unused_source) and report.unused_source
    # masked_pretrain already did the same for its returned encoder.
    for name, tensor in result.encoder.state_dict().items():
        assert torch.equal(tensor, source[name]), name
    assert set(after) == {k for k in source if not k.startswith("decoder.")}


@pytest.mark.parametrize("change", [{"n_steps": 3}, {"n_d": 24}, {"n_a": 8}, {"cat_emb_dim": 2}])
def test_mismatched_encoder_raises(pretrained, change):
    pre, *_, result, _ = pretrained
    other = TabNetConfig(**{**SMALL.to_dict(), **change})
    with pytest.raises(ValueError, match="do not fit"):
        transfer_pretrained_weights(result.network, TabNetEhrEncoder.from_preprocessor(pre, other))


def test_missing_source_tensor_raises(pretrained):
    pre, *_, result, _ = pretrained

    class Partial(torch.nn.Module):  # a source that lacks the categorical embeddings
        def __init__(self, net):
            super().__init__()
            self.embedder, self.encoder = torch.nn.Module(), net.encoder

    with pytest.raises(ValueError, match="embedder.embeddings.0.weight"):
        transfer_pretrained_weights(Partial(result.network), TabNetEhrEncoder.from_preprocessor(pre, SMALL))


def test_pretraining_refuses_other_splits(tiny_cohort):
    frame, spec = tiny_cohort
    pre = TabularPreprocessor().fit(frame, spec)
    with pytest.raises(ValueError, match="other splits"):
        masked_pretrain(pre, frame, None, SMALL, MaskedPretrainConfig(epochs=1, progress=False))


def test_pretraining_is_seeded(tiny_cohort):
    frame, spec = tiny_cohort
    train = frame[frame["split"] == "train"].iloc[:300]
    pre = TabularPreprocessor().fit(train, spec)
    cfg = MaskedPretrainConfig(epochs=2, batch_size=128, seed=5, progress=False)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = masked_pretrain(pre, train, None, SMALL, cfg)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone
    b = masked_pretrain(pre, train, None, SMALL, cfg)
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    for k, v in a.encoder.state_dict().items():
        assert torch.equal(v, b.encoder.state_dict()[k])
    pd.testing.assert_frame_equal(
        reconstruction_error_per_feature(a.network, pre, train, repeats=1),
        reconstruction_error_per_feature(b.network, pre, train, repeats=1),
    )
