"""Runs the evaluation protocols on an embedding model.

Every protocol embeds through an `Embedder` (`embedder`: a `keras.Model`
in this process or an exported SavedModel, fed uint8 images adapted to its
input) and scores with `metrics`, so train.py's final table, evaluate.py and bench/reproduce.py measure the same way.

Protocols:

- verification of LFW-format pairs or insightface `.bin` sets: 10-fold
  accuracy, TAR@FAR, EER, AUC, the ROC, feature-norm statistics
  (`evaluate_verification`); `verify_pairs` is the figure train.py prints
  at the end of a run (a pairs.txt, TAR@FAR 1e-3 and 1e-4);
- low resolution: the same pairs with the probe image (the right image of
  each pair, or both) downsampled by a factor k (area average to
  round(h/k) × round(w/k)) and resized back (bilinear), as in Ring loss
  §5.4; with the mean norm ratio ‖f(low)‖ / ‖f(full)‖ of those images;
- all pairs of a labelled set (`all_pairs_tar`): TAR at FARs that a
  pairs.txt cannot resolve (5,000 images give 12.5M impostor pairs, 6,000
  pairs only 3,000), also across resolutions (full image i against the
  low-resolution copy of image j);
- identification: probes against a gallery plus distractors (rank-1,
  rank-5, CMC), distractors embedded in chunks or read from a `.npy` of
  embeddings (memory-mapped) (`evaluate_identification`), or, for folders
  of copies of an already embedded set, from its embeddings
  (`identify_copies`);
- template verification (IJB-B/C): features pooled per media, then per
  template, and pairs of templates scored (`ring_loss_tf.evaluation.ijb`).

`ring_loss_tf.evaluation.report` prints and writes the results.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from typing import Sequence

import numpy as np
import tensorflow as tf

from ring_loss_tf.data import pipeline
from ring_loss_tf.data import eval_sets
from ring_loss_tf.evaluation import ijb
from ring_loss_tf.evaluation import metrics
# Loading the model is the first step of every evaluation: evaluate.py and
# bench/ take these from here.
from ring_loss_tf.evaluation.embedder import Embedder
from ring_loss_tf.evaluation.embedder import load_embedder
from ring_loss_tf.evaluation.embedder import resolve_model_path  # noqa: F401

LOW_RES_SIDES = ("probe", "both")
# What train.py prints at the end of a run: a pairs.txt has a few thousand
# impostor pairs, so lower FARs would be unresolved.
TRAINING_FARS = (1e-3, 1e-4)

# ---------------------------------------------------------------------------
# Image degradation.


def downsample(images: np.ndarray, factor: float) -> np.ndarray:
    """Low-resolution version of uint8 images at their original size.

    Area-average to round(h/factor) × round(w/factor) (at least 1 pixel),
    then bilinear back to h × w, rounded to uint8. factor 1 is identity.
    """
    if not factor >= 1:
        raise ValueError(
            f"A low-resolution factor must be ≥ 1. Received: {factor!r}"
        )
    images = np.asarray(images)
    h, w = images.shape[1:3]
    small = (max(1, round(h / factor)), max(1, round(w / factor)))
    if small == (h, w):
        return images.copy()
    out = np.empty_like(images)
    for start in range(0, len(images), 1024):  # bounded float32 copies
        x = tf.cast(images[start : start + 1024], tf.float32)
        x = tf.image.resize(x, small, method="area")
        x = tf.image.resize(x, (h, w), method="bilinear")
        out[start : start + 1024] = np.clip(np.round(x.numpy()), 0, 255)
    return out


# ---------------------------------------------------------------------------
# Protocols.


def verify_embedded(
    left: np.ndarray,
    right: np.ndarray,
    pairs: eval_sets.VerificationSet,
    *,
    metric: str = "cosine",
    fars: Sequence[float] = metrics.DEFAULT_FARS,
) -> metrics.VerificationResult:
    """Verification of `pairs` from the embeddings of each pair's images.

    Args:
        left, right: `(num_pairs, embedding_dim)`, the embeddings of the
            left and right image of each pair (the right one of a
            low-resolution probe, say).
        pairs: gives `issame` and `fold` (the 10 folds of pairs.txt).
        metric, fars: see `metrics.pair_scores`, `metrics.verify`.
    """
    scores = metrics.pair_scores(left, right, metric)
    return metrics.verify(scores, pairs.issame, fold=pairs.fold, fars=fars)


def norm_ratio(full: np.ndarray, low: np.ndarray) -> float:
    """Mean of ‖low_i‖ / ‖full_i‖ over the images of non-zero full norm.

    `full` and `low` embed the same images at full and low resolution; a
    zero full-resolution embedding has no ratio and is left out.
    """
    full_norm = np.linalg.norm(full, axis=1)
    low_norm = np.linalg.norm(low, axis=1)
    ok = full_norm > 0
    return float(np.mean(low_norm[ok] / full_norm[ok]))


def evaluate_verification(
    embedder: Embedder,
    pairs: eval_sets.VerificationSet,
    *,
    metric: str = "cosine",
    flip: bool = False,
    low_res: Sequence[float] = (),
    low_res_side: str = "probe",
    fars: Sequence[float] = metrics.DEFAULT_FARS,
) -> dict:
    """Verification (and its low-resolution variants) of one pair set.

    Returns:
        dict: "result" (`metrics.VerificationResult`), "norms"
        (`metrics.norm_statistics` of the plain embeddings of the set's
        images), "embed_seconds", and "low_res": {factor: {"result",
        "norms", "norm_ratio"}}.
    """
    if low_res_side not in LOW_RES_SIDES:
        raise ValueError(
            f"`low_res_side` must be one of {LOW_RES_SIDES}. "
            f"Received: {low_res_side!r}"
        )
    started = time.perf_counter()
    emb, plain = embedder.embed_with_plain(pairs.images, flip=flip)
    embed_seconds = time.perf_counter() - started
    kw = dict(metric=metric, fars=fars)
    out = {
        "result": verify_embedded(emb[pairs.left], emb[pairs.right], pairs,
                                  **kw),
        "norms": metrics.norm_statistics(plain),
        "embed_seconds": embed_seconds,
        "num_images": int(len(pairs.images)),
        "low_res": {},
    }
    for factor in low_res:
        low_images = downsample(pairs.images, factor)
        low, low_plain = embedder.embed_with_plain(low_images, flip=flip)
        left = low if low_res_side == "both" else emb
        out["low_res"][factor] = {
            "result": verify_embedded(left[pairs.left], low[pairs.right],
                                      pairs, **kw),
            "norms": metrics.norm_statistics(low_plain),
            "norm_ratio": norm_ratio(plain, low_plain),
        }
    return out


def verify_pairs(
    model,
    pairs_path: str | os.PathLike,
    image_dir: str | os.PathLike,
    *,
    fars: Sequence[float] = TRAINING_FARS,
    batch_size: int = 512,
) -> metrics.VerificationResult:
    """10-fold accuracy and TAR@FAR of an LFW-format pairs file.

    The figure train.py prints at the end of a run (with
    `evaluation_report.format_verification`): the images are read at the
    model's declared size and channels, embedded once (no flip), and each
    pair scored by the cosine of its two embeddings.

    Args:
        model: an `Embedder`, or what `load_embedder` takes (a
            `keras.Model`, a SavedModel directory, a training model_dir).
        pairs_path: the pairs file (`eval_sets.read_lfw_pairs`).
        image_dir: the folder per identity it refers to.
        fars: the FARs of `tar_at_far`.
        batch_size: images per model call when `model` is not an
            `Embedder` (512, as training embeds).

    Returns:
        A `metrics.VerificationResult`.
    """
    embedder = model if isinstance(model, Embedder) else load_embedder(
        model, batch_size=batch_size
    )
    pairs = eval_sets.read_lfw_pairs(
        pairs_path,
        image_dir,
        image_size=embedder.image_size,
        channels=embedder.channels,
    )
    return evaluate_verification(embedder, pairs, fars=fars)["result"]


def all_pairs_tar(
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    fars: Sequence[float],
    others: np.ndarray | None = None,
    metric: str = "cosine",
) -> dict:
    """TAR at each FAR over every pair i < j of a labelled set.

    With `others` (the same images embedded again, e.g. at low
    resolution), pair i < j is `embeddings[i]` against `others[j]`, see
    `metrics.all_pairs`. TARs are read off the ROC without interpolation
    (`metrics.tar_at_far`); a FAR below 1/impostors gives None.

    Returns:
        JSON-ready {"num_genuine", "num_impostor", "tar_at_far": {"1e-3"
        style key (`f"{far:g}"`, as `VerificationResult.to_dict`): TAR or
        None}}.
    """
    scores, issame = metrics.all_pairs(
        embeddings, labels, metric, others=others
    )
    curve = metrics.roc(scores, issame)
    return {
        "num_genuine": curve.num_genuine,
        "num_impostor": curve.num_impostor,
        "tar_at_far": {
            f"{far:g}": metrics.tar_at_far(curve, far)[0] for far in fars
        },
    }


def _file_keys(paths) -> list[tuple[str, str]]:
    return [(pathlib.Path(p).parent.name, pathlib.Path(p).name) for p in paths]


def pair_indices(
    pairs: eval_sets.VerificationSet, paths: Sequence[str | os.PathLike]
) -> tuple[np.ndarray, np.ndarray]:
    """Indices into `paths` of each pair's left and right image.

    For a pairs file over a folder whose images `paths` lists (and are
    embedded already): `pairs.names` are matched to `paths` by identity
    folder and file name, so the pairs reuse those embeddings.
    """
    where = {key: i for i, key in enumerate(_file_keys(paths))}
    keys = _file_keys(pairs.names)
    missing = [str(n) for n, k in zip(pairs.names, keys) if k not in where]
    if missing:
        raise ValueError(
            f"{len(missing)} images of the pairs are not among the "
            f"{len(where)} given paths (e.g. {missing[:3]}); the pairs file "
            "must refer to images of that folder."
        )
    index = np.array([where[k] for k in keys], np.int64)
    return index[pairs.left], index[pairs.right]


def identify_copies(
    embeddings: np.ndarray,
    labels: np.ndarray,
    paths: Sequence[str | os.PathLike],
    root: str | os.PathLike,
    *,
    metric: str = "cosine",
    max_rank: int = 100,
) -> metrics.IdentificationResult:
    """Identification on `root`/{gallery,probes,distractors} from embeddings.

    The three folders (a folder per identity, as `kanji.prepare` writes
    them) hold copies of images listed in `paths`, whose `embeddings` and
    `labels` are known: files are matched by identity folder and file name,
    so nothing is embedded again. Without a distractors folder the gallery
    alone is searched.
    """
    root = pathlib.Path(root)
    where = {key: i for i, key in enumerate(_file_keys(paths))}

    def indices(part):
        files = [f for f in sorted((root / part).glob("*/*")) if f.is_file()]
        keys = _file_keys(files)
        missing = [str(f) for f, k in zip(files, keys) if k not in where]
        if missing:
            raise ValueError(
                f"{root / part}: {len(missing)} files are not copies of the "
                f"embedded images (e.g. {missing[:3]}); matched by identity "
                "folder and file name."
            )
        return [where[k] for k in keys]

    g, p = indices("gallery"), indices("probes")
    d = None
    if (root / "distractors").is_dir():
        d = embeddings[indices("distractors")]
    return metrics.identify(
        embeddings[p],
        labels[p],
        embeddings[g],
        labels[g],
        d,
        metric=metric,
        max_rank=max_rank,
    )


def embed_folder(
    embedder: Embedder,
    root: str | os.PathLike,
    *,
    flip: bool = False,
    image_size=None,
    channels=None,
    chunk_size: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings float32 (n, d), identity names (n,)) of a folder set.

    Images are read `chunk_size` at a time, so only the embeddings of a
    large set (e.g. 1M distractors) are held in memory.
    """
    paths, labels, class_names = eval_sets.read_image_folder(root, load=False)
    names = np.asarray(class_names)[labels]
    parts = []
    for start in range(0, len(paths), chunk_size):
        images = pipeline.load_images(
            paths[start : start + chunk_size],
            image_size=image_size,
            channels=channels,
        )
        parts.append(embedder(images, flip=flip))
    return np.concatenate(parts), names


def load_distractor_embeddings(path, dim: int) -> np.ndarray:
    """A `.npy` of precomputed distractor embeddings (memory-mapped)."""
    try:
        array = np.load(path, mmap_mode="r")
    except Exception as error:
        raise ValueError(
            f"{path}: not a readable .npy array of embeddings "
            f"({type(error).__name__}: {error})."
        ) from None
    if array.ndim != 2 or array.shape[1] != dim:
        raise ValueError(
            f"{path}: expected distractor embeddings of shape (n, {dim}) "
            f"(the model's embedding size), found {array.shape}."
        )
    return array


def evaluate_identification(
    embedder: Embedder,
    gallery: str | os.PathLike,
    probes: str | os.PathLike,
    distractors: str | os.PathLike | None = None,
    *,
    metric: str = "cosine",
    flip: bool = False,
    image_size=None,
    channels=None,
    max_rank: int = 100,
) -> dict:
    """Identification of probe folders against gallery (+ distractors).

    Identities are matched by folder name. `distractors` is a folder per
    identity (identities ignored) or a `.npy` of embeddings.

    Returns:
        dict: "result" (`metrics.IdentificationResult`), "norms" (of the
        probes' and gallery's embeddings), "embed_seconds".
    """
    started = time.perf_counter()
    kw = dict(flip=flip, image_size=image_size, channels=channels)
    g, g_names = embed_folder(embedder, gallery, **kw)
    p, p_names = embed_folder(embedder, probes, **kw)
    d = None
    if distractors is not None:
        if str(distractors).endswith(".npy"):
            d = load_distractor_embeddings(distractors, g.shape[1])
        else:
            d, _ = embed_folder(embedder, distractors, **kw)
    embed_seconds = time.perf_counter() - started
    missing = sorted(set(p_names) - set(g_names))
    if missing:
        raise ValueError(
            f"{probes}: {len(missing)} probe identities have no folder in "
            f"the gallery {gallery} (e.g. {missing[:3]}); every probe "
            "identity needs gallery images."
        )
    result = metrics.identify(
        p,
        p_names,
        g,
        g_names,
        d,
        metric=metric,
        max_rank=min(max_rank, len(g) + (0 if d is None else len(d))),
    )
    return {
        "result": result,
        "norms": metrics.norm_statistics(np.concatenate([g, p])),
        "embed_seconds": embed_seconds,
    }


@dataclasses.dataclass
class ModelReport:
    """Everything measured for one model (see `evaluate_model`)."""

    model: dict
    settings: dict
    verification: dict
    identification: dict | None

    def to_dict(self) -> dict:
        verification = {}
        for name, v in self.verification.items():
            entry = v["result"].to_dict()
            entry["roc"] = metrics.roc_to_dict(v["result"].roc)
            entry["norms"] = v["norms"]
            entry["embed_seconds"] = v["embed_seconds"]
            entry["num_images"] = v["num_images"]
            entry["low_res"] = {
                f"{factor:g}": {
                    **low["result"].to_dict(),
                    "roc": metrics.roc_to_dict(low["result"].roc),
                    "norms": low["norms"],
                    "norm_ratio": low["norm_ratio"],
                }
                for factor, low in v["low_res"].items()
            }
            verification[name] = entry
        identification = None
        if self.identification is not None:
            identification = self.identification["result"].to_dict()
            identification["norms"] = self.identification["norms"]
            identification["embed_seconds"] = self.identification[
                "embed_seconds"
            ]
        return {
            "model": self.model,
            "settings": self.settings,
            "verification": verification,
            "identification": identification,
        }


def evaluate_model(
    embedder: Embedder,
    *,
    verification_sets: dict | None = None,
    identification: dict | None = None,
    metric: str = "cosine",
    flip: bool = False,
    low_res: Sequence[float] = (),
    low_res_side: str = "probe",
    fars: Sequence[float] = metrics.DEFAULT_FARS,
    max_rank: int = 100,
    templates: dict | None = None,
    detector_score: bool = True,
) -> ModelReport:
    """Runs every requested protocol for one model.

    Args:
        embedder: an `Embedder`.
        verification_sets: {name: `eval_sets.VerificationSet`, or a callable
            (image_size, channels) -> VerificationSet, called once}.
        identification: None or {"gallery", "probes", "distractors"
            (optional)} paths.
        metric, flip, low_res, low_res_side, fars: see
            `evaluate_verification`.
        max_rank: CMC length.
        templates: {name: `ijb.TemplateProtocol`}, template verification
            (cosine, `flip` and `detector_score` as in
            `ijb.evaluate_templates`); reported with the verification sets
            as "<name> templates".
    """
    metrics.check_metric(metric)
    verification = {}
    for name, pairs in (verification_sets or {}).items():
        if callable(pairs):
            pairs = pairs(embedder.image_size, embedder.channels)
        verification[name] = evaluate_verification(
            embedder,
            pairs,
            metric=metric,
            flip=flip,
            low_res=low_res,
            low_res_side=low_res_side,
            fars=fars,
        )
    if templates:
        for name, protocol in templates.items():
            verification[f"{name} templates"] = ijb.evaluate_templates(
                embedder, protocol, flip=flip,
                detector_score=detector_score, fars=fars,
            )
    ident = None
    if identification:
        ident = evaluate_identification(
            embedder,
            identification["gallery"],
            identification["probes"],
            identification.get("distractors"),
            metric=metric,
            flip=flip,
            image_size=embedder.image_size,
            channels=embedder.channels,
            max_rank=max_rank,
        )
    return ModelReport(
        model=embedder.describe(),
        settings={
            "metric": metric,
            "flip": flip,
            "low_res": list(low_res),
            "low_res_side": low_res_side,
            "fars": list(fars),
            **({"detector_score": detector_score} if templates else {}),
        },
        verification=verification,
        identification=ident,
    )
