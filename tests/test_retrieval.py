from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from ehrclip_kit.retrieval import (
    build_index,
    precision_recall_at_k,
    prompts_for,
    search,
    text_to_ecg,
    zero_shot_auroc,
    zero_shot_scores,
)

torch.set_num_threads(1)


def _brute(db, q, k, cosine=True):
    if cosine:
        db = db / np.linalg.norm(db, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
    s = q @ db.T
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, ids, 1), ids


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(3000, 32)).astype(np.float32), rng.normal(size=(50, 32)).astype(np.float32)


def test_exact_blocked_search_matches_brute_force(data):
    db, q = data
    index = build_index(db, method="exact")
    s, ids = search(index, q, k=7, query_block=16, db_block=500)  # many tiles, uneven last tile
    bs, bids = _brute(db, q, 7)
    assert ids.dtype == np.int64 and s.dtype == np.float32 and ids.shape == (50, 7)
    np.testing.assert_array_equal(ids, bids)
    np.testing.assert_allclose(s, bs, atol=1e-5)


def test_exact_and_faiss_agree_on_small_data(data):
    db, q = data
    s_exact, i_exact = search(build_index(db, method="exact"), q, k=10)
    s_flat, i_flat = search(build_index(db, method="faiss-flat"), q, k=10)
    np.testing.assert_array_equal(i_exact, i_flat)
    np.testing.assert_allclose(s_exact, s_flat, atol=1e-5)
    # IVF probing every list is exhaustive, hence exact too.
    ivf = build_index(db, method="faiss-ivf", nlist=8, nprobe=8)
    s_ivf, i_ivf = search(ivf, q, k=10)
    np.testing.assert_array_equal(i_exact, i_ivf)


def test_inner_product_metric_differs_from_cosine():
    db = np.array([[1.0, 0.0], [10.0, 10.0]], dtype=np.float32)
    assert search(build_index(db, metric="cosine"), [[1.0, 0.1]], k=1)[1][0, 0] == 0
    assert search(build_index(db, metric="ip"), [[1.0, 0.1]], k=1)[1][0, 0] == 1
    for method in ("exact", "faiss-flat"):
        s, _ = search(build_index(db, metric="ip", method=method), [[1.0, 0.1]], k=2)
        np.testing.assert_allclose(s[0], [11.0, 1.0], rtol=1e-6)


def test_method_selection_by_size(data):
    db, _ = data
    assert build_index(db).method == "exact"
    assert build_index(db, exact_max=100).method == "faiss-flat"  # forced below the default of 1M rows
    assert build_index(db, method="faiss", ivf_min=1000).method == "faiss-ivf"
    idx = build_index(db, method="faiss-ivf")
    assert idx.faiss_index.nlist == round(np.sqrt(3000)) and idx.nprobe == idx.faiss_index.nprobe


def test_ivf_shortfall_is_marked_and_k_is_capped():
    rng = np.random.default_rng(1)
    db = np.concatenate([rng.normal(5, 0.1, (50, 4)), rng.normal(-5, 0.1, (50, 4))]).astype(np.float32)
    ivf = build_index(db, method="faiss-ivf", nlist=2, nprobe=1)
    s, ids = search(ivf, db[:1], k=80)  # one list holds ~50 rows: the rest are missing
    assert (ids[0] == -1).any() and np.isneginf(s[0][ids[0] == -1]).all()
    _, ids = search(build_index(db[:5]), db[:1], k=50)
    assert ids.shape == (1, 5)


def test_bad_inputs_are_named():
    db = np.ones((4, 3), dtype=np.float32)
    db[2, 1] = np.nan
    with pytest.raises(ValueError, match="row 2"):
        build_index(db)
    with pytest.raises(ValueError, match="dim"):
        search(build_index(np.ones((4, 3))), np.ones((1, 5)), k=1)
    with pytest.raises(ValueError, match="method"):
        build_index(np.ones((4, 3)), method="hnsw")


def test_torch_inputs_are_accepted():
    db = torch.randn(20, 8)
    s1, i1 = search(build_index(db), db[:3], k=1)
    assert i1[:, 0].tolist() == [0, 1, 2]
    np.testing.assert_allclose(s1[:, 0], 1.0, atol=1e-5)


# ---------------------------------------------------------------- metrics


def test_precision_recall_hand_made_bool_matrix():
    retrieved = np.array([[0, 1, 2], [3, 2, 1]])
    relevant = np.array([[1, 0, 1, 1, 0], [0, 0, 0, 0, 1]], dtype=bool)
    r = precision_recall_at_k(retrieved, relevant, ks=(1, 3)).set_index("k")
    # query 0: hits [1,0,1] of 3 relevant; query 1: no hit of 1 relevant
    assert r.loc[1, "precision"] == pytest.approx((1 + 0) / 2)
    assert r.loc[3, "precision"] == pytest.approx((2 / 3 + 0) / 2)
    assert r.loc[1, "recall"] == pytest.approx((1 / 3 + 0) / 2)
    assert r.loc[3, "recall"] == pytest.approx((2 / 3 + 0) / 2)


def test_precision_recall_with_label_arrays():
    db_labels = np.array(["af", "af", "normal", "lbbb", "af"])
    retrieved = np.array([[0, 2, 4], [2, -1, 3]])  # -1 (IVF shortfall) never counts as a hit
    r = precision_recall_at_k(retrieved, (np.array(["af", "lbbb"]), db_labels), ks=(2, 3)).set_index("k")
    assert r.loc[2, "precision"] == pytest.approx((1 / 2 + 0) / 2)
    assert r.loc[3, "recall"] == pytest.approx((2 / 3 + 1 / 1) / 2)
    # multi-hot: query 0 wants class 0, query 1 class 1; row 3 has both
    db_hot = np.array([[1, 0], [0, 0], [0, 1], [1, 1]])
    q_hot = np.array([[1, 0], [0, 1]])
    r = precision_recall_at_k(np.array([[3, 1], [1, 0]]), (q_hot, db_hot), ks=(2,))
    assert r.loc[0, "precision"] == pytest.approx((1 / 2 + 0) / 2)
    assert r.loc[0, "recall"] == pytest.approx((1 / 2 + 0 / 2) / 2)


def test_queries_without_relevant_items_are_left_out_of_recall():
    r = precision_recall_at_k([[0], [1]], np.array([[1, 0], [0, 0]], dtype=bool), ks=(1,))
    assert r.loc[0, "recall"] == 1.0 and r.loc[0, "n_queries_recall"] == 1 and r.loc[0, "precision"] == 0.5
    with pytest.raises(ValueError, match="k=5"):
        precision_recall_at_k([[0, 1]], np.ones((1, 2), bool), ks=(5,))


# ---------------------------------------------------------------- zero-shot


def _toy_world(
    rng, n=400, d=32, classes=("atrial fibrillation", "left bundle branch block", "sinus tachycardia")
):
    """Each class has a direction; an ECG embedding is the sum of its classes' directions plus noise, and each
    prompt template of a class embeds near its direction: what a good shared space should look like."""
    dirs = {c: rng.normal(size=d) for c in classes}
    labels = pd.DataFrame({c: rng.random(n) < 0.3 for c in classes})
    emb = rng.normal(scale=1.0, size=(n, d))
    for c in classes:
        emb += labels[c].to_numpy()[:, None] * dirs[c]
    prompts = prompts_for(classes)
    prompt_emb = {c: np.stack([dirs[c] + rng.normal(scale=0.5, size=d) for _ in prompts[c]]) for c in classes}
    return emb, labels, prompt_emb, dirs


def test_prompts_for_formats_every_template():
    p = prompts_for(["atrial fibrillation"], templates=("ECG showing {}", "{} on ECG"))
    assert p == {"atrial fibrillation": ["ECG showing atrial fibrillation", "atrial fibrillation on ECG"]}


def test_zero_shot_scores_are_cosines_to_mean_prompt():
    rng = np.random.default_rng(0)
    emb, labels, prompt_emb, _ = _toy_world(rng, n=10)
    scores = zero_shot_scores(emb, prompt_emb)
    assert list(scores.columns) == list(prompt_emb) and scores.shape == (10, 3)
    c = "sinus tachycardia"
    p = prompt_emb[c] / np.linalg.norm(prompt_emb[c], axis=1, keepdims=True)
    proto = p.mean(0) / np.linalg.norm(p.mean(0))
    expected = emb @ proto / np.linalg.norm(emb, axis=1)
    np.testing.assert_allclose(scores[c].to_numpy(), expected, rtol=1e-4, atol=1e-5)


def test_zero_shot_auroc_high_on_matching_space_and_chance_on_shuffled_labels():
    rng = np.random.default_rng(0)
    emb, labels, prompt_emb, _ = _toy_world(rng)
    scores = zero_shot_scores(emb, prompt_emb)
    res = zero_shot_auroc(scores, labels)
    assert (res.auroc > 0.9).all(), res
    assert (res.n_pos + res.n_neg == 400).all()
    shuffled = labels.sample(frac=1.0, random_state=0).reset_index(drop=True)
    assert (zero_shot_auroc(scores, shuffled).auroc.between(0.35, 0.65)).all()
    # array labels in column order give the same answer; a class without negatives gives NaN
    np.testing.assert_allclose(zero_shot_auroc(scores, labels.to_numpy()).auroc, res.auroc)
    assert np.isnan(zero_shot_auroc(scores[["sinus tachycardia"]], np.ones((400, 1))).auroc.iloc[0])
    with pytest.raises(ValueError, match="lack classes"):
        zero_shot_auroc(scores, labels.drop(columns="sinus tachycardia"))


def test_text_to_ecg_retrieves_the_queried_class():
    rng = np.random.default_rng(2)
    emb, labels, prompt_emb, _ = _toy_world(rng)
    query = np.stack([prompt_emb[c].mean(0) for c in labels.columns])
    _, ids = text_to_ecg(query, emb, k=20)
    relevant = labels.to_numpy().T  # [n_classes, n_ecg]
    res = precision_recall_at_k(ids, relevant, ks=(10, 20)).set_index("k")
    assert res.loc[10, "precision"] > 0.9  # chance is ~0.3
    _, ids_idx = text_to_ecg(query, build_index(emb), k=20)
    np.testing.assert_array_equal(ids, ids_idx)
