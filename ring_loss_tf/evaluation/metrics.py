"""Face verification and identification metrics on embeddings (NumPy only).

Plain functions on arrays: no flags, no TensorFlow. The embedding model lives
in `ring_loss_tf.evaluation.protocols`; everything here takes its outputs.

Scores are similarities throughout: higher means "more likely the same
identity", and a pair is predicted genuine when `score >= threshold`.

- `pair_scores`: cosine or (negative squared) L2 scores of embedding pairs.
- `roc`, `verify`: the LFW 10-fold accuracy, TAR at fixed FARs (ours and
  insightface's IJB rule, `tar_at_far_nearest`), EER, AUC.
- `all_pairs`: genuine/impostor scores of every pair of a labelled set
  (or of the set against a second embedding of the same images).
- `identify`: rank-k identification and the CMC of probes against a gallery
  plus distractors (MegaFace style), in bounded memory.
- `norm_statistics`: statistics and histogram of embedding norms.

References: Huang et al., "Labeled Faces in the Wild", 2007 (the 10-fold
protocol); Kemelmacher-Shlizerman et al., "The MegaFace Benchmark", CVPR 2016
(identification against 1M distractors); Zheng et al., "Ring loss", CVPR 2018.

Over 600 lines: each metric is a short function with its protocol
spelt out (folds, thresholds, ties, the ROC interpolation) so it can be
checked against the papers' definitions; they share the ROC code.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

import numpy as np

DEFAULT_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
METRICS = ("cosine", "l2")


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(
            f"`metric` must be one of {METRICS}. Received: metric={metric!r}"
        )


def _as_matrix(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(
            f"`{name}` must be a 2-D array (num_embeddings, embedding_dim). "
            f"Received: shape {x.shape}"
        )
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    return x


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Returns `x / ‖x‖₂` along `axis`; an all-zero row stays zero."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    norm = np.sqrt(np.sum(np.square(x), axis=axis, keepdims=True))
    # A zero row has no direction: its cosine with anything is 0, not NaN.
    return x / np.where(norm > 0, norm, 1).astype(x.dtype)


def pair_scores(
    emb_a: np.ndarray, emb_b: np.ndarray, metric: str = "cosine"
) -> np.ndarray:
    """Similarity of row i of `emb_a` with row i of `emb_b`.

    - "cosine": a·b / (‖a‖‖b‖), in [−1, 1] (0 if either row is zero).
    - "l2": −‖a − b‖₂², the negative squared Euclidean distance of the RAW
      (not normalised) embeddings. On normalised embeddings it would be
      2·cos − 2, a monotone function of the cosine with the same ROC and
      accuracies; on raw ones the norms count, which is what ring loss acts on.

    Args:
        emb_a, emb_b: arrays of shape `(num_pairs, embedding_dim)`.
        metric: "cosine" or "l2".

    Returns:
        float64 array of shape `(num_pairs,)`; higher = more similar.
    """
    check_metric(metric)
    a = _as_matrix(emb_a, "emb_a").astype(np.float64)
    b = _as_matrix(emb_b, "emb_b").astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(
            "`emb_a` and `emb_b` must have the same shape. "
            f"Received: {a.shape} and {b.shape}"
        )
    if metric == "cosine":
        dot = np.einsum("ij,ij->i", a, b)
        norms = np.sqrt(
            np.einsum("ij,ij->i", a, a) * np.einsum("ij,ij->i", b, b)
        )
        # A zero row has no direction: its cosine with anything is 0.
        return np.divide(dot, norms, out=np.zeros_like(dot), where=norms > 0)
    d = a - b
    return -np.einsum("ij,ij->i", d, d)


def _check_scores(scores, issame) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    issame = np.asarray(issame).reshape(-1)
    if issame.dtype != bool:
        if not np.all((issame == 0) | (issame == 1)):
            raise ValueError(
                "`issame` must be booleans (or 0/1). "
                f"Received values {np.unique(issame)[:5]}"
            )
        issame = issame.astype(bool)
    if scores.shape != issame.shape:
        raise ValueError(
            "`scores` and `issame` must have the same length. "
            f"Received: {scores.shape[0]} and {issame.shape[0]}"
        )
    if not np.all(np.isfinite(scores)):
        raise ValueError(
            f"`scores` has {np.sum(~np.isfinite(scores))} non-finite values "
            "(NaN/inf): check the embeddings (a NaN embedding, a diverged "
            "model)."
        )
    return scores, issame


@dataclasses.dataclass
class Roc:
    """The empirical ROC: one point per distinct score, highest first.

    `far[i]`, `tar[i]` are the fractions of impostor / genuine pairs with
    `score >= thresholds[i]`; point 0 is `(0, 0)` at threshold +inf, the last
    point is `(1, 1)`. Same points as `sklearn.metrics.roc_curve(...,
    drop_intermediate=False)`.
    """

    far: np.ndarray
    tar: np.ndarray
    thresholds: np.ndarray
    num_genuine: int
    num_impostor: int


def roc(scores: np.ndarray, issame: np.ndarray) -> Roc:
    """The ROC of similarity `scores` with ground truth `issame` (see `Roc`).

    O(n log n). Tied scores form one point (no order is invented inside a
    tie). Both classes must be present.
    """
    scores, issame = _check_scores(scores, issame)
    num_genuine = int(np.sum(issame))
    num_impostor = int(issame.size - num_genuine)
    if num_genuine == 0 or num_impostor == 0:
        raise ValueError(
            "A ROC needs both genuine and impostor pairs. Received: "
            f"{num_genuine} genuine, {num_impostor} impostor pairs"
        )
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    y = issame[order]
    # Last index of each run of equal scores.
    last = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]
    tp = np.cumsum(y)[last]
    fp = last + 1 - tp
    return Roc(
        far=np.r_[0.0, fp / num_impostor],
        tar=np.r_[0.0, tp / num_genuine],
        thresholds=np.r_[np.inf, s[last]],
        num_genuine=num_genuine,
        num_impostor=num_impostor,
    )


def tar_at_far(curve: Roc, far: float) -> tuple[float | None, float | None]:
    """TAR at a target FAR, without interpolation, and its threshold.

    TAR@FAR=f is the highest TAR among the ROC's operating points whose FAR
    is ≤ f (the ROC read as a step function): a rate actually reached by one
    threshold on these pairs, never a value between two points. A FAR below
    1/num_impostor cannot be resolved by the pairs (the smallest non-zero
    FAR is one impostor) and gives `(None, None)`.

    Returns:
        (tar, threshold), or (None, None) when `far` is unresolved.
    """
    if not 0 < far <= 1:
        raise ValueError(f"`far` must be in (0, 1]. Received: far={far!r}")
    # 1/n and a decimal literal are both correctly rounded: exact compare.
    if 1.0 / curve.num_impostor > far:
        return None, None
    ok = np.flatnonzero(curve.far <= far)
    # tar is non-decreasing along the curve: the last admissible point.
    i = ok[-1]
    return float(curve.tar[i]), float(curve.thresholds[i])


def thin_roc(curve: Roc) -> Roc:
    """The ROC without the points inside straight stretches, as
    `sklearn.metrics.roc_curve(...)` returns it by default
    (`drop_intermediate=True`).

    A point is dropped when it and its two neighbours are collinear in the
    impostor and genuine counts (second differences both 0); the first and
    last point after (0, 0) are kept, then (0, 0) is put back in front.
    The counts are exact integers, so no rounding decides what is dropped.
    """
    fp = np.rint(curve.far[1:] * curve.num_impostor)
    tp = np.rint(curve.tar[1:] * curve.num_genuine)
    keep = np.arange(fp.size)
    if fp.size > 2:
        keep = np.flatnonzero(np.r_[
            True, (np.diff(fp, 2) != 0) | (np.diff(tp, 2) != 0), True
        ])
    keep = np.r_[0, keep + 1]
    return Roc(
        far=curve.far[keep],
        tar=curve.tar[keep],
        thresholds=curve.thresholds[keep],
        num_genuine=curve.num_genuine,
        num_impostor=curve.num_impostor,
    )


def tar_at_far_nearest(curve: Roc, far: float) -> tuple[float, float]:
    """TAR at a target FAR by insightface's IJB rule, and its threshold.

    insightface's IJB evaluation (recognition/_evaluation_/ijb/ijb_11.py,
    behind the published IJB-B/C tables) takes sklearn's default ROC
    (`thin_roc`), reverses it, and reports the point whose FAR is nearest
    to `far` (the first of the reversed curve among equally near ones). That
    point's FAR may lie above `far`, and a FAR below 1/num_impostor still
    gets a number; `tar_at_far` never does either. Use this rule to compare
    with published IJB tables.

    Returns:
        (tar, threshold).
    """
    return _nearest_point(thin_roc(curve), far)


def _nearest_point(thin: Roc, far: float) -> tuple[float, float]:
    if not 0 < far <= 1:
        raise ValueError(f"`far` must be in (0, 1]. Received: far={far!r}")
    distance = np.abs(thin.far[::-1] - far)
    # The first minimum of the reversed curve, as min() over (distance,
    # index) pairs picks it in ijb_11.py.
    i = thin.far.size - 1 - int(np.argmin(distance))
    return float(thin.tar[i]), float(thin.thresholds[i])


def equal_error_rate(curve: Roc) -> tuple[float, float]:
    """The EER: where FAR = FRR = 1 − TAR, and a threshold there.

    Between the two adjacent ROC points where FAR − FRR changes sign, FAR and
    FRR are interpolated linearly (the ROC's straight segment, the same
    convention as the AUC's trapezoids) and the crossing is returned. The
    threshold is interpolated linearly between the two points' thresholds
    (the higher one if that is +inf).

    Returns:
        (eer, threshold).
    """
    frr = 1.0 - curve.tar
    d = curve.far - frr  # −1 at the first point, +1 at the last.
    i = int(np.flatnonzero(d >= 0)[0])
    if d[i] == 0:
        return float(curve.far[i]), float(curve.thresholds[i])
    t = d[i - 1] / (d[i - 1] - d[i])
    eer = curve.far[i - 1] + t * (curve.far[i] - curve.far[i - 1])
    hi, lo = curve.thresholds[i - 1], curve.thresholds[i]
    thr = lo if np.isinf(hi) else hi + t * (lo - hi)
    return float(eer), float(thr)


def auc(curve: Roc) -> float:
    """Area under the ROC by trapezoids.

    Equals P(genuine score > impostor score) + ½ P(equal), the Mann-Whitney
    statistic with ties counted half (what `roc_auc_score` computes).
    """
    return float(np.trapezoid(curve.tar, curve.far))


def best_threshold(
    scores: np.ndarray, issame: np.ndarray
) -> tuple[float, float]:
    """The threshold of highest accuracy on (scores, issame).

    Every distinct partition "score ≥ t is genuine" is tried (t = each
    distinct score, and +inf), O(n log n). Among equally accurate partitions
    the lowest threshold wins; the returned threshold is the midpoint between
    the lowest score called genuine and the highest called impostor (−inf if
    all are called genuine, +inf if none), so a new score falls on the side
    it is nearer to.

    Returns:
        (threshold, accuracy on these scores).
    """
    scores, issame = _check_scores(scores, issame)
    n = scores.size
    if n == 0:
        raise ValueError("`best_threshold` needs at least one pair.")
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    y = issame[order]
    # first[j]: index of the first occurrence of the j-th distinct score,
    # plus n (threshold +inf: everything called impostor).
    first = np.r_[0, np.flatnonzero(np.diff(s) != 0) + 1, n]
    genuine_below = np.r_[0, np.cumsum(y)][first]
    impostor_below = first - genuine_below
    correct = (y.sum() - genuine_below) + impostor_below
    j = int(np.argmax(correct))  # first maximum = lowest threshold
    i = first[j]
    if i == 0:
        threshold = -np.inf
    elif i == n:
        threshold = np.inf
    else:
        threshold = s[i - 1] + (s[i] - s[i - 1]) / 2
    return float(threshold), float(correct[j] / n)


def _folds(n: int, num_folds: int, fold) -> list[np.ndarray]:
    if fold is not None:
        fold = np.asarray(fold).reshape(-1)
        if fold.size != n:
            raise ValueError(
                f"`fold` must give one fold id per pair ({n}). "
                f"Received: {fold.size} ids"
            )
        ids = np.unique(fold)
        if ids.size < 2:
            raise ValueError(
                "Cross-validation needs at least 2 distinct fold ids. "
                f"Received: {ids.tolist()}"
            )
        return [np.flatnonzero(fold == i) for i in ids]
    if num_folds < 2 or num_folds > n:
        raise ValueError(
            f"`num_folds` must be in [2, number of pairs = {n}]. "
            f"Received: num_folds={num_folds}"
        )
    # Contiguous folds, like the ten sets of 600 pairs of LFW's pairs.txt.
    return np.array_split(np.arange(n), num_folds)


@dataclasses.dataclass
class VerificationResult:
    """What `verify` returns. Rates are fractions in [0, 1].

    Attributes:
        accuracy_mean, accuracy_std: mean and population std (ddof=0) of the
            per-fold test accuracies.
        fold_accuracies, fold_thresholds: per fold, the test accuracy and the
            threshold chosen on the other folds.
        tar_at_far: {far: TAR or None (unresolved)}, see `tar_at_far`.
        threshold_at_far: {far: threshold or None}.
        tar_at_far_nearest: {far: TAR} by insightface's IJB rule, see
            `tar_at_far_nearest` (it may differ from `tar_at_far`).
        eer, eer_threshold: see `equal_error_rate`.
        auc: area under the ROC.
        num_genuine, num_impostor: pair counts.
        roc: the full `Roc` of all pairs.
    """

    accuracy_mean: float
    accuracy_std: float
    fold_accuracies: np.ndarray
    fold_thresholds: np.ndarray
    tar_at_far: dict
    threshold_at_far: dict
    eer: float
    eer_threshold: float
    auc: float
    num_genuine: int
    num_impostor: int
    roc: Roc
    tar_at_far_nearest: dict = dataclasses.field(default_factory=dict)

    def to_dict(self, include_roc: bool = False) -> dict:
        """JSON-ready dict (inf → "inf", NaN/None → null)."""
        d = {
            "accuracy_mean": self.accuracy_mean,
            "accuracy_std": self.accuracy_std,
            "fold_accuracies": [float(a) for a in self.fold_accuracies],
            "fold_thresholds": [_json_float(t) for t in self.fold_thresholds],
            "tar_at_far": {
                f"{far:g}": tar for far, tar in self.tar_at_far.items()
            },
            "threshold_at_far": {
                f"{far:g}": _json_float(t)
                for far, t in self.threshold_at_far.items()
            },
            "tar_at_far_nearest": {
                f"{far:g}": tar
                for far, tar in self.tar_at_far_nearest.items()
            },
            "eer": self.eer,
            "eer_threshold": _json_float(self.eer_threshold),
            "auc": self.auc,
            "num_genuine": self.num_genuine,
            "num_impostor": self.num_impostor,
        }
        if include_roc:
            d["roc"] = roc_to_dict(self.roc)
        return d


def _json_float(x):
    if x is None:
        return None
    x = float(x)
    if math.isnan(x):
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def roc_to_dict(curve: Roc, max_points: int = 2000) -> dict:
    """The ROC as lists, thinned to at most ~`max_points` for JSON/plots.

    Thinning keeps, for log-spaced FAR targets, the highest-TAR point at or
    below each, plus the endpoints, so a log-FAR plot of the thinned curve
    is the plot of the full one at the kept FARs.
    """
    n = curve.far.size
    if n <= max_points:
        keep = np.arange(n)
    else:
        positive = curve.far[curve.far > 0]
        targets = np.geomspace(positive.min(), 1.0, max_points - 2)
        keep = np.searchsorted(curve.far, targets, side="right") - 1
        keep = np.unique(np.r_[0, keep, n - 1])
    return {
        "far": curve.far[keep].tolist(),
        "tar": curve.tar[keep].tolist(),
        "thresholds": [_json_float(t) for t in curve.thresholds[keep]],
    }


def verify(
    scores: np.ndarray,
    issame: np.ndarray,
    *,
    num_folds: int = 10,
    fold: np.ndarray | None = None,
    fars: Sequence[float] = DEFAULT_FARS,
) -> VerificationResult:
    """Verification figures of similarity scores (LFW protocol and ROC).

    Accuracy: for each fold k, the threshold of best accuracy on the other
    folds (`best_threshold`) is applied to fold k; mean and std over folds.
    Folds are the ids in `fold` if given (e.g. from pairs.txt), else
    `num_folds` contiguous, near-equal blocks in the given order.

    TAR@FAR, EER and AUC are computed on the ROC of ALL pairs (not per fold),
    see `tar_at_far`, `equal_error_rate`, `auc`: no interpolation for
    TAR@FAR, and FARs below 1/num_impostor are reported as None;
    `tar_at_far_nearest` holds insightface's IJB rule beside it.

    Args:
        scores: `(num_pairs,)` similarities, higher = more similar.
        issame: `(num_pairs,)` booleans, True for genuine pairs.
        num_folds: number of contiguous folds when `fold` is None.
        fold: optional `(num_pairs,)` fold id of each pair.
        fars: target FARs in (0, 1].

    Returns:
        A `VerificationResult`.
    """
    scores, issame = _check_scores(scores, issame)
    curve = roc(scores, issame)
    folds = _folds(scores.size, num_folds, fold)
    fold_acc, fold_thr = [], []
    for test in folds:
        train = np.ones(scores.size, bool)
        train[test] = False
        thr, _ = best_threshold(scores[train], issame[train])
        fold_thr.append(thr)
        fold_acc.append(np.mean((scores[test] >= thr) == issame[test]))
    tars, thrs, nearest = {}, {}, {}
    thin = thin_roc(curve)
    for far in fars:
        tars[far], thrs[far] = tar_at_far(curve, far)
        nearest[far] = _nearest_point(thin, far)[0]
    eer, eer_thr = equal_error_rate(curve)
    fold_acc = np.asarray(fold_acc)
    return VerificationResult(
        accuracy_mean=float(np.mean(fold_acc)),
        accuracy_std=float(np.std(fold_acc)),
        fold_accuracies=fold_acc,
        fold_thresholds=np.asarray(fold_thr),
        tar_at_far=tars,
        threshold_at_far=thrs,
        eer=eer,
        eer_threshold=eer_thr,
        auc=auc(curve),
        num_genuine=curve.num_genuine,
        num_impostor=curve.num_impostor,
        roc=curve,
        tar_at_far_nearest=nearest,
    )


def all_pairs(
    embeddings: np.ndarray,
    labels: np.ndarray,
    metric: str = "cosine",
    *,
    others: np.ndarray | None = None,
    chunk_size: int = 2048,
) -> tuple[np.ndarray, np.ndarray]:
    """Scores of every unordered pair i < j of a labelled set.

    n embeddings give n(n−1)/2 pairs (5,000 → 12.5M); this resolves TARs at
    far lower FARs than 6,000 pairs. Rows are processed `chunk_size` at a
    time; the outputs themselves are O(n²) (float32 scores + bool).

    With `others` (a second embedding of the same n images, e.g. of their
    low-resolution copies), pair i < j scores `embeddings[i]` against
    `others[j]`: every cross-resolution pair once, an image never against
    its own copy.

    Returns:
        (scores float32 `(n(n−1)/2,)`, issame bool), in row-major order of
        the upper triangle.
    """
    check_metric(metric)
    x = _as_matrix(embeddings, "embeddings").astype(np.float32)
    y = x if others is None else (
        _as_matrix(others, "others").astype(np.float32)
    )
    if y.shape != x.shape:
        raise ValueError(
            "`others` must have the shape of `embeddings` (the same images "
            f"embedded again). Received: {y.shape} and {x.shape}"
        )
    labels = np.asarray(labels).reshape(-1)
    if labels.size != x.shape[0]:
        raise ValueError(
            "`labels` must have one entry per embedding. Received: "
            f"{labels.size} labels for {x.shape[0]} embeddings"
        )
    n = x.shape[0]
    if metric == "cosine":
        x = l2_normalize(x)
        y = x if others is None else l2_normalize(y)
    sq_x = np.sum(np.square(x, dtype=np.float64), axis=1)
    sq_y = np.sum(np.square(y, dtype=np.float64), axis=1)
    scores, same = [], []
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        s = x[start:stop] @ y.T
        if metric == "l2":
            s = 2 * s - sq_x[start:stop, None] - sq_y[None, :]
        for r in range(start, stop):
            scores.append(s[r - start, r + 1 :].astype(np.float32))
            same.append(labels[r + 1 :] == labels[r])
    if not scores:
        return np.zeros(0, np.float32), np.zeros(0, bool)
    return np.concatenate(scores), np.concatenate(same)


# ---------------------------------------------------------------------------
# Identification.


@dataclasses.dataclass
class IdentificationResult:
    """What `identify` returns.

    Attributes:
        ranks: `(num_probes,)` int64, 1-based rank of each probe's true
            identity (see `identify` for ties).
        cmc: `(max_rank,)` float, cmc[k−1] = fraction of probes with rank ≤ k.
        rank1, rank5: cmc at 1 and 5 (rank5 is None if max_rank < 5).
        num_gallery, num_distractors: sizes of the search set.
    """

    ranks: np.ndarray
    cmc: np.ndarray
    rank1: float
    rank5: float | None
    num_gallery: int
    num_distractors: int

    def to_dict(self) -> dict:
        return {
            "rank1": self.rank1,
            "rank5": self.rank5,
            "cmc": self.cmc.tolist(),
            "num_probes": int(self.ranks.size),
            "num_gallery": self.num_gallery,
            "num_distractors": self.num_distractors,
        }


def _prepare(x: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """float32 rows (normalised for cosine) and the l2 bias −‖x‖²."""
    x = np.asarray(x, dtype=np.float32)
    if metric == "cosine":
        return l2_normalize(x), np.zeros(x.shape[0], np.float32)
    return x, -np.sum(np.square(x), axis=1)


def _scores_block(p, q, q_bias, metric):
    """Scores of prepared probes p against prepared rows q, up to a
    per-probe constant.

    cosine: p̂·q̂.  l2: −‖p − q‖² + ‖p‖² = 2p·q − ‖q‖²; the ‖p‖² term is the
    same for every candidate of one probe, so ranks do not change.
    """
    s = p @ q.T
    if metric == "l2":
        s *= 2
        s += q_bias[None, :]
    return s


def identify(
    probes: np.ndarray,
    probe_labels: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    distractors: np.ndarray | None = None,
    *,
    metric: str = "cosine",
    max_rank: int = 100,
    chunk_size: int = 8192,
    probe_chunk_size: int = 2048,
) -> IdentificationResult:
    """Closed-set identification with distractors (MegaFace style).

    Each probe is compared with every gallery embedding and every
    distractor. Its genuine score g is the best score of a gallery embedding
    of its own identity; its rank is

        1 + #{gallery of other identities, and distractors, scoring ≥ g}.

    Ties count against the probe (pessimistic: a constant model ranks last,
    not first). Distractors have no identity and never match. The rank-k
    identification rate is the fraction of probes with rank ≤ k; the CMC is
    that for k = 1 … max_rank.

    Memory is bounded: candidates (gallery, then distractors) are read
    `chunk_size` rows at a time and probes go `probe_chunk_size` at a time,
    so one float32 score block of at most probe_chunk_size × chunk_size
    (64 MiB by default) is alive; a `np.memmap` of 1,000,000 × 512
    distractors works.
    Compute is one matrix product per block (float32), so the cost is that
    of `probes @ candidates.T` plus one compare-and-count per score.

    Args:
        probes: `(num_probes, dim)` embeddings.
        probe_labels: `(num_probes,)` identities; each must occur in
            `gallery_labels`.
        gallery: `(num_gallery, dim)` embeddings.
        gallery_labels: `(num_gallery,)` identities.
        distractors: optional `(num_distractors, dim)` embeddings.
        metric: "cosine" or "l2" (as in `pair_scores`).
        max_rank: length of the CMC.
        chunk_size: candidate rows per block.
        probe_chunk_size: probe rows per block.

    Returns:
        An `IdentificationResult`.
    """
    check_metric(metric)
    probes = _as_matrix(probes, "probes")
    gallery = _as_matrix(gallery, "gallery")
    probe_labels = np.asarray(probe_labels).reshape(-1)
    gallery_labels = np.asarray(gallery_labels).reshape(-1)
    if probe_labels.size != probes.shape[0]:
        raise ValueError(
            f"`probe_labels` has {probe_labels.size} entries for "
            f"{probes.shape[0]} probes."
        )
    if gallery_labels.size != gallery.shape[0]:
        raise ValueError(
            f"`gallery_labels` has {gallery_labels.size} entries for "
            f"{gallery.shape[0]} gallery embeddings."
        )
    dim = probes.shape[1]
    candidates = [("gallery", gallery)]
    if distractors is not None:
        if np.ndim(distractors) != 2:
            raise ValueError(
                "`distractors` must be a 2-D array (num, dim). Received: "
                f"shape {np.shape(distractors)}"
            )
        candidates.append(("distractors", distractors))
    for name, c in candidates:
        if c.shape[1] != dim:
            raise ValueError(
                f"`{name}` has embedding_dim {c.shape[1]}, the probes {dim}."
            )
    missing = np.setdiff1d(probe_labels, gallery_labels)
    if missing.size:
        raise ValueError(
            f"{missing.size} probe identities have no gallery embedding "
            f"(e.g. {missing[:3].tolist()}): closed-set identification "
            "needs every probe identity in the gallery."
        )
    if max_rank < 1:
        raise ValueError(f"`max_rank` must be ≥ 1. Received: {max_rank}")
    if chunk_size < 1 or probe_chunk_size < 1:
        raise ValueError(
            "`chunk_size` and `probe_chunk_size` must be ≥ 1. Received: "
            f"{chunk_size}, {probe_chunk_size}"
        )

    p, _ = _prepare(probes, metric)
    num_probes = p.shape[0]
    # Pass 1: the genuine score, best same-identity gallery score.
    genuine = np.full(num_probes, -np.inf, np.float32)
    for c0 in range(0, gallery.shape[0], chunk_size):
        c1 = c0 + chunk_size
        q, q_bias = _prepare(gallery[c0:c1], metric)
        for p0 in range(0, num_probes, probe_chunk_size):
            p1 = p0 + probe_chunk_size
            s = _scores_block(p[p0:p1], q, q_bias, metric)
            same = probe_labels[p0:p1, None] == gallery_labels[None, c0:c1]
            best = np.max(np.where(same, s, -np.inf), axis=1)
            np.maximum(genuine[p0:p1], best, out=genuine[p0:p1])

    # Pass 2: count impostor candidates scoring ≥ genuine.
    def same_identity(p0, p1, c0, c1):
        return probe_labels[p0:p1, None] == gallery_labels[None, c0:c1]

    args = (metric, chunk_size, probe_chunk_size)
    ahead = _count_at_least(p, genuine, gallery, *args, same_identity)
    num_distractors = 0
    if distractors is not None:
        num_distractors = int(distractors.shape[0])
        ahead += _count_at_least(p, genuine, distractors, *args)
    ranks = ahead + 1
    cmc = cmc_curve(ranks, max_rank)
    return IdentificationResult(
        ranks=ranks,
        cmc=cmc,
        rank1=float(cmc[0]),
        rank5=float(cmc[4]) if max_rank >= 5 else None,
        num_gallery=int(gallery.shape[0]),
        num_distractors=num_distractors,
    )


def _count_at_least(
    probes: np.ndarray,
    thresholds: np.ndarray,
    candidates: np.ndarray,
    metric: str,
    chunk_size: int,
    probe_chunk_size: int,
    exclude=None,
) -> np.ndarray:
    """For each probe i, #{candidates j : score(i, j) ≥ thresholds[i]}.

    `probes` are prepared (L2-normalised for cosine), `thresholds` in the
    units of `_scores_block`. `candidates` are raw rows, read and prepared
    `chunk_size` at a time; probes go `probe_chunk_size` at a time, so one
    score block is at most probe_chunk_size × chunk_size float32.
    `exclude(p0, p1, c0, c1)`, if given, returns a bool mask of pairs not to
    count.
    """
    t = np.asarray(thresholds, np.float32)[:, None]
    counts = np.zeros(probes.shape[0], np.int64)
    for c0 in range(0, candidates.shape[0], chunk_size):
        c1 = min(c0 + chunk_size, candidates.shape[0])
        q, q_bias = _prepare(candidates[c0:c1], metric)
        for p0 in range(0, probes.shape[0], probe_chunk_size):
            p1 = min(p0 + probe_chunk_size, probes.shape[0])
            s = _scores_block(probes[p0:p1], q, q_bias, metric)
            hit = s >= t[p0:p1]
            if exclude is not None:
                hit &= ~exclude(p0, p1, c0, c1)
            counts[p0:p1] += np.count_nonzero(hit, axis=1)
    return counts


def cmc_curve(ranks: np.ndarray, max_rank: int) -> np.ndarray:
    """cmc[k−1] = fraction of `ranks` (1-based) ≤ k, for k = 1 … max_rank."""
    ranks = np.asarray(ranks).reshape(-1)
    if ranks.size == 0:
        raise ValueError("`ranks` is empty: no probes.")
    hist = np.bincount(np.minimum(ranks, max_rank + 1), minlength=max_rank + 2)
    return np.cumsum(hist[1 : max_rank + 1]) / ranks.size


# ---------------------------------------------------------------------------
# Feature norms.


def norm_statistics(
    embeddings: np.ndarray,
    *,
    bins: int | Iterable[float] = 50,
) -> dict:
    """Statistics and a histogram of the L2 norms ‖x_i‖₂ of embeddings.

    Ring loss (Zheng et al. 2018) targets these: a low-norm tail and a large
    coefficient of variation (std / mean) are what it removes.

    Returns:
        dict with count, mean, std (ddof=0), cv, min, max, median, p01, p05,
        p95, p99 (percentiles), and histogram {"counts", "edges"}.
    """
    x = _as_matrix(embeddings, "embeddings").astype(np.float64)
    norms = np.sqrt(np.sum(np.square(x), axis=1))
    if norms.size == 0:
        raise ValueError("`embeddings` is empty: no norms to summarise.")
    counts, edges = np.histogram(norms, bins=bins)
    mean = float(np.mean(norms))
    std = float(np.std(norms))
    p = np.percentile(norms, [1, 5, 50, 95, 99])
    return {
        "count": int(norms.size),
        "mean": mean,
        "std": std,
        "cv": std / mean if mean > 0 else None,
        "min": float(norms.min()),
        "max": float(norms.max()),
        "median": float(p[2]),
        "p01": float(p[0]),
        "p05": float(p[1]),
        "p95": float(p[3]),
        "p99": float(p[4]),
        "histogram": {"counts": counts.tolist(), "edges": edges.tolist()},
    }
