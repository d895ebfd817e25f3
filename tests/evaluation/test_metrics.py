"""Tests of ring_loss_tf.evaluation.metrics against independent computations.

References: brute force in float64 NumPy over every threshold, scikit-learn's
`roc_curve` / `roc_auc_score`, and hand-made cases with known answers.
"""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve

from ring_loss_tf.evaluation import metrics


def _scores(seed, n=400, shift=1.5, ties=False):
    rng = np.random.default_rng(seed)
    issame = rng.random(n) < 0.5
    scores = rng.normal(size=n) + shift * issame
    if ties:
        scores = np.round(scores * 2) / 2  # many exact ties
    return scores, issame


# ---------------------------------------------------------------------------
# Brute-force references.


def _rates(scores, issame, t):
    far = np.mean(scores[~issame] >= t)
    tar = np.mean(scores[issame] >= t)
    return far, tar


def _brute_tar_at_far(scores, issame, far):
    best = None
    for t in np.r_[np.unique(scores), np.inf]:
        f, tar = _rates(scores, issame, t)
        if f <= far and (best is None or tar > best):
            best = tar
    return best


def _brute_best_threshold(scores, issame):
    """Lowest most-accurate threshold among every gap midpoint and ±inf."""
    u = np.unique(scores)
    candidates = np.r_[-np.inf, (u[:-1] + u[1:]) / 2, np.inf]
    accs = [np.mean((scores >= t) == issame) for t in candidates]
    j = int(np.argmax(accs))
    return candidates[j], accs[j]


def _brute_fold_accuracies(scores, issame, folds):
    out = []
    for test in folds:
        train = np.ones(scores.size, bool)
        train[test] = False
        t, _ = _brute_best_threshold(scores[train], issame[train])
        out.append(np.mean((scores[test] >= t) == issame[test]))
    return np.array(out)


def _brute_auc(scores, issame):
    g = scores[issame][:, None]
    i = scores[~issame][None, :]
    return np.mean((g > i) + 0.5 * (g == i))


def _sampled_eer(scores, issame):
    """EER by densely sampling the ROC polyline of sklearn's points."""
    far, tar, _ = roc_curve(issame, scores, drop_intermediate=False)
    t = np.linspace(0, 1, 2001)[:, None]
    f = far[:-1] + t * np.diff(far)
    r = tar[:-1] + t * np.diff(tar)
    gap = np.abs(f - (1 - r))
    k = np.unravel_index(np.argmin(gap), gap.shape)
    return f[k]


# ---------------------------------------------------------------------------
# pair_scores.


def test_pair_scores_cosine_and_l2_match_float64_formulas():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 16)).astype(np.float32) * 7
    b = rng.normal(size=(50, 16)).astype(np.float32) * 3
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    cos = np.array(
        [
            x @ y / np.linalg.norm(x) / np.linalg.norm(y)
            for x, y in zip(a64, b64)
        ]
    )
    l2 = np.array([-np.sum((x - y) ** 2) for x, y in zip(a64, b64)])
    np.testing.assert_allclose(metrics.pair_scores(a, b), cos, rtol=1e-12)
    np.testing.assert_allclose(
        metrics.pair_scores(a, b, metric="l2"), l2, rtol=1e-12
    )


def test_pair_scores_zero_embedding_has_cosine_zero():
    a = np.array([[0.0, 0.0], [1.0, 0.0]])
    b = np.array([[1.0, 2.0], [0.0, 0.0]])
    np.testing.assert_array_equal(metrics.pair_scores(a, b), [0.0, 0.0])


def test_pair_scores_errors():
    with pytest.raises(ValueError, match="metric.*Received: metric='dot'"):
        metrics.pair_scores(np.ones((2, 3)), np.ones((2, 3)), metric="dot")
    with pytest.raises(ValueError, match="same shape"):
        metrics.pair_scores(np.ones((2, 3)), np.ones((3, 3)))
    with pytest.raises(ValueError, match="2-D"):
        metrics.pair_scores(np.ones(3), np.ones(3))


# ---------------------------------------------------------------------------
# ROC, AUC, TAR@FAR, EER.


@pytest.mark.parametrize("ties", [False, True])
def test_roc_points_match_sklearn(ties):
    scores, issame = _scores(1, ties=ties)
    curve = metrics.roc(scores, issame)
    far, tar, thr = roc_curve(issame, scores, drop_intermediate=False)
    np.testing.assert_allclose(curve.far, far)
    np.testing.assert_allclose(curve.tar, tar)
    np.testing.assert_array_equal(curve.thresholds[1:], thr[1:])
    assert curve.thresholds[0] == np.inf


@pytest.mark.parametrize("ties", [False, True])
def test_auc_matches_sklearn_and_pairwise_count(ties):
    scores, issame = _scores(2, ties=ties)
    got = metrics.verify(scores, issame).auc
    np.testing.assert_allclose(got, roc_auc_score(issame, scores), rtol=1e-12)
    np.testing.assert_allclose(got, _brute_auc(scores, issame), rtol=1e-12)


@pytest.mark.parametrize("ties", [False, True])
def test_tar_at_far_matches_brute_force(ties):
    scores, issame = _scores(3, n=600, shift=2.0, ties=ties)
    num_impostor = int(np.sum(~issame))
    fars = (1e-4, 1e-3, 1 / num_impostor, 3 / num_impostor, 1e-2, 0.05, 0.1)
    result = metrics.verify(scores, issame, fars=fars)
    for far in fars:
        got = result.tar_at_far[far]
        if far < 1 / num_impostor:
            assert got is None
            assert result.threshold_at_far[far] is None
        else:
            assert got == _brute_tar_at_far(scores, issame, far)
            # The threshold really achieves it.
            f, t = _rates(scores, issame, result.threshold_at_far[far])
            assert f <= far and t == got


def _insightface_tar_at_far(scores, issame, far):
    """insightface's recognition/_evaluation_/ijb/ijb_11.py, line for line:
    sklearn's default ROC, flipped, the point of least |FPR - far| (min over
    (distance, index) pairs)."""
    fpr, tpr, _ = roc_curve(issame, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    _, i = min(list(zip(abs(fpr - far), range(len(fpr)))))
    return tpr[i]


@pytest.mark.parametrize("seed,ties", [(13, False), (14, True), (15, True)])
def test_insightface_rule_matches_ijb_11_on_sklearns_roc(seed, ties):
    scores, issame = _scores(seed, n=600, shift=2.0, ties=ties)
    num_impostor = int(np.sum(~issame))
    fars = (1e-6, 1e-4, 0.4 / num_impostor, 1 / num_impostor,
            2.5 / num_impostor, 1e-2, 0.033, 0.05, 0.1, 0.27, 0.6)
    curve = metrics.roc(scores, issame)
    far, tar, thresholds = roc_curve(issame, scores)
    thin = metrics.thin_roc(curve)
    np.testing.assert_array_equal(thin.far, far)
    np.testing.assert_array_equal(thin.tar, tar)
    np.testing.assert_array_equal(thin.thresholds[1:], thresholds[1:])
    result = metrics.verify(scores, issame, fars=fars)
    differs = 0
    for f in fars:
        want = _insightface_tar_at_far(scores, issame, f)
        got, threshold = metrics.tar_at_far_nearest(curve, f)
        assert got == want == result.tar_at_far_nearest[f]
        # Its threshold gives that TAR on the pairs.
        assert _rates(scores, issame, threshold)[1] == got
        differs += got != result.tar_at_far[f]
    assert differs  # the two rules are not the same figure
    assert result.to_dict()["tar_at_far_nearest"]["0.1"] == (
        result.tar_at_far_nearest[0.1])


def test_the_two_tar_at_far_rules_on_a_hand_made_roc():
    # Impostors 0.0 .. 0.9, genuine pairs between them: after (0, 0) the
    # points are (FAR, TAR) = (0, 1/4), (.1, 1/4), (.1, 2/4), (.2, 2/4),
    # (.2, 3/4), (.3, 3/4), (.3, 1), then (.4, 1) ... (1, 1), of which
    # sklearn keeps only (1, 1).
    impostor = np.arange(10) / 10
    genuine = np.array([0.95, 0.85, 0.75, 0.65])
    scores = np.r_[impostor, genuine]
    issame = np.r_[np.zeros(10, bool), np.ones(4, bool)]
    curve = metrics.roc(scores, issame)
    assert metrics.thin_roc(curve).far.tolist() == [
        0, 0, .1, .1, .2, .2, .3, .3, 1]
    cases = {  # far: (ours, insightface's)
        0.04: (None, 0.25),  # below one impostor in 10: n/a, or FAR 0
        0.14: (0.5, 0.5),
        0.18: (0.5, 0.75),   # the nearest point, FAR 0.2, lies above 0.18
        0.5: (1.0, 1.0),
    }
    for far, (ours, theirs) in cases.items():
        assert metrics.tar_at_far(curve, far)[0] == ours
        assert metrics.tar_at_far_nearest(curve, far)[0] == theirs
        assert _insightface_tar_at_far(scores, issame, far) == theirs
        if ours is not None:
            assert _brute_tar_at_far(scores, issame, far) == ours


def test_unresolvable_far_is_none_never_invented():
    scores, issame = _scores(4, n=200)
    result = metrics.verify(scores, issame)
    num_impostor = int(np.sum(~issame))
    for far, tar in result.tar_at_far.items():
        assert (tar is None) == (far * num_impostor < 1)
    assert result.to_dict()["tar_at_far"]["1e-06"] is None


@pytest.mark.parametrize("seed,ties", [(5, False), (6, True), (7, False)])
def test_eer_matches_sampled_roc_crossing(seed, ties):
    scores, issame = _scores(seed, ties=ties, shift=1.0)
    result = metrics.verify(scores, issame)
    np.testing.assert_allclose(
        result.eer, _sampled_eer(scores, issame), atol=2e-3
    )
    # It lies between the best and worst max(FAR, FRR) of neighbouring
    # real thresholds.
    rates = [_rates(scores, issame, t) for t in np.unique(scores)]
    best = min(max(f, 1 - t) for f, t in rates)
    assert result.eer <= best + 1e-12


# ---------------------------------------------------------------------------
# 10-fold accuracy.


@pytest.mark.parametrize("ties", [False, True])
def test_best_threshold_is_optimal_over_all_thresholds(ties):
    scores, issame = _scores(8, ties=ties)
    thr, acc = metrics.best_threshold(scores, issame)
    want_thr, want_acc = _brute_best_threshold(scores, issame)
    assert acc == pytest.approx(want_acc, abs=1e-12)
    assert thr == want_thr
    assert np.mean((scores >= thr) == issame) == pytest.approx(acc)


@pytest.mark.parametrize("ties", [False, True])
def test_fold_accuracy_matches_brute_force_contiguous_folds(ties):
    scores, issame = _scores(9, n=300, shift=1.0, ties=ties)
    result = metrics.verify(scores, issame, num_folds=10)
    folds = np.array_split(np.arange(300), 10)
    want = _brute_fold_accuracies(scores, issame, folds)
    np.testing.assert_allclose(result.fold_accuracies, want)
    assert result.accuracy_mean == pytest.approx(np.mean(want))
    assert result.accuracy_std == pytest.approx(np.std(want))


def test_fold_accuracy_uses_given_fold_ids():
    scores, issame = _scores(10, n=240, shift=1.0)
    fold = np.random.default_rng(0).integers(0, 4, size=240)
    result = metrics.verify(scores, issame, fold=fold)
    want = _brute_fold_accuracies(
        scores, issame, [np.flatnonzero(fold == k) for k in range(4)]
    )
    np.testing.assert_allclose(result.fold_accuracies, want)
    # Differs from contiguous folds on this data: the ids are really used.
    contiguous = metrics.verify(scores, issame, num_folds=4)
    assert not np.allclose(contiguous.fold_accuracies, want)


def test_perfectly_separable():
    scores = np.r_[np.linspace(0.6, 1.0, 300), np.linspace(-1.0, 0.4, 300)]
    issame = np.r_[np.ones(300, bool), np.zeros(300, bool)]
    perm = np.random.default_rng(0).permutation(600)
    r = metrics.verify(scores[perm], issame[perm])
    assert r.accuracy_mean == 1.0 and r.accuracy_std == 0.0
    assert r.auc == 1.0 and r.eer == 0.0
    assert r.tar_at_far[1e-2] == 1.0 and r.tar_at_far[1e-1] == 1.0
    assert all(0.4 < t < 0.6 for t in r.fold_thresholds)


def test_all_equal_scores():
    issame = np.r_[np.ones(200, bool), np.zeros(400, bool)]
    scores = np.full(600, 0.3)
    r = metrics.verify(scores, issame, num_folds=10, fars=(1e-2, 0.5, 1.0))
    assert r.auc == 0.5
    assert r.eer == pytest.approx(0.5)
    # Nothing can be accepted below FAR 1; FAR 1 accepts everything.
    assert r.tar_at_far[1e-2] == 0.0 and r.tar_at_far[0.5] == 0.0
    assert r.tar_at_far[1.0] == 1.0
    # Majority class (impostor) wins on every training split.
    np.testing.assert_array_equal(r.fold_thresholds, np.inf)
    want = [np.mean(~issame[f]) for f in np.array_split(np.arange(600), 10)]
    np.testing.assert_allclose(r.fold_accuracies, want)


def test_ties_between_classes_are_one_roc_point():
    scores = np.array([1.0, 1.0, 0.0, 0.0])
    issame = np.array([True, False, True, False])
    curve = metrics.roc(scores, issame)
    np.testing.assert_array_equal(curve.far, [0, 0.5, 1])
    np.testing.assert_array_equal(curve.tar, [0, 0.5, 1])
    assert metrics.auc(curve) == 0.5
    assert metrics.equal_error_rate(curve)[0] == 0.5


def test_to_dict_is_json_ready():
    import json

    scores, issame = _scores(11)
    d = metrics.verify(scores, issame).to_dict(include_roc=True)
    back = json.loads(json.dumps(d))
    assert back["roc"]["far"][0] == 0.0 and back["roc"]["tar"][-1] == 1.0
    assert back["roc"]["thresholds"][0] == "inf"


def test_roc_thinning_keeps_the_tar_at_kept_fars():
    scores, issame = _scores(12, n=20000, shift=2.0)
    curve = metrics.roc(scores, issame)
    thin = metrics.roc_to_dict(curve, max_points=200)
    assert len(thin["far"]) <= 200
    for f, t in zip(thin["far"][1:], thin["tar"][1:]):
        assert t == metrics.tar_at_far(curve, f)[0]


def test_verify_errors():
    with pytest.raises(ValueError, match="same length"):
        metrics.verify(np.zeros(5), np.zeros(4, bool))
    with pytest.raises(ValueError, match="both genuine and impostor"):
        metrics.verify(np.zeros(20), np.ones(20, bool))
    with pytest.raises(ValueError, match="non-finite"):
        metrics.verify(np.r_[np.nan, np.zeros(19)], np.arange(20) % 2 == 0)
    with pytest.raises(ValueError, match="num_folds"):
        metrics.verify(np.zeros(5), np.arange(5) % 2 == 0, num_folds=10)
    with pytest.raises(ValueError, match="one fold id per pair"):
        metrics.verify(np.zeros(6), np.arange(6) % 2 == 0, fold=[0, 1])
    with pytest.raises(ValueError, match="booleans"):
        metrics.verify(np.zeros(4), [0, 1, 2, 1])
    with pytest.raises(ValueError, match=r"far.*\(0, 1\]"):
        metrics.verify(np.zeros(4), [0, 1, 0, 1], fars=(0.0,), num_folds=2)


# ---------------------------------------------------------------------------
# All pairs.


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_all_pairs_matches_brute_force(metric):
    rng = np.random.default_rng(13)
    x = rng.normal(size=(37, 8)).astype(np.float32)
    labels = rng.integers(0, 5, size=37)
    scores, same = metrics.all_pairs(x, labels, metric, chunk_size=10)
    ii, jj = np.triu_indices(37, k=1)
    want = metrics.pair_scores(x[ii], x[jj], metric)
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(same, labels[ii] == labels[jj])


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_all_pairs_against_a_second_embedding_matches_brute_force(metric):
    rng = np.random.default_rng(15)
    x = rng.normal(size=(29, 8)).astype(np.float32)
    y = (x + rng.normal(size=(29, 8))).astype(np.float32)
    labels = rng.integers(0, 5, size=29)
    scores, same = metrics.all_pairs(x, labels, metric, others=y,
                                     chunk_size=10)
    ii, jj = np.triu_indices(29, k=1)
    if metric == "cosine":
        a = x[ii] / np.linalg.norm(x[ii].astype(np.float64), axis=1)[:, None]
        b = y[jj] / np.linalg.norm(y[jj].astype(np.float64), axis=1)[:, None]
        want = np.sum(a * b, axis=1)
    else:
        want = -np.sum((x[ii].astype(np.float64) - y[jj]) ** 2, axis=1)
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(same, labels[ii] == labels[jj])
    with pytest.raises(ValueError, match="`others` must have the shape"):
        metrics.all_pairs(x, labels, metric, others=y[:5])


# ---------------------------------------------------------------------------
# Identification.


def _brute_ranks(p, pl, g, gl, d, metric):
    """Full float64 score matrix; rank = 1 + #impostors ≥ best genuine."""
    cand = np.concatenate([g, d]) if d is not None else g
    cl = np.r_[gl, np.full(len(cand) - len(g), -1)]
    ranks = []
    for x, lab in zip(p, pl):
        s = metrics.pair_scores(np.repeat(x[None], len(cand), 0), cand, metric)
        genuine = s[cl == lab].max()
        ranks.append(1 + np.sum(s[cl != lab] >= genuine))
    return np.array(ranks)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_identify_chunked_matches_full_matrix(metric):
    rng = np.random.default_rng(14)
    gl = np.repeat(np.arange(20), 2)
    g = rng.normal(size=(40, 16)).astype(np.float32)
    pl = rng.integers(0, 20, size=30)
    # Probes near their identity's first gallery row: a non-trivial CMC.
    p = g[pl * 2] + 1.2 * rng.normal(size=(30, 16)).astype(np.float32)
    d = rng.normal(size=(333, 16)).astype(np.float32) * 1.3
    got = metrics.identify(
        p,
        pl,
        g,
        gl,
        d,
        metric=metric,
        max_rank=10,
        chunk_size=17,
        probe_chunk_size=7,
    )
    want = _brute_ranks(p, pl, g, gl, d, metric)
    np.testing.assert_array_equal(got.ranks, want)
    assert 0 < got.rank1 < 1  # the case is not degenerate
    cmc = [np.mean(want <= k) for k in range(1, 11)]
    np.testing.assert_allclose(got.cmc, cmc)
    assert got.rank1 == cmc[0] and got.rank5 == cmc[4]
    assert got.num_distractors == 333 and got.num_gallery == 40


def test_identify_ties_count_against_the_probe():
    # Integer embeddings: every score is exact in float32, many ties.
    rng = np.random.default_rng(15)
    g = rng.integers(-2, 3, size=(12, 4)).astype(np.float32)
    gl = np.arange(12) % 6
    p = g[:6].copy()
    pl = gl[:6]
    d = np.concatenate([g[:6], rng.integers(-2, 3, (50, 4))]).astype(np.float32)
    got = metrics.identify(p, pl, g, gl, d, metric="l2", chunk_size=5)
    np.testing.assert_array_equal(
        got.ranks, _brute_ranks(p, pl, g, gl, d, "l2")
    )
    # Each probe's exact copy among the distractors ties with its match.
    assert np.all(got.ranks >= 2)


def test_identify_constant_model_ranks_last():
    x = np.ones((10, 4), np.float32)
    gl = np.arange(10)
    got = metrics.identify(x, gl, x, gl, np.ones((25, 4), np.float32))
    np.testing.assert_array_equal(got.ranks, 9 + 25 + 1)
    assert got.rank1 == 0.0


def test_identify_reads_memmap_distractors(tmp_path):
    rng = np.random.default_rng(16)
    g = rng.normal(size=(8, 6)).astype(np.float32)
    gl = np.arange(8)
    p = g + 0.5 * rng.normal(size=(8, 6)).astype(np.float32)
    d = np.lib.format.open_memmap(
        tmp_path / "d.npy", mode="w+", dtype=np.float32, shape=(500, 6)
    )
    d[:] = rng.normal(size=(500, 6))
    got = metrics.identify(p, gl, g, gl, d, chunk_size=64)
    np.testing.assert_array_equal(
        got.ranks, _brute_ranks(p, gl, g, gl, np.asarray(d), "cosine")
    )


def test_identify_errors():
    x = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="no gallery embedding"):
        metrics.identify(x, [0, 1, 9], x, [0, 1, 2])
    with pytest.raises(ValueError, match="embedding_dim 5"):
        metrics.identify(x, [0, 1, 2], x, [0, 1, 2], np.ones((2, 5)))
    with pytest.raises(ValueError, match="probe_labels"):
        metrics.identify(x, [0, 1], x, [0, 1, 2])


def test_cmc_curve_matches_counting():
    ranks = np.random.default_rng(17).integers(1, 30, size=200)
    cmc = metrics.cmc_curve(ranks, 40)
    np.testing.assert_allclose(cmc, [np.mean(ranks <= k) for k in range(1, 41)])


# ---------------------------------------------------------------------------
# Norms.


def test_norm_statistics_match_numpy():
    rng = np.random.default_rng(18)
    x = rng.normal(size=(300, 12)) * rng.uniform(0.1, 3, size=(300, 1))
    s = metrics.norm_statistics(x, bins=20)
    n = np.linalg.norm(x, axis=1)
    assert s["count"] == 300
    assert s["mean"] == pytest.approx(n.mean())
    assert s["std"] == pytest.approx(n.std())
    assert s["cv"] == pytest.approx(n.std() / n.mean())
    assert s["min"] == pytest.approx(n.min()) and s["max"] == pytest.approx(
        n.max()
    )
    assert s["median"] == pytest.approx(np.median(n))
    # Linear-interpolation percentile by hand: position q·(n − 1).
    srt = np.sort(n)
    pos = 0.05 * 299
    lo = int(pos)
    want = srt[lo] + (pos - lo) * (srt[lo + 1] - srt[lo])
    assert s["p05"] == pytest.approx(want)
    assert sum(s["histogram"]["counts"]) == 300
    assert len(s["histogram"]["edges"]) == 21
