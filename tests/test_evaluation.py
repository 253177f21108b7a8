"""Metrics with bootstrap CIs, calibration, seed summaries, label subsampling and the baselines."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from ehrclip_kit.baselines import LogisticConfig, XGBoostConfig, train_baseline, train_logistic, train_xgboost
from ehrclip_kit.evaluation import (
    _weighted_curves,
    binary_metrics,
    calibration_curve,
    cis_overlap,
    mean_ci,
    subsample_labels,
)


def _scores(n, seed=0, signal=1.0, ties=False):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    p = 1 / (1 + np.exp(-(signal * (2 * y - 1) + rng.standard_normal(n))))
    return y, (np.round(p, 1) if ties else p)


@pytest.mark.parametrize("ties", [False, True])
def test_point_estimates_equal_sklearn(ties):
    y, p = _scores(500, ties=ties)
    m = binary_metrics(y, p, n_boot=0)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert m["auprc"] == pytest.approx(average_precision_score(y, p), abs=1e-12)
    assert m["brier"] == pytest.approx(brier_score_loss(y, p), abs=1e-12)
    assert m["n"] == 500 and m["n_pos"] == y.sum() and m["prevalence"] == pytest.approx(y.mean())


def test_vectorised_bootstrap_replicates_equal_sklearn_on_resampled_data():
    # Each replicate is a vector of resampling counts; it must score exactly like the expanded sample.
    y, p = _scores(60, seed=1, ties=True)
    rng = np.random.default_rng(2)
    w = rng.multinomial(60, np.full(60, 1 / 60), size=5)
    w[:, np.flatnonzero(y)[:2]] += 1  # keep both classes present in every replicate
    auroc, auprc = _weighted_curves(y.astype(float), p, w)
    for b in range(5):
        yy, pp = np.repeat(y, w[b]), np.repeat(p, w[b])
        assert auroc[b] == pytest.approx(roc_auc_score(yy, pp), abs=1e-12)
        assert auprc[b] == pytest.approx(average_precision_score(yy, pp), abs=1e-12)


def test_bootstrap_ci_contains_estimate_narrows_with_n_and_is_seeded():
    small = binary_metrics(*_scores(150, seed=3), n_boot=400, seed=0)
    large = binary_metrics(*_scores(3000, seed=3), n_boot=400, seed=0)
    for m in (small, large):
        for k in ("auroc", "auprc", "brier"):
            assert m[f"{k}_lo"] <= m[k] <= m[f"{k}_hi"], (k, m)
    for k in ("auroc", "auprc", "brier"):
        assert large[f"{k}_hi"] - large[f"{k}_lo"] < 0.5 * (small[f"{k}_hi"] - small[f"{k}_lo"]), k
    again = binary_metrics(*_scores(150, seed=3), n_boot=400, seed=0)
    other = binary_metrics(*_scores(150, seed=3), n_boot=400, seed=1)
    assert again == small and other != small
    # The CI has roughly nominal width: compare with the DeLong-free normal approximation of Hanley & McNeil.
    y, p = _scores(3000, seed=3)
    a, n1, n0 = large["auroc"], y.sum(), (1 - y).sum()
    q1, q2 = a / (2 - a), 2 * a**2 / (1 + a)
    se = np.sqrt((a * (1 - a) + (n1 - 1) * (q1 - a**2) + (n0 - 1) * (q2 - a**2)) / (n1 * n0))
    assert (large["auroc_hi"] - large["auroc_lo"]) == pytest.approx(2 * 1.96 * se, rel=0.25)


def test_binary_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match="both classes"):
        binary_metrics([1, 1, 1], [0.2, 0.4, 0.5])
    with pytest.raises(ValueError, match="length"):
        binary_metrics([0, 1], [0.2])
    with pytest.raises(ValueError, match="NaN"):
        binary_metrics([0, 1], [0.2, np.nan])


def test_calibration_curve_quantile_bins():
    rng = np.random.default_rng(0)
    p = rng.random(5000)
    y = (rng.random(5000) < p).astype(int)  # perfectly calibrated
    cal = calibration_curve(y, p, n_bins=10, seed=0)
    assert len(cal) == 10 and cal["count"].sum() == 5000
    assert cal["count"].min() >= 495 and cal["count"].max() <= 505  # quantile bins: equal counts
    assert (cal["p_lo"] <= cal["mean_pred"]).all() and (cal["mean_pred"] <= cal["p_hi"]).all()
    assert (cal["observed_lo"] <= cal["observed"]).all() and (cal["observed"] <= cal["observed_hi"]).all()
    inside = (cal["observed_lo"] <= cal["mean_pred"]) & (cal["mean_pred"] <= cal["observed_hi"])
    assert inside.sum() >= 8  # calibrated predictions fall inside ~95 % of the bins' CIs
    np.testing.assert_allclose(
        cal["observed"],
        [y[(p >= lo) & (p <= hi)].mean() for lo, hi in zip(cal["p_lo"], cal["p_hi"], strict=True)],
    )
    # A model that doubles every risk is visibly off.
    off = calibration_curve(y, p / 2, n_bins=5, n_boot=200)
    assert (off["observed_lo"] > off["mean_pred"]).sum() >= 4
    # Heavily tied predictions merge bins rather than produce empty ones.
    tied = calibration_curve(y, np.round(p, 1), n_bins=20, n_boot=10)
    assert (tied["count"] > 0).all() and tied["count"].sum() == 5000


def test_mean_ci_matches_t_interval_and_overlap():
    v = [0.71, 0.74, 0.69, 0.73, 0.72]
    m, lo, hi = mean_ci(v)
    ref = stats.t.interval(0.95, df=4, loc=np.mean(v), scale=stats.sem(v))
    assert m == pytest.approx(np.mean(v)) and (lo, hi) == pytest.approx(ref)
    assert np.isnan(mean_ci([0.7])[1]) and mean_ci([0.7, np.nan, 0.8])[0] == pytest.approx(0.75)
    assert cis_overlap((0.1, 0.3), (0.25, 0.4)) and cis_overlap((0.1, 0.3), (0.3, 0.4))
    assert not cis_overlap((0.1, 0.2), (0.21, 0.4)) and not cis_overlap((0.5, 0.6), (0.1, 0.2))


def test_subsample_labels_is_stratified_deterministic_and_nested():
    frame = pd.DataFrame({"label": [0] * 900 + [1] * 100, "x": np.arange(1000)})
    a = subsample_labels(frame, 0.1, seed=7)
    assert a["label"].value_counts().to_dict() == {0: 90, 1: 10}
    assert a.equals(subsample_labels(frame, 0.1, seed=7))
    assert not a["x"].equals(subsample_labels(frame, 0.1, seed=8)["x"])
    assert set(subsample_labels(frame, 0.05, seed=7)["x"]) <= set(a["x"])  # nested across fractions
    assert a["x"].is_monotonic_increasing  # original order kept
    tiny = subsample_labels(frame, 0.001, seed=0)
    assert tiny["label"].value_counts().to_dict() == {0: 1, 1: 1}  # at least one per class
    assert len(subsample_labels(frame, 1.0, seed=0)) == 1000
    with pytest.raises(ValueError, match="fraction"):
        subsample_labels(frame, 0.0, seed=0)
    # The positive rows picked do not depend on how many negatives there are.
    fewer_neg = frame.iloc[500:]
    assert set(subsample_labels(fewer_neg, 0.1, 7).query("label == 1")["x"]) == set(
        a.query("label == 1")["x"]
    )


# -------------------------------------------------------------------------------------------------- baselines
def test_baselines_beat_chance_and_honour_label_fraction(splits):
    train, val, test, spec = splits["train"], splits["val"], splits["test"], splits["spec"]
    xgb = train_xgboost(train, val, spec, XGBoostConfig(n_estimators=300, early_stopping_rounds=20))
    lr = train_logistic(train, val, spec, LogisticConfig())
    for model in (xgb, lr):
        p = model.predict_proba(test)
        assert p.shape == (len(test),) and ((p >= 0) & (p <= 1)).all()
        assert roc_auc_score(test["label"], p) > 0.7
        assert model.n_train == len(train)
    assert xgb.best_iteration < 299  # early stopping on validation did stop it
    small = train_baseline("xgboost", train, val, spec, label_fraction=0.2, seed=3, n_estimators=50)
    assert small.n_train == len(subsample_labels(train, 0.2, seed=3))
    same = train_baseline("xgboost", train, val, spec, label_fraction=0.2, seed=3, n_estimators=50)
    np.testing.assert_array_equal(small.predict_proba(test), same.predict_proba(test))
    assert train_baseline("logistic", train, val, spec, label_fraction=0.2, seed=3).n_train == small.n_train


def test_baselines_fit_on_train_only_and_handle_unseen_codes(splits):
    train, val, test, spec = splits["train"], splits["val"], splits["test"], splits["spec"]
    lr = train_logistic(train, None, spec)
    wrecked = test.copy()
    wrecked["unit"] = 5  # a code never seen in train
    wrecked.loc[wrecked.index[:5], "lab_a"] = np.nan
    assert np.isfinite(lr.predict_proba(wrecked)).all()
    xgb = train_xgboost(train, val, spec, XGBoostConfig(n_estimators=30))
    assert np.isfinite(xgb.predict_proba(wrecked)).all()
    with pytest.raises(ValueError, match="other splits"):
        train_logistic(pd.concat([train, test]), None, spec)
    with pytest.raises(KeyError, match="lab_c"):
        lr.predict_proba(test.drop(columns=["lab_c"]))
    with pytest.raises(KeyError, match="unknown baseline"):
        train_baseline("forest", train, val, spec)
