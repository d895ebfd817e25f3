"""Template verification (IJB-A/B/C, Janus): meta files, pooling, scores.

A template is several images and video frames of one subject. The IJB
protocol (insightface's recognition/_evaluation_/ijb/ijb_11.py, which the
IJB-B/C figures of current papers come from) pools per template:

    f_media    = mean of the features of the media's images (frames)
    f_template = Σ_media f_media / ‖Σ_media f_media‖₂

so a video of 50 frames counts as much as one still image, and scores a
pair of templates by the cosine of their features. Image features keep
their norm (insightface's "N1"); `detector_score` multiplies each by its
detector score ("D1"); `flip` sums the features of the image and its mirror
("F2"). insightface's defaults are all three.

Files, in the layout insightface's evaluation reads (`read_protocol`):

    root/meta/<name>_face_tid_mid.txt         image template_id media_id
    root/meta/<name>_template_pair_label.txt  template_id template_id 0|1
    root/meta/<name>_name_5pts_score.txt      image x1 y1 ... x5 y5 score
    root/loose_crop/<image>

The five-point file is optional: without it the images are taken as
aligned already (the embedded set's template variant,
`ring_loss_tf.data.kanji_templates`); with it each loose crop is warped to the
model's input by its landmarks (`ring_loss_tf.data.align`).

Memory: the template features (IJB-C: 23,124 templates) and one chunk of
images are held, never all image features; the 15.7M pairs of IJB-C are
two int64 columns and their float32 scores, scored 65,536 at a time.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time
import warnings
from typing import Sequence

import numpy as np
import tensorflow as tf

from ring_loss_tf.data import align
from ring_loss_tf.data import pipeline
from ring_loss_tf.evaluation import metrics
from ring_loss_tf.data.images import decode_image

TEMPLATE_FILE = "{name}_face_tid_mid.txt"
PAIR_FILE = "{name}_template_pair_label.txt"
LANDMARK_FILE = "{name}_name_5pts_score.txt"
IMAGE_DIR = "loose_crop"
_LAYOUT = 'format: see README, "Template verification (IJB-B/C)"'


@dataclasses.dataclass
class TemplateProtocol:
    """A template-verification protocol: images in templates and media,
    pairs of templates.

    Attributes:
        name: e.g. "ijbc".
        image_paths: (n,) image files, one per row of the template file.
        template_ids, media_ids: int64 (n,), each image's template and media.
        left, right: int64 (p,) template ids of each pair.
        issame: bool (p,), whether the pair's templates show one subject.
        landmarks: float32 (n, 5, 2) five points per image, or None
            (images aligned already).
        detector_scores: float32 (n,), or None.
        landmark_file, landmark_lines: the five-point file and each
            image's line in it (named when a crop's points are off its
            image), or None.
    """

    name: str
    image_paths: list[str]
    template_ids: np.ndarray
    media_ids: np.ndarray
    left: np.ndarray
    right: np.ndarray
    issame: np.ndarray
    landmarks: np.ndarray | None = None
    detector_scores: np.ndarray | None = None
    landmark_file: str | None = None
    landmark_lines: np.ndarray | None = None


def _lines(path: pathlib.Path):
    """(line number, fields) of the non-blank lines."""
    with open(path, encoding="utf-8", errors="replace") as file:
        for number, line in enumerate(file, start=1):
            fields = line.split()
            if fields:
                yield number, fields


def _meta_path(root: pathlib.Path, name: str | None):
    meta = root / "meta"
    if not root.is_dir():
        raise FileNotFoundError(
            f"Template protocol directory not found: {root} ({_LAYOUT})."
        )
    if name is None:
        found = sorted(meta.glob(TEMPLATE_FILE.format(name="*")))
        if len(found) != 1:
            raise FileNotFoundError(
                f"{meta}: expected one *_face_tid_mid.txt, found "
                f"{len(found)} ({_LAYOUT})."
            )
        name = found[0].name[: -len(TEMPLATE_FILE.format(name=""))]
    return name, meta


def _read_templates(path: pathlib.Path, image_dir: pathlib.Path):
    if not path.is_file():
        raise FileNotFoundError(f"Template file not found: {path} "
                                f"({_LAYOUT}).")
    names, templates, medias = [], [], []
    for number, fields in _lines(path):
        try:
            if len(fields) != 3:
                raise ValueError
            templates.append(int(fields[1]))
            medias.append(int(fields[2]))
        except ValueError:
            raise ValueError(
                f"{path} line {number}: expected 'image template_id "
                f"media_id' with integer ids, found {' '.join(fields)!r} "
                f"({_LAYOUT})."
            ) from None
        name = fields[0]
        if os.path.isabs(name) or ".." in pathlib.PurePath(name).parts:
            raise ValueError(
                f"{path} line {number}: image path {name!r} leaves "
                f"{image_dir} (an absolute path or '..'); image paths are "
                f"relative to {IMAGE_DIR}/ and stay inside it."
            )
        names.append(name)
        if not os.path.isfile(image_dir / fields[0]):
            raise FileNotFoundError(
                f"{path} line {number}: image {fields[0]!r} not found in "
                f"{image_dir}. Copy the loose crops there, or fix the line."
            )
    if not names:
        raise ValueError(f"{path} is empty ({_LAYOUT}).")
    return names, np.array(templates, np.int64), np.array(medias, np.int64)


# Points closer together than this (pixels) give no alignment: a
# similarity transform from one point is degenerate.
MIN_LANDMARK_SPREAD = 1.0


def _usual_field_count(path: pathlib.Path) -> int:
    """The field count of most lines (12, a score, on a tie); a pass of
    its own, so IJB-C's 470k split lines are never all held."""
    counts = {}
    for _, fields in _lines(path):
        counts[len(fields)] = counts.get(len(fields), 0) + 1
    return max(counts, key=lambda n: (counts[n], n == 12)) if counts else 12


def _read_landmarks(path: pathlib.Path, names: list[str], template_path):
    landmarks = np.empty((len(names), 5, 2), np.float32)
    scores = np.empty(len(names), np.float32)
    line_numbers = np.empty(len(names), np.int64)
    usual = _usual_field_count(path)
    row = 0
    for number, fields in _lines(path):
        where = f"{path} line {number}"
        if row >= len(names) or fields[0] != names[row]:
            expected = (f"{names[row]!r}, as line {row + 1} of "
                        f"{template_path.name}" if row < len(names) else
                        f"no more than the {len(names)} images of "
                        f"{template_path.name}")
            raise ValueError(
                f"{where}: found image {fields[0]!r}, expected {expected} "
                "(the two files list the same images in the same order)."
            )
        if {len(fields), usual} == {11, 12}:
            # One coordinate short would shift the points and make a
            # coordinate the score; a missing score would weigh 1.0.
            raise ValueError(
                f"{where}: {len(fields)} fields, the file's other lines "
                f"have {usual} (image, 10 landmark coordinates"
                f"{', detector score' if usual == 12 else ''}); "
                + ("a coordinate or the score is missing"
                   if len(fields) < usual else "they have no score")
                + f". Fix the line ({_LAYOUT})."
            )
        points = align.parse_landmark_line(fields[1:], where)
        spread = np.max(np.ptp(points, axis=0))
        if not spread >= MIN_LANDMARK_SPREAD:
            raise ValueError(
                f"{where}: the five landmarks lie within {spread:g} px of "
                "each other (all equal?), which gives no alignment. Fix "
                "the line, or leave the face out of both meta files."
            )
        landmarks[row] = points
        scores[row] = 1.0
        if len(fields) == 12:
            try:
                scores[row] = float(fields[11])
            except ValueError:
                scores[row] = np.nan
            if not (np.isfinite(scores[row]) and scores[row] > 0):
                raise ValueError(
                    f"{where}: detector score {fields[11]!r} is not a "
                    "positive finite number; features are weighted by it "
                    "(--nodetector_score leaves it out). Fix the line."
                )
        line_numbers[row] = number
        row += 1
    if row != len(names):
        raise ValueError(
            f"{path}: {row} lines for the {len(names)} images of "
            f"{template_path.name} (the two files list the same images in "
            "the same order)."
        )
    return landmarks, scores, line_numbers


def _data_line_numbers(path: pathlib.Path) -> list[int]:
    return [number for number, _ in _lines(path)]


def _read_pairs(path: pathlib.Path, known: np.ndarray, template_path):
    if not path.is_file():
        raise FileNotFoundError(f"Template pair file not found: {path} "
                                f"({_LAYOUT}).")
    table = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy warns on an empty file
            # numpy's C parser: IJB-C's 15.7M lines in seconds.
            table = np.loadtxt(path, dtype=np.int64, ndmin=2, comments=None)
    except ValueError:
        pass
    if table is None or table.shape[1:] != (3,):
        for number, fields in _lines(path):
            try:
                if len(fields) != 3:
                    raise ValueError
                [int(v) for v in fields]
            except ValueError:
                raise ValueError(
                    f"{path} line {number}: expected 'template_id "
                    f"template_id label' (integers), found "
                    f"{' '.join(fields)!r} ({_LAYOUT})."
                ) from None
        raise ValueError(f"{path} is empty ({_LAYOUT}).")
    if not len(table):
        raise ValueError(f"{path} is empty ({_LAYOUT}).")
    left, right, label = table.T
    bad_label = np.flatnonzero((label != 0) & (label != 1))
    unknown = np.flatnonzero(~(np.isin(left, known) & np.isin(right, known)))
    if bad_label.size or unknown.size:
        row = min(bad_label[:1].tolist() + unknown[:1].tolist())
        number = _data_line_numbers(path)[row]
        if row in bad_label[:1]:
            problem = f"label {label[row]} is not 0 or 1"
        else:
            ids = [t for t in (left[row], right[row]) if t not in known]
            problem = (f"template id {ids[0]} is not in {template_path} "
                       "(every template of a pair needs images there)")
        raise ValueError(f"{path} line {number}: {problem}.")
    return left.copy(), right.copy(), label.astype(bool)


def read_protocol(
    root: str | os.PathLike, name: str | None = None
) -> TemplateProtocol:
    """Reads a template protocol in insightface's IJB layout (see above).

    Args:
        root: the directory holding meta/ and loose_crop/ (e.g. IJBC/).
        name: the files' prefix, e.g. "ijbc"; default: the one
            `*_face_tid_mid.txt` of root/meta.

    Raises:
        FileNotFoundError: a missing directory, meta file or image (the
            meta file and its line named).
        ValueError: a malformed line, an image path leaving loose_crop/,
            an unknown template id, a label other than 0/1, a five-point
            file out of step with the template file, a five-point line
            whose field count differs from the file's other lines,
            coincident landmarks, or a detector score that is not a
            positive finite number; one line naming the file and the line.
    """
    root = pathlib.Path(root)
    name, meta = _meta_path(root, name)
    template_path = meta / TEMPLATE_FILE.format(name=name)
    names, templates, medias = _read_templates(template_path,
                                               root / IMAGE_DIR)
    landmarks = scores = line_numbers = None
    landmark_path = meta / LANDMARK_FILE.format(name=name)
    if landmark_path.is_file():
        landmarks, scores, line_numbers = _read_landmarks(
            landmark_path, names, template_path)
    left, right, issame = _read_pairs(
        meta / PAIR_FILE.format(name=name), np.unique(templates),
        template_path,
    )
    return TemplateProtocol(
        name=name,
        image_paths=[str(root / IMAGE_DIR / n) for n in names],
        template_ids=templates,
        media_ids=medias,
        left=left,
        right=right,
        issame=issame,
        landmarks=landmarks,
        detector_scores=scores,
        landmark_file=None if landmarks is None else str(landmark_path),
        landmark_lines=line_numbers,
    )


# --------------------------------------------------------------------------
# Pooling and scores


class TemplatePooler:
    """Accumulates image features into template features, chunk by chunk.

    Image i of template t and media m adds f_i / n_(t,m), n being the
    images of that media in that template: the sum over media of the media
    means. Only the (templates, dim) sums are held.
    """

    def __init__(self, template_ids, media_ids):
        template_ids = np.asarray(template_ids, np.int64)
        media_ids = np.asarray(media_ids, np.int64)
        self.templates, self._row_template = np.unique(
            template_ids, return_inverse=True
        )
        pairs = np.stack([self._row_template, media_ids], axis=1)
        _, media_of_row, counts = np.unique(
            pairs, axis=0, return_inverse=True, return_counts=True
        )
        self._row_weight = 1.0 / counts[media_of_row.reshape(-1)]
        self._sums = None

    def add(self, rows, features: np.ndarray) -> None:
        """Adds the features (len(rows), dim) of image rows `rows`."""
        features = np.asarray(features, np.float64)
        if self._sums is None:
            self._sums = np.zeros((len(self.templates), features.shape[1]))
        np.add.at(
            self._sums,
            self._row_template[rows],
            features * self._row_weight[rows, np.newaxis],
        )

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted template ids, float32 L2-normalised features)."""
        return self.templates, metrics.l2_normalize(self._sums).astype(
            np.float32
        )


def pool_templates(
    features: np.ndarray, template_ids, media_ids
) -> tuple[np.ndarray, np.ndarray]:
    """(sorted template ids, normalised template features) of all images."""
    pooler = TemplatePooler(template_ids, media_ids)
    pooler.add(np.arange(len(features)), features)
    return pooler.result()


def template_pair_scores(
    template_features: np.ndarray,
    templates: np.ndarray,
    left: np.ndarray,
    right: np.ndarray,
    *,
    chunk_size: int = 1 << 16,
) -> np.ndarray:
    """float32 cosine of each pair of templates (ids in sorted `templates`).

    Computed `chunk_size` pairs at a time, so the gathered features stay
    bounded (2 × chunk × dim floats: 256 MiB for 512-d float32 features)
    whatever the number of pairs.
    """
    a = np.searchsorted(templates, left)
    b = np.searchsorted(templates, right)
    valid = (a < len(templates)) & (b < len(templates))
    if not (np.all(valid) and np.all(templates[a[valid]] == left[valid])
            and np.all(templates[b[valid]] == right[valid])):
        raise ValueError("A pair names a template without features.")
    scores = np.empty(len(left), np.float32)
    for start in range(0, len(left), chunk_size):
        end = start + chunk_size
        scores[start:end] = np.einsum(
            "ij,ij->i", template_features[a[start:end]],
            template_features[b[start:end]],
        )
    return scores


def template_for_size(image_size: Sequence[int]) -> str:
    """The alignment template of a model input: SphereFace's for its
    112:96 aspect, else insightface's (scaled to the size)."""
    height, width = image_size
    return "sphereface" if height * 96 == width * 112 else "arcface"


def _aligned_images(paths, landmarks, image_size, channels):
    """(uint8 crops of `paths` warped by their landmarks, (n, 2) height
    and width of each loose crop), by a tf.data map."""
    template = template_for_size(image_size)

    def load(path, points):
        image = decode_image(tf.io.read_file(path), channels or 3, path)
        return (align.align_face(image, points, template, image_size),
                tf.shape(image)[:2])

    dataset = tf.data.Dataset.from_tensor_slices(
        (tf.constant(paths), tf.constant(landmarks))
    ).map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    batches = [(c.numpy(), s.numpy()) for c, s in dataset.batch(256)]
    return (np.concatenate([c for c, _ in batches]),
            np.concatenate([s for _, s in batches]))


def _check_landmarks_on_images(protocol, rows, sizes):
    """Refuses points more than half an image outside their loose crop:
    the warp would sample nothing but the border (a black crop)."""
    points = protocol.landmarks[rows]  # (n, 5, 2) x, y
    extent = sizes[:, np.newaxis, ::-1].astype(np.float64)  # width, height
    off = (points < -extent / 2) | (points > 1.5 * extent)
    bad = np.flatnonzero(np.any(off, axis=(1, 2)))
    if bad.size:
        i = bad[0]
        height, width = sizes[i]
        x, y = points[i][np.any(off[i], axis=1)][0]
        raise ValueError(
            f"{protocol.landmark_file} line "
            f"{protocol.landmark_lines[rows[i]]}: landmark ({x:g}, {y:g}) "
            f"lies far outside its image {protocol.image_paths[rows[i]]} "
            f"({width}x{height}), which would give a black crop. Fix the "
            "line (x, y in pixels of the loose crop), or leave the face out "
            "of both meta files."
        )


def evaluate_templates(
    embedder,
    protocol: TemplateProtocol,
    *,
    flip: bool = False,
    detector_score: bool = True,
    fars: Sequence[float] = metrics.DEFAULT_FARS,
    chunk_size: int = 4096,
) -> dict:
    """Template verification of one protocol with an `Embedder`.

    Images are read (and, with landmarks, aligned) and embedded
    `chunk_size` at a time and pooled as they come (`TemplatePooler`).

    Returns:
        dict like `evaluation.evaluate_verification`'s: "result" (a
        `metrics.VerificationResult` of the template pairs: TAR@FAR, EER,
        AUC, ROC, and an accuracy over 10 contiguous folds of the pairs),
        "norms" (of the plain image features f(x): before pooling and
        detector weighting, without the mirror image's, as
        `evaluation.evaluate_verification` reports them), "embed_seconds",
        "num_images", "num_templates", "low_res" ({}).
    """
    started = time.perf_counter()
    pooler = TemplatePooler(protocol.template_ids, protocol.media_ids)
    size = tuple(embedder.image_size or (112, 112))
    norms = np.empty(len(protocol.image_paths), np.float32)
    for start in range(0, len(protocol.image_paths), chunk_size):
        rows = np.arange(start, min(start + chunk_size,
                                    len(protocol.image_paths)))
        paths = [protocol.image_paths[i] for i in rows]
        if protocol.landmarks is not None:
            images, sizes = _aligned_images(
                paths, protocol.landmarks[rows], size, embedder.channels)
            if protocol.landmark_lines is not None:
                _check_landmarks_on_images(protocol, rows, sizes)
        else:
            images = pipeline.load_images(paths, image_size=embedder.image_size,
                                      channels=embedder.channels)
        features, plain = embedder.embed_with_plain(images, flip=flip)
        features = np.asarray(features, np.float64)
        # Of plain f(x), with --flip too, as the pair sets report them.
        norms[rows] = np.linalg.norm(plain, axis=1)
        if detector_score and protocol.detector_scores is not None:
            features *= protocol.detector_scores[rows, np.newaxis]
        pooler.add(rows, features)
    embed_seconds = time.perf_counter() - started
    templates, features = pooler.result()
    scores = template_pair_scores(features, templates, protocol.left,
                                  protocol.right)
    result = metrics.verify(scores, protocol.issame,
                            num_folds=min(10, len(scores)), fars=fars)
    return {
        "result": result,
        "norms": metrics.norm_statistics(norms[:, np.newaxis]),
        "embed_seconds": embed_seconds,
        "num_images": len(protocol.image_paths),
        "num_templates": len(templates),
        "low_res": {},
    }
