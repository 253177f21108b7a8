"""End to end through the command line: synth -> cohort -> pretrain -> finetune, one and two processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def ehrclip(*args: str, env: dict | None = None, timeout: int = 900) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "ehrclip_kit.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    assert out.returncode == 0, f"ehrclip {' '.join(args)} failed:\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, note_cache):
    root = tmp_path_factory.mktemp("pipeline")
    ehrclip("synth", "--out", str(root / "world"), "--patients", "250", "--seed", "3", "--no-ecg")
    ehrclip("cohort", "--mimic", str(root / "world"), "--out", str(root / "cohort"))
    return root / "cohort"


def test_pretrain_then_finetune_from_the_command_line(cohort, tmp_path):
    run = tmp_path / "pretrain"
    ehrclip("pretrain", "--cohort", str(cohort), "--out", str(run), "--preset", "smoke", "--no-progress")
    for name in ("encoder.safetensors", "preprocessor.json", "pretrain_config.json", "metrics.json"):
        assert (run / name).exists(), name
    assert (run / "contrastive" / "checkpoint" / "model.safetensors").exists()
    metrics = json.loads((run / "metrics.json").read_text())
    history = metrics["contrastive"]["history"]
    assert "val/ehr_text/ehr2text_R@10" in history[-1]
    # The saved encoder is the contrastive model's EHR tower, not the masked-only or a fresh one.
    from ehrclip_kit.models import encoder_state
    from ehrclip_kit.pretrain import load_pretrained

    encoder, _, config = load_pretrained(run)
    assert config.stages == ("masked", "contrastive")
    tower = encoder_state(run / "contrastive" / "checkpoint", "ehr")
    for key, value in encoder.state_dict().items():
        if key in tower:
            assert torch.equal(value, tower[key]), key

    out = tmp_path / "finetune"
    ehrclip("finetune", "--cohort", str(cohort), "--encoder", str(run), "--out", str(out),
            "--epochs", "3", "--no-progress")  # fmt: skip
    result = json.loads((out / "metrics.json").read_text())
    assert result["method"] == "masked+contrastive"
    assert 0 <= result["auroc_lo"] <= result["auroc"] <= result["auroc_hi"] <= 1
    predictions = pd.read_parquet(out / "test_predictions.parquet")
    test_rows = pd.read_parquet(cohort / "readmission_30d.parquet").query("split == 'test'")
    assert set(predictions["hadm_id"]) == set(test_rows["hadm_id"])


def test_baseline_from_the_command_line(cohort, tmp_path):
    stdout = ehrclip("finetune", "--cohort", str(cohort), "--encoder", "xgboost", "--out", str(tmp_path))
    assert "AUROC" in stdout and json.loads((tmp_path / "metrics.json").read_text())["method"] == "xgboost"


def test_pretraining_reads_only_train_patients(cohort):
    from ehrclip_kit.data.datasets import load_notes, load_task
    from ehrclip_kit.pretrain import preset, pretrain_encoder

    frame, features = load_task(cohort, "readmission_30d")
    config = preset("smoke")
    config.stages = ("masked",)
    poisoned = frame.copy()
    numeric = [f["name"] for f in features["features"] if f["kind"] == "numeric"]
    # Wild values for validation/test patients only: if pretraining read them, the fitted scaler would move.
    poisoned.loc[poisoned["split"] != "train", numeric] = 1e9
    a = pretrain_encoder(frame, features, config, load_notes(cohort))
    b = pretrain_encoder(poisoned, features, config, load_notes(cohort))
    assert a.preprocessor.to_dict() == b.preprocessor.to_dict()


def test_torchrun_two_processes_pretrain(cohort, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "ehrclip_kit.cli", "pretrain", "--cohort", str(cohort), "--out", str(tmp_path / "ddp"),
           "--preset", "smoke", "--stages", "contrastive", "--batch-size", "16", "--no-progress"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    state = json.loads((tmp_path / "ddp" / "contrastive" / "checkpoint" / "config.json").read_text())
    assert (tmp_path / "ddp" / "encoder.safetensors").exists()
    assert state["train"]["batch_size"] == 16


def test_end_to_end_text_mode_trains_the_unfrozen_text_layers(cohort, tmp_path):
    """The transformer in the loop: frozen layers stay put, the last layer and the EHR tower move."""
    import dataclasses

    from transformers import BertConfig, BertModel

    from ehrclip_kit.data.datasets import load_notes, load_task
    from ehrclip_kit.encoders.text import load_text_tokenizer
    from ehrclip_kit.pretrain import preset, pretrain_encoder

    tiny = tmp_path / "tiny-bert"
    tokenizer = load_text_tokenizer()
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64))  # fmt: skip
    model.save_pretrained(tiny)
    tokenizer.save_pretrained(tiny)
    frame, features = load_task(cohort, "readmission_30d")
    config = preset("smoke")
    config = dataclasses.replace(config, stages=("contrastive",), text_mode="end_to_end")
    config.text = dataclasses.replace(
        config.text, model=str(tiny), freeze_layers=1, max_tokens=64, max_chunks=2
    )
    config.contrastive = dataclasses.replace(config.contrastive, epochs=1, batch_size=32)
    result = pretrain_encoder(frame, features, config, load_notes(cohort))
    text = result.model.encoders["text"].model
    before = BertModel.from_pretrained(tiny)
    assert torch.equal(text.encoder.layer[0].output.dense.weight, before.encoder.layer[0].output.dense.weight)
    assert torch.equal(text.embeddings.word_embeddings.weight, before.embeddings.word_embeddings.weight)
    assert not torch.equal(
        text.encoder.layer[1].output.dense.weight, before.encoder.layer[1].output.dense.weight
    )
    assert result.metrics["contrastive"]["history"][-1]["train_loss"] > 0
