"""Trainer: exact resume, checkpoint contents and atomicity, schedule, torchrun DDP; config round trip."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import ehrclip_kit.training as training
from ehrclip_kit.config import from_dict, load_config, save_config, to_dict
from ehrclip_kit.models import ehr_text_model
from ehrclip_kit.retrieval_metrics import ContrastiveEvaluator
from ehrclip_kit.training import Callback, TrainConfig, Trainer, cosine_with_warmup, find_checkpoint

torch.set_num_threads(1)
HERE = Path(__file__).resolve().parent


def _dataset(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 3, generator=g)
    ehr = z @ torch.randn(3, 6, generator=g) + 0.2 * torch.randn(n, 6, generator=g)
    text = z @ torch.randn(3, 5, generator=g) + 0.2 * torch.randn(n, 5, generator=g)
    return [{"ehr": ehr[i], "text": text[i]} for i in range(n)]


def _model(seed=0):
    torch.manual_seed(seed)
    # Dropout on purpose: exact resume must restore the RNG state too.
    encoder = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Dropout(0.2), nn.Linear(12, 8))
    return ehr_text_model(encoder, d_ehr=8, d_text=5, proj_dim=4, dropout=0.1)


def _config(**kw):
    # 60 examples / batch 8 -> 7 batches per epoch, grad_accum 2 -> 4 optimizer steps per epoch (2,2,2,1).
    base = dict(
        epochs=3,
        lr=3e-3,
        batch_size=8,
        grad_accum=2,
        checkpoint_every=3,
        warmup_steps=2,
        seed=5,
        progress=False,
        log_every=1,
    )
    base.update(kw)
    return TrainConfig(**base)


class Kill(Callback):
    """Simulate the process dying right after optimizer step ``at`` (before any later checkpoint)."""

    def __init__(self, at):
        self.at = at

    def on_step_end(self, trainer, logs):
        if trainer.global_step == self.at:
            raise KeyboardInterrupt(f"killed at step {self.at}")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    model = _model()
    trainer = Trainer(
        model,
        _dataset(),
        _config(),
        out_dir=out,
        evaluate=ContrastiveEvaluator(_dataset(20, 1), batch_size=10),
    )
    history = trainer.fit()
    return out, model, trainer, history


class FailingEvaluator(ContrastiveEvaluator):
    """Dies in the first end-of-epoch evaluation, after the step checkpoint at the epoch's last step."""

    calls = 0

    def __call__(self, model):
        FailingEvaluator.calls += 1
        if FailingEvaluator.calls == 1:
            raise KeyboardInterrupt("killed during evaluation")
        return super().__call__(model)


# kill_at -> (step, batch_in_epoch) of the checkpoint the run resumes from. 7 and 10 are mid-epoch; 5 is
# the end-of-epoch-0 checkpoint; "eval" is the step-4 checkpoint taken before epoch 0's evaluation ran.
RESUME_POINTS = {5: (4, 0), 7: (6, 4), 10: (9, 2), "eval": (4, 7)}


@pytest.mark.parametrize("kill_at", list(RESUME_POINTS))
def test_killed_and_resumed_run_ends_bit_identical(tmp_path, uninterrupted, kill_at):
    _, full_model, full_trainer, full_history = uninterrupted
    data, ev = _dataset(), ContrastiveEvaluator(_dataset(20, 1), batch_size=10)
    if kill_at == "eval":
        FailingEvaluator.calls = 0
        run = Trainer(
            _model(),
            data,
            _config(checkpoint_every=2),
            out_dir=tmp_path,
            evaluate=FailingEvaluator(_dataset(20, 1), batch_size=10),
        )
    else:
        run = Trainer(_model(), data, _config(), out_dir=tmp_path, evaluate=ev, callbacks=[Kill(kill_at)])
    with pytest.raises(KeyboardInterrupt):
        run.fit()
    state = torch.load(find_checkpoint(tmp_path) / "trainer_state.pt", weights_only=True)
    assert (state["global_step"], state["batch_in_epoch"]) == RESUME_POINTS[kill_at]
    cfg = _config(checkpoint_every=2) if kill_at == "eval" else _config()
    resumed_model = _model(seed=123)  # different init: everything must come from the checkpoint
    resumed = Trainer(resumed_model, data, cfg, out_dir=tmp_path, evaluate=ev)
    history = resumed.fit(resume=True)
    assert resumed.global_step == full_trainer.global_step == 12
    for (name, p), q in zip(
        full_model.state_dict().items(), resumed_model.state_dict().values(), strict=True
    ):
        assert torch.equal(p, q), name
    assert history == full_history
    assert [s["loss"] for s in resumed.step_log] == [s["loss"] for s in full_trainer.step_log]


def test_checkpoint_folder_contents(uninterrupted):
    out, model, trainer, history = uninterrupted
    ckpt = out / "checkpoint"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "config.json",
        "metrics.json",
        "model.safetensors",
        "trainer_state.pt",
    ]
    weights = load_file(ckpt / "model.safetensors")
    assert weights.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(weights[k], v), k
    config = json.loads((ckpt / "config.json").read_text())
    assert from_dict(TrainConfig, config["train"]) == _config()
    assert config["structure"]["spaces"][0]["name"] == "ehr_text"
    metrics = json.loads((ckpt / "metrics.json").read_text())
    assert metrics["global_step"] == 12 and len(metrics["history"]) == 3 == len(history)
    assert {"train_loss", "val/ehr_text/contrastive_loss", "val/ehr_text/ehr2text_R@1"} <= set(history[-1])
    # No leftovers from atomic writes.
    assert [p.name for p in out.iterdir()] == ["checkpoint"]


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    real_save = training.save_weights
    calls = []

    def flaky_save(model, path):
        calls.append(path)
        real_save(model, path)
        if len(calls) == 2:
            raise OSError("disk full")

    monkeypatch.setattr(training, "save_weights", flaky_save)
    with pytest.raises(OSError, match="disk full"):
        Trainer(_model(), _dataset(), _config(), out_dir=tmp_path).fit()
    ckpt = find_checkpoint(tmp_path)
    assert ckpt == tmp_path / "checkpoint"
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert state["global_step"] == 3  # the first checkpoint, whole
    assert json.loads((ckpt / "metrics.json").read_text())["global_step"] == 3
    assert load_file(ckpt / "model.safetensors").keys() == _model().state_dict().keys()
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]
    # A crash between atomic_dir's two renames parks the old checkpoint; it is still found.
    (tmp_path / "checkpoint").rename(tmp_path / ".checkpoint.old-123")
    assert find_checkpoint(tmp_path) == tmp_path / ".checkpoint.old-123"


def test_schedule_warms_up_then_decays(tmp_path):
    values = [cosine_with_warmup(s, 4, 20) for s in range(20)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(x >= y for x, y in itertools.pairwise(values[4:])) and values[-1] < 0.01
    assert cosine_with_warmup(20, 4, 20, min_ratio=0.1) == pytest.approx(0.1)
    trainer = Trainer(_model(), _dataset(), _config(epochs=2, warmup_steps=3, checkpoint_every=0))
    trainer.fit()
    lrs = [s["lr"] for s in trainer.step_log]
    peak = lrs.index(max(lrs))
    assert peak == 2 and max(lrs) == pytest.approx(3e-3) and lrs[0] == pytest.approx(1e-3)
    assert all(x < y for x, y in itertools.pairwise(lrs[: peak + 1]))
    assert all(x > y for x, y in itertools.pairwise(lrs[peak:]))


def test_max_steps_resume_guard_and_logit_clamp(tmp_path):
    model = _model()
    with torch.no_grad():
        model.logit_scales["ehr_text"].fill_(10.0)
    trainer = Trainer(model, _dataset(), _config(max_steps=2), out_dir=tmp_path)
    assert trainer.total_steps == 2
    trainer.fit()
    assert trainer.global_step == 2 and trainer.history == []  # stopped mid-epoch
    assert model.logit_scales["ehr_text"].item() <= math.log(100) + 1e-6
    before = {k: v.clone() for k, v in model.state_dict().items()}
    again = Trainer(model, _dataset(), _config(max_steps=2), out_dir=tmp_path)
    again.fit()  # already finished: nothing to do
    assert again.global_step == 2 and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="batch_size"):
        Trainer(_model(), _dataset(), _config(max_steps=2, batch_size=4), out_dir=tmp_path).fit()
    with pytest.raises(ValueError, match="fewer than one global batch"):
        Trainer(_model(), _dataset(5), _config())
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(amp="fp16")


def test_config_round_trip(tmp_path):
    cfg = _config(betas=(0.8, 0.95), max_grad_norm=None)
    d = to_dict(cfg)
    assert d["betas"] == [0.8, 0.95]
    assert from_dict(TrainConfig, d) == cfg
    save_config(tmp_path / "c.json", cfg)
    assert load_config(tmp_path / "c.json", TrainConfig) == cfg
    with pytest.warns(UserWarning, match="unknown config keys"):
        from_dict(TrainConfig, {**d, "colour": "red"})
    with pytest.raises(ValueError, match="colour"):
        from_dict(TrainConfig, {**d, "colour": "red"}, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert from_dict(TrainConfig, {"epochs": 4}).epochs == 4  # missing keys take defaults


def _load_script():
    spec = importlib.util.spec_from_file_location("_ddp_train_script", HERE / "_ddp_train_script.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_torchrun_two_gloo_processes_match_one_process(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        str(HERE / "_ddp_train_script.py"),
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ddp = json.loads((out / "result.json").read_text())
    assert ddp["world_size"] == 2
    script = _load_script()
    single = script.run(tmp_path / "single", script.PER_RANK_BATCH * 2)
    assert len(ddp["step_losses"]) == len(single["step_losses"]) == 8
    for a, b in zip(ddp["step_losses"], single["step_losses"], strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    for a, b in zip(ddp["history"], single["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
    w_ddp = load_file(out / "checkpoint" / "model.safetensors")
    w_one = load_file(tmp_path / "single" / "checkpoint" / "model.safetensors")
    for k in w_one:
        torch.testing.assert_close(w_ddp[k], w_one[k], atol=1e-5, rtol=1e-5)
    assert json.loads((out / "checkpoint" / "metrics.json").read_text())["global_step"] == 8
