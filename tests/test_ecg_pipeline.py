"""ECG <-> codes <-> text pipeline on a small synthetic world: FAC training, zero-shot retrieval, OOD, CLI."""

from __future__ import annotations

import argparse
import inspect

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from ehrclip_kit import ecg_pretrain as ep
from ehrclip_kit import ecg_tasks as et
from ehrclip_kit.data import ecg_index
from ehrclip_kit.data.synthetic import generate_world
from ehrclip_kit.data.synthetic_ecg import write_ecg_world
from ehrclip_kit.models import ContrastiveModel, encoder_state
from ehrclip_kit.training import TrainConfig

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    """~200 patients with 100 Hz ECGs (so loading needs no resampling) indexed by `ehrclip ecg-index`."""
    root = tmp_path_factory.mktemp("ecg_world")
    generate_world(root, n_patients=200, seed=11, ecg=False, progress=False)
    adm = pd.read_csv(root / "hosp" / "admissions.csv.gz", parse_dates=["admittime", "dischtime"])
    write_ecg_world(root, adm, pd.read_parquet(root / "truth.parquet"), seed=11, fs=100, progress=False)
    out = root / "index"
    args = argparse.Namespace(
        source="mimic", root=root / "ecg", out=out, fs=100, records=None, mimic_hosp=None, mimic_note=None,
        no_codes=False, window_days=365, report_days=30, past_only=False, min_count=1, min_seconds=9.9,
        workers=1, progress=False,
    )  # fmt: skip
    assert ecg_index.run(args) == 0
    return out


def _config(preset, tmp_path_factory, epochs, lr=3e-3, log_every=1):
    cache = tmp_path_factory.getbasetemp() / "cache"
    train = TrainConfig(epochs=epochs, batch_size=64, lr=lr, log_every=log_every, progress=False)
    return ep.ecg_preset(preset, text_mode="machine", cache_dir=str(cache), progress=False, train=train)


@pytest.fixture(scope="module")
def text_model(index_dir, tmp_path_factory):
    """ECG-text pretraining, long enough to align rhythms and morphologies with their statements."""
    config = _config("ecg-text", tmp_path_factory, epochs=12, log_every=5)
    return config, ep.pretrain_ecg(config, index_dir)


@pytest.fixture(scope="module")
def held_out(index_dir, text_model):
    config = text_model[0]
    parts = [ep.build_ecg_dataset(index_dir, None, config, s, only=("ecg",)) for s in ("val", "test")]
    frame = pd.concat([p.frame for p in parts], ignore_index=True)
    return frame, np.concatenate([et.eval_crops(p) for p in parts])


def test_fac_model_comes_from_the_general_factory_and_no_new_class_is_defined(index_dir):
    config = ep.ecg_preset("ecg-fac")
    model = ep.build_model(config, ep.load_vocab(index_dir), d_text=384)
    assert type(model) is ContrastiveModel
    assert [(s.name, s.a, s.b) for s in model.spaces] == [
        ("fine", "ecg_fine", "codes_fine"),
        ("coarse", "ecg_coarse", "text_coarse"),
    ]
    assert model.head_sources["ecg_coarse"] == "ecg_fine" and model.head_sources["ecg_fine"] == "ecg"
    for module in (ep, et):  # the pipeline defines datasets and helpers, never a model class
        defined = [
            c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == module.__name__
        ]
        assert not [c for c in defined if issubclass(c, nn.Module)]
    pair = ep.build_model(ep.ecg_preset("ecg-text"), None, d_text=384)
    assert type(pair) is ContrastiveModel and [s.name for s in pair.spaces] == ["ecg_text"]


def test_fac_training_decreases_both_space_terms(index_dir, tmp_path_factory):
    config = _config("ecg-fac", tmp_path_factory, epochs=6, lr=3e-3)
    result = ep.pretrain_ecg(config, index_dir)
    assert result.metrics["n_train"] == len(result.train) > 200
    assert set(result.train.frame["split"]) == {"train"}  # pretraining never sees val/test patients
    steps = pd.DataFrame(result.metrics["step_log"])  # one row per optimiser step (log_every=1)
    before, after = result.metrics["val_before"], result.history[-1]
    for space in ("fine", "coarse"):
        term = steps[f"{space}/contrastive_loss"].to_numpy()
        assert term[-3:].mean() < term[:3].mean() - 0.1, (space, term.round(3))
        key = f"val/{space}/contrastive_loss"
        assert after[key] < before[key], (space, before[key], after[key])


def test_zero_shot_text_query_retrieves_atrial_fibrillation_above_chance(index_dir, text_model, held_out):
    config, result = text_model
    frame, crops = held_out
    frame = et.with_truth(frame, ep.read_index(index_dir)[1])  # the findings the generator drew
    model = result.model.eval()
    ecg_head, text_head = et.query_space(model, "text")
    assert (ecg_head, text_head) == ("ecg_proj", "text_proj")
    emb = et.embed_ecgs(model, crops, ecg_head)
    queries = {
        "truth_af": "atrial fibrillation",
        "label_af": "atrial fibrillation",
        "label_lvh": "left ventricular hypertrophy",
    }
    found = et.zero_shot(model, emb, frame, config, queries, ks=(10,))
    retrieval = found["retrieval"].set_index("label")
    for label in ("truth_af", "label_af"):  # synthetic truth and machine statements
        row = retrieval.loc[label]
        assert 0.03 < row["prevalence"] < 0.4
        assert row["precision"] >= 2 * row["prevalence"], row.to_dict()
    assert found["auroc"].loc["label_af", "auroc"] > 0.6 and found["auroc"].loc["label_lvh", "auroc"] > 0.8
    scores, ids = et.retrieve(model, "atrial fibrillation", emb, config, k=10)
    assert (np.diff(scores) <= 0).all()
    assert frame["label_af"].to_numpy()[ids].mean() == retrieval.loc["label_af", "precision"]
    test = ep.build_ecg_dataset(index_dir, None, config, "test", only=("ecg",))
    widget = et.retrieval_widget(model, test, et.embed_ecgs(model, test, ecg_head), config, k=2)
    (box, button), output = widget.children[0].children, widget.children[1]
    first = [o["data"]["text/plain"] for o in output.outputs]
    assert len(first) == 2 and all("application/vnd.plotly.v1+json" in o["data"] for o in output.outputs)
    box.value = "left ventricular hypertrophy"
    button.click()  # what pressing the button does
    assert [o["data"]["text/plain"] for o in output.outputs] != first


def test_ood_detects_heavily_noised_and_lead_swapped_ecgs(text_model, held_out):
    _, result = text_model
    train_crops = et.eval_crops(result.train)
    table, scores = et.ood_evaluation(result.model, train_crops, held_out[1], shifts=("noise", "lead_swap"))
    auroc = table.set_index(["shift", "detector"])["auroc"]
    assert auroc["noise", "mahalanobis"] > 0.7 and auroc["lead_swap", "mahalanobis"] > 0.7, table
    assert set(scores) == {"noise", "lead_swap"} and len(scores["noise"]["knn"][1]) == len(held_out[1])


def test_shifts_keep_shape_and_lead_swap_is_the_arm_electrode_reversal():
    x = np.random.default_rng(0).normal(size=(2, 12, 50)).astype(np.float32)
    y = et.limb_reversal(x)
    assert np.allclose(y[:, 0], -x[:, 0]) and np.allclose(y[:, 1], x[:, 2]) and np.allclose(y[:, 3], x[:, 4])
    assert np.allclose(y[:, 5:], x[:, 5:])
    for kind in et.SHIFTS:
        z = et.shifted(x, kind, seed=1)
        assert z.shape == x.shape and np.allclose(z.std(-1), 1, atol=1e-3)  # re-normalised per lead
    with pytest.raises(ValueError, match="unknown shift"):
        et.shifted(x, "upside-down")


def test_random_crops_depend_on_epoch_and_item_only(index_dir, tmp_path_factory):
    config = _config("ecg-codes", tmp_path_factory, epochs=1)
    data = ep.build_ecg_dataset(index_dir, None, config, "train")
    assert data.train and all(len(c[0]) > 0 for c in data.codes)  # ECGs without codes are left out
    first = data[3]["ecg"].clone()
    assert torch.equal(first, data[3]["ecg"]) and first.shape == (12, config.ecg.crop_len)
    data.set_epoch(1)
    assert not torch.equal(first, data[3]["ecg"])
    batch = data.collate([data[i] for i in range(4)])
    assert batch["ecg"].shape == (4, 12, 500) and batch["codes"]["input_ids"].shape[0] == 4
    held = ep.build_ecg_dataset(index_dir, None, config, "test", only=("ecg",))
    assert not held.train and set(held.frame["split"]) == {"test"} and set(held[0]) == {"ecg"}


def test_text_modes_pick_statements_notes_or_entities(index_dir):
    frame, root = ep.read_index(index_dir)
    assert (root / f"{frame['path'].iloc[0]}.hea").exists()
    machine, notes = ep.ecg_texts(index_dir, frame, "report")
    assert machine == frame["report"].tolist() and len(notes) == len(frame)
    assert sum(bool(n) for n in notes) > 0.8 * len(frame) and "Discharge" in max(notes, key=len)
    entities, none = ep.ecg_texts(index_dir, frame, "entity")
    assert none is None and sum("," in e for e in entities) > 0.5 * len(frame)
    with pytest.raises(ValueError, match="text mode"):
        ep.ecg_texts(index_dir, frame, "tweets")


def test_cli_preset_writes_a_checkpoint_that_loads_back(index_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("EHRCLIP_CACHE", str(tmp_path / "cache"))  # the CLI's default cache folder
    overrides = tmp_path / "ecg.json"  # nested objects merge into the preset's, key by key
    overrides.write_text('{"codes": {"hidden": 32, "heads": 2}, "train": {"max_steps": 3}}')
    args = argparse.Namespace(
        preset="ecg-codes", cohort=index_dir, out=tmp_path / "run", seed=0, epochs=1, batch_size=64, lr=1e-3,
        no_progress=True, loss=None, text_model=None, ecg_config=overrides, ecg_text_mode="entity",
    )  # fmt: skip
    assert ep.run_preset(args) == 0
    for name in (
        "checkpoint/model.safetensors",
        "ecg_pretrain_config.json",
        "code_vocab.json",
        "metrics.json",
    ):
        assert (tmp_path / "run" / name).exists(), name
    model, config, vocab = ep.load_ecg_pretrained(tmp_path / "run")
    assert config.preset == "ecg-codes" and vocab is not None and config.text_mode == "entity"
    assert config.codes["hidden"] == 32 and config.codes["layers"] == 2 and config.train.max_steps == 3
    assert config.train.epochs == 1 and model.encoders["codes"].out_dim == 32
    x = torch.randn(3, 12, 500)
    assert torch.allclose(model.embed({"ecg": x}, "ecg_proj")["ecg_proj"].norm(dim=-1), torch.ones(3))
    state = encoder_state(tmp_path / "run" / "checkpoint", "ecg")
    assert all(torch.equal(state[k], v) for k, v in model.encoders["ecg"].state_dict().items())


def test_fine_tuning_summary_has_a_ci_per_method_and_fraction(text_model, index_dir):
    config, result = text_model
    test = ep.build_ecg_dataset(index_dir, None, config, "test", only=("ecg",))
    train = result.train.subset(np.arange(len(result.train)))

    def factory():
        return ep.ECGResNet1d(config.ecg_encoder)

    inits = {"pretrained": encoder_state(result.model, "ecg"), "random": None}
    ft = et.EcgFinetuneConfig(epochs=1, min_steps=2, n_boot=20)
    runs, summary = et.label_efficiency(factory, inits, train, test, "label_af", (0.1, 1.0), (0, 1), ft)
    assert len(runs) == 8 and runs["auroc"].between(0, 1).all()
    assert runs.loc[runs["label_fraction"] == 0.1, "n_train"].max() < runs["n_train"].max()
    auroc = summary[summary["metric"] == "auroc"]
    assert len(auroc) == 4 and (auroc["ci_low"] <= auroc["mean"]).all() and (auroc["n"] == 2).all()
    again = et.finetune_ecg(factory, inits["pretrained"], train, test, "label_af", 0.1, 1, ft)
    first = runs.query("method == 'pretrained' and label_fraction == 0.1 and seed == 1").iloc[0]
    assert again["auroc"] == first["auroc"] and again["loss_curve"] == first["loss_curve"]  # seeded
