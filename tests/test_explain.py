"""TabNet masks, SHAP wrappers (additivity, attribution for categorical columns) and comparison statistics."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch
from pytorch_tabnet.tab_network import EmbeddingGenerator
from pytorch_tabnet.utils import create_group_matrix
from torch import nn

from ehrclip_kit import explain
from ehrclip_kit.explain import (
    rank_agreement,
    rank_correlation_matrix,
    shap_values,
    stability_across_seeds,
    tabnet_masks,
    truth_agreement,
    truth_weights_from_outcome,
)

torch.set_num_threads(1)
COLUMNS = ["age", "ward", "hr", "creat", "noise"]  # "ward" (column 1) is categorical with 4 codes


class Toy(nn.Module):
    """pytorch-tabnet's EmbeddingGenerator for a categorical column + an MLP -> one logit."""

    def __init__(self, linear: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.embedder = EmbeddingGenerator(5, [4], [1], [3], create_group_matrix([], 5))
        with torch.no_grad():  # ward 2 and 3 push the logit hard: the categorical column matters most
            self.embedder.embeddings[0].weight.copy_(
                torch.tensor([[0, 0, 0], [1.0, 0, 0], [-3, 0, 0], [0, 4.0, 0]])
            )
        hidden = nn.Identity() if linear else nn.Tanh()
        self.mlp = nn.Sequential(nn.Linear(7, 16), hidden, nn.Linear(16, 1))
        with torch.no_grad():
            self.mlp[0].weight[:, 6].zero_()  # "noise" has no effect at all

    def forward(self, x):
        return self.mlp(self.embedder(x)).squeeze(-1)


def _data(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    x[:, 1] = rng.integers(0, 4, n)
    return x


def _exact_shapley(f, x: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Interventional Shapley values by enumerating every coalition (background rows equally weighted)."""
    m = len(x)

    def v(subset):
        rows = background.copy()
        rows[:, list(subset)] = x[list(subset)]
        return f(rows).mean()

    phi = np.zeros(m)
    for i in range(m):
        others = [j for j in range(m) if j != i]
        for size in range(m):
            for s in itertools.combinations(others, size):
                w = math.factorial(size) * math.factorial(m - size - 1) / math.factorial(m)
                phi[i] += w * (v(s + (i,)) - v(s))
    return phi


def test_kernel_shap_is_exact_additive_and_credits_the_categorical_column():
    model = Toy().eval()
    bg, x = _data(8, 1), _data(6, 2)
    res = shap_values(model, bg, x, columns=COLUMNS, cat_idxs=[1], method="kernel", n_background=8)
    scale = np.abs(res.output).max()
    assert res.additivity_error <= 1e-4 * max(scale, 1.0)  # stated tolerance for exact methods
    f = explain._predict_fn(model)
    exact = _exact_shapley(f, x[0], bg)  # 5 columns: the kernel enumerates all 32 coalitions
    np.testing.assert_allclose(res.values.iloc[0].to_numpy(), exact, atol=1e-4)
    imp = res.global_importance()
    assert imp.idxmax() == "ward" and imp["ward"] > 0.1
    assert imp["noise"] < 1e-4  # a column the model ignores gets nothing
    assert list(res.values.columns) == COLUMNS and not model.training


def test_gradient_in_embedded_space_credits_categorical_unlike_plain_gradient_explainer():
    import shap

    model = Toy().eval()
    bg, x = _data(40, 3), _data(10, 4)
    res = shap_values(
        model, bg, x, columns=COLUMNS, cat_idxs=[1], method="gradient_embedded", n_background=10
    )
    assert res.additivity_error <= 1e-4 * max(
        np.abs(res.output).max(), 1.0
    )  # smooth model: quadrature converges
    assert res.global_importance()["ward"] > 0.1
    assert not model.embedder._forward_hooks  # the swap hook is removed afterwards
    # the trap this method avoids: gradients through an embedding lookup are zero for the categorical column
    plain = shap.GradientExplainer(explain._Logit(model), torch.as_tensor(bg[:10]))
    raw = np.asarray(plain.shap_values(torch.as_tensor(x), nsamples=50, rseed=0)).reshape(len(x), -1)
    assert np.abs(raw[:, 1]).max() == 0.0 and np.abs(raw[:, 0]).max() > 0


def test_gradient_and_kernel_agree_on_a_model_linear_in_the_embedded_space():
    # for f linear in the embedded inputs, expected gradients and interventional Shapley values coincide
    model = Toy(linear=True).eval()
    bg, x = _data(10, 5), _data(5, 6)
    kern = shap_values(model, bg, x, columns=COLUMNS, cat_idxs=[1], method="kernel", n_background=10)
    grad = shap_values(
        model, bg, x, columns=COLUMNS, cat_idxs=[1], method="gradient_embedded", n_background=10
    )
    np.testing.assert_allclose(grad.values.to_numpy(), kern.values.to_numpy(), atol=1e-4)
    assert grad.base_value == pytest.approx(kern.base_value, abs=1e-5)


@pytest.mark.slow  # shap's masker JIT-compiles numba code on first use (~20-30 s here)
def test_permutation_is_additive_and_numpy_functions_work():
    model = Toy().eval()
    f = explain._predict_fn(model)  # a plain numpy function, e.g. a boosted-tree margin
    bg, x = _data(30, 7), _data(3, 8)
    res = shap_values(f, bg, x, columns=COLUMNS, method="permutation", n_background=5, nsamples=4)
    assert res.additivity_error <= 1e-4 * max(np.abs(res.output).max(), 1.0)
    assert res.global_importance()["ward"] > 0
    with pytest.raises(TypeError, match="torch module"):
        shap_values(f, bg, x, method="gradient_embedded")
    with pytest.raises(ValueError, match="method must be"):
        shap_values(f, bg, x, method="deep")
    with pytest.raises(ValueError, match="disagree"):
        shap_values(model, bg, x, cat_idxs=[0], method="gradient_embedded")


def _tabnet():
    from ehrclip_kit.encoders.tabular import TabNetEhrEncoder
    from ehrclip_kit.finetune import EhrClassifier

    torch.manual_seed(0)
    enc = TabNetEhrEncoder(6, cat_idxs=[0, 1], cat_dims=[4, 3], cat_emb_dim=[3, 2], n_d=8, n_a=8, n_steps=3,
                           virtual_batch_size=32)  # fmt: skip
    return enc, EhrClassifier(enc, head_hidden=16).eval()


def _tab_data(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    x[:, 0], x[:, 1] = rng.integers(0, 4, n), rng.integers(0, 3, n)
    return x


def test_tabnet_masks_sum_to_one_and_cover_categorical_columns():
    enc, _ = _tabnet()
    x = _tab_data(50, 0)
    cols = ["ward", "sex", "a", "b", "c", "d"]
    imp, rows, steps = tabnet_masks(enc, x, columns=cols, batch_size=16, return_steps=True)
    assert imp.sum() == pytest.approx(1.0) and list(imp.index) == cols
    np.testing.assert_allclose(rows.sum(axis=1), 1.0, atol=1e-9)
    assert imp["ward"] > 0 and imp["sex"] > 0
    # categorical share = sum over its embedding dimensions (3 for ward, 2 for sex) of M_explain
    with torch.no_grad():
        m_explain, _ = enc.forward_masks(torch.as_tensor(x))
    m = m_explain.double().numpy()
    assert m.shape[1] == 4 + 3 + 2  # embedded width: 4 numeric + 3 + 2
    np.testing.assert_allclose(imp["ward"], m[:, 0:3].sum() / m.sum(), rtol=1e-6)
    np.testing.assert_allclose(imp["sex"], m[:, 3:5].sum() / m.sum(), rtol=1e-6)
    assert len(steps) == 3 and steps[0].shape == (50, 6)
    np.testing.assert_allclose(steps[0].sum(axis=1), 1.0, atol=1e-5)  # attention masks are distributions


def test_shap_on_tabnet_classifier(tmp_path, monkeypatch):
    _, clf = _tabnet()
    bg, x = _tab_data(60, 1), _tab_data(4, 2)
    res = shap_values(clf, bg, x, cat_idxs=[0, 1], method="kernel", n_background=10, cache_dir=tmp_path)
    assert res.additivity_error <= 1e-4 * max(np.abs(res.output).max(), 1.0)
    assert (res.global_importance()[["x0", "x1"]] > 0).all()
    # cached: the second call does not recompute
    calls = []
    monkeypatch.setattr(explain, "_shap", lambda *a, **k: calls.append(1))
    again = shap_values(clf, bg, x, cat_idxs=[0, 1], method="kernel", n_background=10, cache_dir=tmp_path)
    assert not calls
    pd.testing.assert_frame_equal(again.values, res.values)
    assert again.additivity_error == res.additivity_error and again.method == "kernel"


def test_gradient_on_tabnet_reports_its_additivity_error_honestly():
    _, clf = _tabnet()
    bg, x = _tab_data(40, 3), _tab_data(4, 4)
    with pytest.warns(UserWarning, match="additivity error"):
        res = shap_values(clf, bg, x, cat_idxs=[0, 1], method="gradient_embedded", n_background=4,
                          n_steps=8, max_steps=8, rel_tol=1e-6)  # fmt: skip
    recomputed = np.abs(res.values.sum(axis=1).to_numpy() + res.base_value - res.output).max()
    assert res.additivity_error == pytest.approx(recomputed) and res.details["n_steps"] == 8
    assert (res.global_importance()[["x0", "x1"]] > 0).all()


def test_rank_agreement_on_known_orders():
    a = pd.Series([4.0, 3.0, 2.0, 1.0], index=list("abcd"))
    assert rank_agreement(a, a * 7) == {"spearman": 1.0, "kendall": 1.0, "n": 4}
    rev = rank_agreement(a, pd.Series([1.0, 2.0, 3.0, 4.0], index=list("abcd")))
    assert rev["spearman"] == pytest.approx(-1) and rev["kendall"] == pytest.approx(-1)
    swap = rank_agreement(a, pd.Series([3.0, 4.0, 2.0, 1.0], index=list("abcd")))  # one adjacent swap
    assert swap["spearman"] == pytest.approx(0.8) and swap["kendall"] == pytest.approx(4 / 6)
    shuffled = pd.Series([1.0, 4.0, 3.0, 2.0], index=list("dabc"))  # alignment is by feature name
    assert rank_agreement(a, shuffled)["spearman"] == pytest.approx(1.0)
    mat = rank_correlation_matrix({"x": a, "y": a[::-1] * 2, "z": -a})
    assert mat.loc["x", "y"] == pytest.approx(1) and mat.loc["x", "z"] == pytest.approx(-1)
    with pytest.raises(ValueError, match="at least 2"):
        rank_agreement(a, pd.Series([1.0], index=["zz"]))


def test_stability_and_truth_agreement():
    base = pd.Series([0.5, 0.3, 0.15, 0.05], index=list("abcd"))
    runs = [base, base * 1.1, pd.Series([0.5, 0.1, 0.3, 0.1], index=list("abcd"))]
    table = stability_across_seeds(runs, top_k=1)
    assert table.index[0] == "a" and table.loc["a", "rank_std"] == 0 and table.loc["a", "top_k_frac"] == 1
    assert table.loc["b", "rank_std"] > 0 and table.loc["a", "mean"] == pytest.approx(
        np.mean([0.5, 0.55, 0.5])
    )
    assert 0 < table.attrs["mean_pairwise_spearman"] < 1
    truth = pd.Series({"a": 2.0, "b": -1.5, "c": 0.0, "d": 0.1})
    good = truth_agreement(pd.Series({"a": 0.6, "b": 0.3, "c": 0.0, "d": 0.1}), truth, top_k=2)
    assert good["spearman"] == pytest.approx(1) and good["top_k_precision"] == 1
    bad = truth_agreement(pd.Series({"a": 0.0, "b": 0.1, "c": 0.6, "d": 0.3}), truth, top_k=2)
    assert bad["spearman"] < 0 and bad["top_k_precision"] == 0


def test_truth_weights_from_outcome():
    rng = np.random.default_rng(0)
    n = 500
    latent = rng.normal(size=n)
    ward = rng.integers(0, 3, n)
    p = 1 / (1 + np.exp(-(latent + 1.5 * (ward == 2))))
    feats = pd.DataFrame(
        {"proxy": latent + 0.3 * rng.normal(size=n), "noise": rng.normal(size=n), "ward": ward}
    )
    w = truth_weights_from_outcome(feats, p, categorical=["ward"])
    assert w["proxy"] > 0.6 and w["ward"] > 0.3 and w["noise"] < 0.15
