from __future__ import annotations

import numpy as np
import pytest
import torch

from ehrclip_kit.ood import KNNDetector, MahalanobisDetector, add_noise, ood_auroc, reverse_time, swap_leads

torch.set_num_threads(1)

D = 16


def _cov(rng):
    a = rng.normal(size=(D, D))
    return a @ a.T / D + 0.1 * np.eye(D)


@pytest.fixture(scope="module")
def gaussians():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=D)
    cov = _cov(rng)
    draw = lambda n, shift=0.0: rng.multivariate_normal(mean + shift, cov, size=n)  # noqa: E731
    shift = np.zeros(D)
    shift[:4] = 3.0  # a shift along a few axes, the way a new site moves a few features
    return {"train": draw(1000), "in": draw(500), "same": draw(500), "out": draw(500, shift)}


@pytest.mark.parametrize(
    "make", [lambda: MahalanobisDetector(), lambda: KNNDetector(k=10)], ids=["maha", "knn"]
)
def test_detectors_separate_shifted_data_and_not_same_distribution(gaussians, make):
    det = make().fit(gaussians["train"])
    s_in, s_out, s_same = (
        det.score(gaussians["in"]),
        det.score(gaussians["out"]),
        det.score(gaussians["same"]),
    )
    assert s_in.shape == (500,)
    assert ood_auroc(s_in, s_out) > 0.9
    assert 0.42 < ood_auroc(s_in, s_same) < 0.58


def test_mahalanobis_uses_covariance_not_just_distance():
    # Train spread 10x wider on axis 0 than axis 1: a point 3 units out on axis 1 is far more unusual than
    # one 3 units out on axis 0, which plain Euclidean distance cannot tell apart.
    rng = np.random.default_rng(1)
    train = rng.normal(size=(2000, 2)) * np.array([10.0, 1.0])
    det = MahalanobisDetector().fit(train)
    s = det.score(np.array([[3.0, 0.0], [0.0, 3.0]]))
    assert s[1] > 10 * s[0]
    assert 0 <= det.shrinkage_ <= 1


def test_per_class_mahalanobis_scores_distance_to_nearest_class():
    rng = np.random.default_rng(2)
    a, b = rng.normal(-4, 1, (300, D)), rng.normal(4, 1, (300, D))
    train, y = np.concatenate([a, b]), np.r_[np.zeros(300), np.ones(300)]
    per_class = MahalanobisDetector().fit(train, y)
    agnostic = MahalanobisDetector().fit(train)
    in_ = np.concatenate([rng.normal(-4, 1, (100, D)), rng.normal(4, 1, (100, D))])
    between = rng.normal(0, 1, (200, D))  # between the two clusters: OOD, yet near the global mean
    assert ood_auroc(per_class.score(in_), per_class.score(between)) > 0.95
    assert ood_auroc(agnostic.score(in_), agnostic.score(between)) < 0.5  # the class-agnostic one is fooled


def test_mahalanobis_survives_more_dims_than_samples_with_shrinkage():
    rng = np.random.default_rng(3)
    det = MahalanobisDetector().fit(rng.normal(size=(20, 64)))
    s = det.score(rng.normal(size=(5, 64)))
    assert np.isfinite(s).all() and det.shrinkage_ > 0
    fixed = MahalanobisDetector(shrinkage=0.5).fit(rng.normal(size=(20, 64)))
    assert fixed.shrinkage_ == 0.5 and np.isfinite(fixed.score(rng.normal(size=(5, 64)))).all()


def test_knn_score_is_cosine_distance_to_kth_neighbour():
    train = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    det = KNNDetector(k=2).fit(train)
    # query along (1,1): neighbours (1,0) and (0,1) both at cosine 1/sqrt(2)
    np.testing.assert_allclose(det.score([[1.0, 1.0]]), [1 - 1 / np.sqrt(2)], rtol=1e-5)
    assert KNNDetector(k=1).fit(train).score([[1.0, 0.0]])[0] == pytest.approx(0.0, abs=1e-6)


def test_detector_errors():
    with pytest.raises(RuntimeError, match="before fit"):
        MahalanobisDetector().score(np.ones((1, 2)))
    with pytest.raises(ValueError, match="k=10"):
        KNNDetector(k=10).fit(np.ones((3, 2)))
    with pytest.raises(ValueError, match="shrinkage"):
        MahalanobisDetector(shrinkage="oas")
    with pytest.raises(ValueError, match="labels"):
        MahalanobisDetector().fit(np.ones((3, 2)), labels=[0, 1])


def test_ood_auroc_orientation():
    assert ood_auroc([0, 1, 2], [3, 4]) == 1.0
    assert ood_auroc([3, 4], [0, 1]) == 0.0


# ---------------------------------------------------------------- shift generators


def _ecg(rng, T=2000):
    t = np.arange(T) / 100
    return np.stack([np.sin(2 * np.pi * 1.2 * t + k) * (1 + k / 6) + 0.5 for k in range(12)]).astype(
        np.float32
    )


@pytest.mark.parametrize("snr_db", [0.0, 10.0, 20.0])
def test_add_noise_reaches_the_requested_snr_per_lead(snr_db):
    rng = np.random.default_rng(4)
    x = _ecg(rng)
    y = add_noise(x, snr_db, np.random.default_rng(5))
    assert y.shape == x.shape and y.dtype == np.float32
    snr = 10 * np.log10(x.var(axis=1) / (y - x).var(axis=1))
    np.testing.assert_allclose(snr, snr_db, atol=0.4)
    np.testing.assert_array_equal(add_noise(x, snr_db, np.random.default_rng(5)), y)  # seeded
    assert not np.array_equal(add_noise(x, snr_db, np.random.default_rng(6)), y)


def test_add_noise_leaves_flat_lead_flat_and_input_untouched():
    x = _ecg(np.random.default_rng(0))
    x[3] = 0.25
    before = x.copy()
    y = add_noise(x, 5.0, np.random.default_rng(0))
    np.testing.assert_array_equal(y[3], x[3])
    np.testing.assert_array_equal(x, before)


def test_swap_leads_and_reverse_time():
    x = _ecg(np.random.default_rng(0), T=50)
    s = swap_leads(x, 1, 4)
    np.testing.assert_array_equal(s[1], x[4])
    np.testing.assert_array_equal(s[4], x[1])
    np.testing.assert_array_equal(np.delete(s, [1, 4], 0), np.delete(x, [1, 4], 0))
    assert not np.shares_memory(s, x)
    r = reverse_time(x)
    np.testing.assert_array_equal(r[:, 0], x[:, -1])
    np.testing.assert_array_equal(reverse_time(r), x)
    batch = np.stack([x, 2 * x])  # [B, 12, T] works too
    np.testing.assert_array_equal(swap_leads(batch, 0, 11)[1, 0], 2 * x[11])
    with pytest.raises(ValueError, match="out of range"):
        swap_leads(x, 0, 12)
    with pytest.raises(ValueError, match="leads, time"):
        reverse_time(np.ones(10))
