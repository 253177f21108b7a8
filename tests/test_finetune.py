"""Fine-tuning: freezing, early stopping, label fractions, loading encoders from any stage."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import save_model
from sklearn.metrics import roc_auc_score

from ehrclip_kit.encoders.tabular import TabNetConfig, TabNetEhrEncoder, TabularPreprocessor
from ehrclip_kit.evaluation import subsample_labels
from ehrclip_kit.finetune import FinetuneConfig, finetune, freeze_by_prefix, load_encoder_state, predict_proba
from ehrclip_kit.masked_pretraining import MaskedPretrainConfig, masked_pretrain

torch.set_num_threads(1)
SMALL = TabNetConfig(n_d=16, n_a=16, n_steps=2, virtual_batch_size=64)
FAST = dict(lr=5e-3, batch_size=64, progress=False)


@pytest.fixture
def setup(splits):
    pre = TabularPreprocessor().fit(splits["train"], splits["spec"])
    torch.manual_seed(0)
    return pre, TabNetEhrEncoder.from_preprocessor(pre, SMALL), splits


def _aliases(module):
    names = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def test_freeze_prefixes_freeze_exactly_embedding_and_initial_splitter(setup):
    pre, enc, s = setup
    before = copy.deepcopy(enc.state_dict())
    model, _ = finetune(enc, pre, s["train"], s["val"], FinetuneConfig(epochs=2, patience=5, **FAST))
    for k, v in enc.state_dict().items():  # the caller's encoder is untouched
        assert torch.equal(v, before[k]), k
    prefixes = ("embedder.", "encoder.initial_splitter.")
    tuned = dict(model.encoder.named_parameters(remove_duplicate=False))
    n_frozen = n_trained = 0
    for names in _aliases(model.encoder).values():
        param = tuned[names[0]]
        should_freeze = any(n.startswith(prefixes) for n in names)
        assert param.requires_grad is not should_freeze, names
        if should_freeze:
            assert torch.equal(param, before[names[0]]), f"{names} changed although frozen"
            n_frozen += 1
        else:
            assert not torch.equal(param, before[names[0]]), f"{names} did not train"
            n_trained += 1
    assert n_frozen >= 3 and n_trained >= 10
    # The GLU layers shared by every step live in the initial splitter, so they are frozen too.
    shared = "encoder.feat_transformers.0.shared.glu_layers.0.fc.weight"
    assert not tuned[shared].requires_grad and torch.equal(tuned[shared], before[shared])
    assert "encoder.initial_bn.weight" not in model.frozen_parameters
    assert all(
        n.startswith(("encoder.embedder.", "encoder.encoder.initial_splitter."))
        for n in model.frozen_parameters
    )
    # Nothing frozen: the embeddings train as well.
    model2, _ = finetune(enc, pre, s["train"], s["val"], FinetuneConfig(epochs=1, freeze_prefixes=(), **FAST))
    assert not torch.equal(
        model2.encoder.embedder.embeddings[0].weight, before["embedder.embeddings.0.weight"]
    )
    with pytest.raises(ValueError, match="match no parameter"):
        freeze_by_prefix(copy.deepcopy(enc), ["encoder.initial_split"])  # prefixes match whole name parts


def test_finetune_beats_chance_without_text(setup):
    pre, enc, s = setup
    model, history = finetune(enc, pre, s["train"], s["val"], FinetuneConfig(epochs=10, patience=10, **FAST))
    features_only = s["test"][pre.feature_names]  # no ids, label, split or note needed at inference
    p = predict_proba(model, pre, features_only)
    assert p.shape == (len(s["test"]),) and ((p >= 0) & (p <= 1)).all()
    assert roc_auc_score(s["test"]["label"], p) > 0.62
    assert history[model.best_epoch]["val_auroc"] == max(h["val_auroc"] for h in history)


def test_early_stopping_restores_best_epoch(setup):
    pre, enc, s = setup
    cfg = FinetuneConfig(epochs=15, lr=2e-2, batch_size=64, patience=3, progress=False)
    model, history = finetune(enc, pre, s["train"], s["val"], cfg)
    aucs = [h["val_auroc"] for h in history]
    best = int(np.argmax(aucs))
    assert model.best_epoch == best and history[best]["best"]
    # The run stopped early, `patience` epochs after the best one, which is not the last epoch ...
    assert len(history) == best + cfg.patience + 1 < cfg.epochs
    # ... and the returned weights are the best epoch's, not the last one's.
    val_auc = roc_auc_score(s["val"]["label"], predict_proba(model, pre, s["val"]))
    assert val_auc == pytest.approx(aucs[best], abs=1e-9)
    assert val_auc != pytest.approx(aucs[-1], abs=1e-6)


def test_label_fraction_seed_and_pos_weight(setup):
    pre, enc, s = setup
    cfg = FinetuneConfig(epochs=2, label_fraction=0.2, seed=4, **FAST)
    a, ha = finetune(enc, pre, s["train"], s["val"], cfg)
    b, hb = finetune(enc, pre, s["train"], s["val"], cfg)
    assert a.n_train == len(subsample_labels(s["train"], 0.2, seed=4)) < len(s["train"]) // 4
    assert ha == hb  # same seed: same subset, init, order and dropout
    c, hc = finetune(
        enc, pre, s["train"], s["val"], FinetuneConfig(epochs=2, label_fraction=0.2, seed=5, **FAST)
    )
    assert hc != ha
    # Imbalance-aware loss: up-weighting the minority class raises the predicted risk.
    none, _ = finetune(enc, pre, s["train"], s["val"], FinetuneConfig(epochs=2, pos_weight=None, **FAST))
    auto, _ = finetune(enc, pre, s["train"], s["val"], FinetuneConfig(epochs=2, pos_weight="auto", **FAST))
    assert predict_proba(auto, pre, s["train"]).mean() > predict_proba(none, pre, s["train"]).mean() + 0.05


def test_small_label_sets_still_get_min_steps_per_epoch(setup, monkeypatch):
    pre, enc, s = setup
    steps = []
    original = torch.optim.AdamW.step
    monkeypatch.setattr(
        torch.optim.AdamW, "step", lambda self, *a, **k: (steps.append(1), original(self, *a, **k))[1]
    )
    cfg = FinetuneConfig(epochs=1, patience=5, label_fraction=0.2, seed=1, min_steps_per_epoch=7, **FAST)
    model, history = finetune(enc, pre, s["train"], s["val"], cfg)
    per_pass = -(-model.n_train // FAST["batch_size"])  # batches in one pass over the labelled rows
    assert per_pass < 7
    assert len(steps) == per_pass * -(-7 // per_pass)  # whole passes until at least 7 steps
    assert np.isfinite(history[0]["train_loss"]) and history[0]["train_loss"] > 0


def test_finetune_refuses_leaky_or_degenerate_frames(setup):
    pre, enc, s = setup
    with pytest.raises(ValueError, match="other splits"):
        finetune(enc, pre, s["train"], s["test"], FinetuneConfig(epochs=1, **FAST))
    one_class = s["val"][s["val"]["label"] == 0]
    with pytest.raises(ValueError, match="single class"):
        finetune(enc, pre, s["train"], one_class, FinetuneConfig(epochs=1, **FAST))


# ----------------------------------------------------------------------------------------- loading weights
class _Checkpoint(torch.nn.Module):
    """Shaped like the contrastive model: the EHR encoder under ``encoders.ehr``, plus a text-side head."""

    def __init__(self, encoder):
        super().__init__()
        self.encoders = torch.nn.ModuleDict({"ehr": encoder})
        self.text_head = torch.nn.Linear(4, 2)


def test_load_encoder_state_from_safetensors_with_prefix(setup, tmp_path):
    pre, enc, _ = setup
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.5)  # make the checkpoint distinguishable from any fresh init
    path = tmp_path / "model.safetensors"
    save_model(_Checkpoint(enc), str(path))  # drops alias names of TabNet's shared layers
    from safetensors.torch import load_file

    stored = load_file(str(path))
    assert len([k for k in stored if k.startswith("encoders.ehr.")]) < len(enc.state_dict())
    fresh = TabNetEhrEncoder.from_preprocessor(pre, SMALL)
    loaded = load_encoder_state(fresh, path, prefix="encoders.ehr.")
    assert sorted(loaded) == sorted(enc.state_dict())
    for k, v in enc.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    # Shared layers stay shared after loading (one tensor, several names).
    assert (
        fresh.encoder.feat_transformers[1].shared.glu_layers[0].fc.weight
        is fresh.encoder.initial_splitter.shared.glu_layers[0].fc.weight
    )


def test_load_encoder_state_raises_on_missing_unexpected_and_shape(setup):
    pre, enc, _ = setup
    state = {f"encoders.ehr.{k}": v for k, v in enc.state_dict().items()}
    fresh = TabNetEhrEncoder.from_preprocessor(pre, SMALL)
    load_encoder_state(fresh, state, prefix="encoders.ehr.")  # complete: fine
    missing = {k: v for k, v in state.items() if k != "encoders.ehr.encoder.initial_bn.running_var"}
    with pytest.raises(KeyError, match="encoder.initial_bn.running_var"):
        load_encoder_state(fresh, missing, prefix="encoders.ehr.")
    with pytest.raises(KeyError, match="unexpected.*surprise"):
        load_encoder_state(fresh, {**state, "encoders.ehr.surprise": torch.zeros(1)}, prefix="encoders.ehr.")
    with pytest.raises(KeyError, match="prefix"):
        load_encoder_state(fresh, state, prefix="encoders.text.")
    deeper = TabNetEhrEncoder.from_preprocessor(pre, TabNetConfig(**{**SMALL.to_dict(), "n_steps": 3}))
    with pytest.raises(KeyError, match="missing"):
        load_encoder_state(deeper, state, prefix="encoders.ehr.")
    wider = TabNetEhrEncoder.from_preprocessor(pre, TabNetConfig(**{**SMALL.to_dict(), "n_d": 24}))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_encoder_state(wider, state, prefix="encoders.ehr.")


def test_masked_then_finetune_keeps_frozen_pretrained_layers(setup):
    pre, _, s = setup
    result = masked_pretrain(
        pre, s["train"], s["val"], SMALL, MaskedPretrainConfig(epochs=2, batch_size=128, progress=False)
    )
    model, _ = finetune(result.encoder, pre, s["train"], s["val"], FinetuneConfig(epochs=2, **FAST))
    pretrained = result.network.state_dict()
    for name in ("embedder.embeddings.1.weight", "encoder.initial_splitter.shared.glu_layers.0.fc.weight"):
        assert torch.equal(model.encoder.state_dict()[name], pretrained[name])
    assert not torch.equal(
        model.encoder.state_dict()["encoder.att_transformers.0.fc.weight"],
        pretrained["encoder.att_transformers.0.fc.weight"],
    )
