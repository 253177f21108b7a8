"""The general contrastive model: wiring, head chaining (FAC), temperatures, weights, retrieval metrics."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ehrclip_kit.encoders.projection import ProjectionHead
from ehrclip_kit.losses import SigLipLoss
from ehrclip_kit.models import (
    ContrastiveModel,
    HeadSpec,
    SpaceSpec,
    ehr_text_model,
    encoder_state,
    fac_model,
    head_state,
    local_losses,
)
from ehrclip_kit.retrieval_metrics import ContrastiveEvaluator, retrieval_metrics
from ehrclip_kit.training import TrainConfig, Trainer, save_weights

torch.set_num_threads(1)


def _mlp(d_in, d_out):
    return nn.Sequential(nn.Linear(d_in, 16), nn.ReLU(), nn.Linear(16, d_out))


class Counting(nn.Module):
    """Identity that counts its calls (to check that embed computes only what is needed)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x


def test_projection_head_is_normalised_and_configurable():
    x = torch.randn(5, 12)
    z = ProjectionHead(12, 7)(x)
    assert z.shape == (5, 7)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(5))
    linear = ProjectionHead(12, 7, hidden=0)
    assert isinstance(linear.net, nn.Linear)
    assert isinstance(ProjectionHead(12, 7, hidden=32).net[0], nn.Linear)
    assert ProjectionHead(12, 7, hidden=32).net[0].out_features == 32
    with pytest.raises(ValueError, match="size 12"):
        linear(torch.randn(2, 5))


def test_gradients_reach_both_towers_and_every_weight():
    torch.manual_seed(0)
    model = ehr_text_model(_mlp(8, 10), d_ehr=10, d_text=6, text_encoder=_mlp(4, 6), proj_dim=5)
    out = model({"ehr": torch.randn(9, 8), "text": torch.randn(9, 4)})
    assert set(out) == {"loss", "ehr_text/contrastive_loss", "ehr_text/logit_scale"}
    out["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_logit_scale_init_and_clamp():
    model = ehr_text_model(nn.Linear(3, 4), d_ehr=4, d_text=4, proj_dim=2)
    scale = model.logit_scales["ehr_text"]
    assert float(scale.detach()) == pytest.approx(math.log(1 / 0.07))
    out = model({"ehr": torch.randn(4, 3), "text": torch.randn(4, 4)})
    assert float(out["ehr_text/logit_scale"]) == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        scale.fill_(7.0)
    model.clamp_logit_scales()
    assert float(scale.detach()) == pytest.approx(math.log(100))
    with torch.no_grad():
        scale.fill_(-1.0)
    model.clamp_logit_scales()
    assert float(scale.detach()) == 0.0


def test_siglip_space_gets_a_bias_and_its_own_initial_scale():
    model = ehr_text_model(nn.Linear(3, 4), d_ehr=4, d_text=4, proj_dim=2, loss="siglip")
    assert isinstance(model.losses["ehr_text"], SigLipLoss)
    assert model.logit_biases["ehr_text"].item() == -10.0
    assert model.logit_scales["ehr_text"].item() == pytest.approx(math.log(10))
    out = model({"ehr": torch.randn(4, 3), "text": torch.randn(4, 4)})
    out["loss"].backward()
    assert model.logit_biases["ehr_text"].grad is not None


def test_fac_heads_chain_and_embed_computes_only_what_is_needed():
    ecg, codes, text = Counting(), Counting(), Counting()
    model = fac_model(ecg, codes, text, d_ecg=6, d_codes=5, d_text=4, fine_dim=3, coarse_dim=2).eval()
    assert model._head_order.index("ecg_fine") < model._head_order.index("ecg_coarse")
    # Only the ECG is in the batch: asking for the coarse ECG embedding must not touch codes or text.
    emb = model.embed({"ecg": torch.randn(3, 6)}, names="ecg_coarse")
    assert set(emb) == {"ecg", "ecg_fine", "ecg_coarse"}
    assert (ecg.calls, codes.calls, text.calls) == (1, 0, 0)
    assert emb["ecg_coarse"].shape == (3, 2)
    torch.testing.assert_close(emb["ecg_coarse"], model.heads["ecg_coarse"](emb["ecg_fine"]))
    with pytest.raises(KeyError, match="batch has no entry 'codes'"):
        model.embed({"ecg": torch.randn(3, 6)}, names=["codes_fine"])
    with pytest.raises(KeyError, match="unknown embedding 'nope'"):
        model.embed({"ecg": torch.randn(3, 6)}, names=["nope"])
    out = model({"ecg": torch.randn(3, 6), "codes": torch.randn(3, 5), "text": torch.randn(3, 4)})
    assert set(out) == {
        "loss",
        "fine/contrastive_loss",
        "fine/logit_scale",
        "coarse/contrastive_loss",
        "coarse/logit_scale",
    }
    torch.testing.assert_close(out["loss"], out["fine/contrastive_loss"] + out["coarse/contrastive_loss"])


def test_cycles_unknown_sources_and_bad_spaces_are_clear_errors():
    lin = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="cycle: h1 -> h2 -> h1"):
        ContrastiveModel(
            {"x": lin},
            {"h1": HeadSpec("h2", nn.Identity()), "h2": HeadSpec("h1", nn.Identity())},
            [SpaceSpec("s", "x", "h1")],
        )
    with pytest.raises(ValueError, match="unknown source 'ekg'"):
        ContrastiveModel({"ecg": lin}, {"h": HeadSpec("ekg", nn.Identity())}, [SpaceSpec("s", "ecg", "h")])
    with pytest.raises(ValueError, match="unknown embedding 'text_proj'"):
        ContrastiveModel({"ecg": lin}, {}, [SpaceSpec("s", "ecg", "text_proj")])
    with pytest.raises(ValueError, match="unique"):
        ContrastiveModel({"a": lin, "b": lin}, {}, [SpaceSpec("s", "a", "b"), SpaceSpec("s", "b", "a")])
    with pytest.raises(ValueError, match="both as encoder and head"):
        ContrastiveModel({"a": lin}, {"a": HeadSpec("a", nn.Identity())}, [SpaceSpec("s", "a", "a")])


def test_weighted_spaces_sum():
    torch.manual_seed(0)
    model = fac_model(
        nn.Identity(), nn.Identity(), None, 6, 5, 4, fine_dim=3, coarse_dim=2, weights=(0.5, 2.0)
    )
    out = model({"ecg": torch.randn(5, 6), "codes": torch.randn(5, 5), "text": torch.randn(5, 4)})
    torch.testing.assert_close(
        out["loss"], 0.5 * out["fine/contrastive_loss"] + 2.0 * out["coarse/contrastive_loss"]
    )


def test_encoder_state_from_model_state_dict_and_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = ehr_text_model(_mlp(8, 10), d_ehr=10, d_text=6, proj_dim=5)
    x = torch.randn(4, 8)
    fresh = _mlp(8, 10)
    wrapped = {f"module.{k}": v for k, v in model.state_dict().items()}  # as saved from a DDP wrapper
    save_weights(model, tmp_path / "model.safetensors")
    for source in (model, wrapped, tmp_path, tmp_path / "model.safetensors"):
        fresh.load_state_dict(encoder_state(source, "ehr"))
        torch.testing.assert_close(fresh(x), model.encoders["ehr"](x))
    assert set(head_state(model, "ehr_proj")) == set(model.heads["ehr_proj"].state_dict())
    with pytest.raises(KeyError, match="'ehr'"):
        encoder_state(model, "ecg")


def test_retrieval_metrics_by_hand():
    # Unit vectors at 0, 10, 90 and 180 degrees; b swaps the two close ones: rows 0 and 1 rank their
    # partner second (miss at k=1, hit at k=2), rows 2 and 3 rank it first.
    angles = torch.deg2rad(torch.tensor([0.0, 10.0, 90.0, 180.0]))
    a = torch.stack([angles.cos(), angles.sin()], dim=1)
    b = a[[1, 0, 2, 3]]
    m = retrieval_metrics(a, b, ks=(1, 2), names=("ehr", "text"))
    assert m == {"ehr2text_R@1": 0.5, "ehr2text_R@2": 1.0, "text2ehr_R@1": 0.5, "text2ehr_R@2": 1.0}
    # A collapsed model retrieves nothing (ties count against the pair), not everything.
    same = torch.ones(5, 3)
    assert retrieval_metrics(same, same, ks=(1,))["a2b_R@1"] == 0.0
    # Chunking does not change the result.
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 8, generator=g), torch.randn(50, 8, generator=g)
    assert retrieval_metrics(x, y, chunk=7) == retrieval_metrics(x, y)
    with pytest.raises(ValueError, match="equal shape"):
        retrieval_metrics(x, y[:3])


def _latent_world(n=256, seed=0):
    """ECG, codes and text all noisy nonlinear views of one shared latent."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 4, generator=g)

    def view(d):
        w = torch.randn(4, d, generator=g)
        return torch.tanh(z @ w) + 0.1 * torch.randn(n, d, generator=g)

    ecg, codes, text = view(12), view(10), view(8)
    return [{"ecg": ecg[i], "codes": codes[i], "text": text[i]} for i in range(n)]


def test_fac_training_decreases_both_terms_and_evaluator_reports_retrieval():
    torch.manual_seed(0)
    data = _latent_world()
    model = fac_model(
        _mlp(12, 16), _mlp(10, 16), _mlp(8, 16), 16, 16, 16, fine_dim=8, coarse_dim=8, dropout=0.0
    )
    evaluator = ContrastiveEvaluator(data, batch_size=64)
    before = evaluator(model)
    cfg = TrainConfig(epochs=20, lr=3e-3, batch_size=32, warmup_steps=4, progress=False, seed=0)
    history = Trainer(model, data, cfg, dist=None, evaluate=evaluator).fit()
    after = history[-1]
    for space in ("fine", "coarse"):
        key = f"val/{space}/contrastive_loss"
        assert after[key] < 0.7 * before[key], (space, before[key], after[key])
    assert after["val/fine/ecg2codes_R@5"] > before["val/fine/ecg2codes_R@5"]
    assert after["val/coarse/text2ecg_R@5"] > before["val/coarse/text2ecg_R@5"]
    assert history[0]["train_loss"] > history[-1]["train_loss"]


def test_local_losses_context_restores_distributed_settings():
    model = ehr_text_model(nn.Linear(3, 4), d_ehr=4, d_text=4, proj_dim=2)
    model.configure_distributed(1, 4, local_loss=True)
    with local_losses(model):
        assert (model.losses["ehr_text"].rank, model.losses["ehr_text"].world_size) == (0, 1)
        model({"ehr": torch.randn(3, 3), "text": torch.randn(3, 4)})  # would hang if it gathered
    loss = model.losses["ehr_text"]
    assert (loss.rank, loss.world_size, loss.local_loss) == (1, 4, True)
