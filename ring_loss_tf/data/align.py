"""Face alignment: five landmarks → a similarity-warped crop on a template.

SphereFace (and so the Ring loss paper) trains and tests on faces warped by
a least-squares similarity transform that takes five landmarks (left eye,
right eye, nose tip, left and right mouth corner, "left" meaning the image's
left) onto fixed points of a 112×96 crop; insightface uses the same points
shifted 8 pixels right in a 112×112 crop (`TEMPLATES`).

    A, t = argmin_{A = s·R, R a rotation} Σ_i ‖A p_i + t − q_i‖²

has a closed form in 2-D (Umeyama 1991 without the reflection case): with
the points as complex numbers and centred, A = z = Σ conj(p̃_i) q̃_i /
Σ |p̃_i|², t = q̄ − z p̄. A complex factor is always a rotation times a
scale, so the warp never mirrors a face, whatever the landmarks.

`similarity_transform` and `warp` are TensorFlow ops (eager, `tf.function`
or `tf.data.Dataset.map`); `align_face` is the two in one. Pixel
coordinates put pixel (i, j)'s centre at x = j, y = i, as OpenCV's
`warpAffine` (insightface's warp) does.

Landmarks come from a detector (`MtcnnDetector`, the `mtcnn` package: `pip
install "ring_loss_tf[align]"`) or from a five-point list
(`read_landmarks_file`). `align_folder` aligns a folder of identity folders;
its command line
(ring_loss_tf/commands/align.py; `python -m ring_loss_tf.data.align` takes the
same flags):

    ring-loss-align --input_dir=photos --output_dir=aligned \\
        --template=sphereface [--all_faces] [--landmarks=5pts.txt]

Its speed, with the command that measures it, is in the docs.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import pathlib
import secrets
import threading
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf
from PIL import Image
from PIL import ImageOps

from ring_loss_tf.data.images import MAX_IMAGE_PIXELS
from ring_loss_tf.data.images import is_image_file

# (height, width) and the five points (x, y) of each template, in pixels.
# SphereFace's matlab/preprocess/face_align_demo.m (coord5points) and
# insightface's arcface_dst (face_align.py): the same points, +8 in x.
TEMPLATES = {
    "sphereface": (
        (112, 96),
        ((30.2946, 51.6963), (65.5318, 51.5014), (48.0252, 71.7366),
         (33.5493, 92.3655), (62.7299, 92.2041)),
    ),
    "arcface": (
        (112, 112),
        ((38.2946, 51.6963), (73.5318, 51.5014), (56.0252, 71.7366),
         (41.5493, 92.3655), (70.7299, 92.2041)),
    ),
}
NO_FACE_ACTIONS = ("skip", "center_crop")
NO_FACE_FILE = "no_face.txt"
ALIGN_INSTALL = 'pip install "ring_loss_tf[align]" (the mtcnn package)'
_LANDMARKS_FORMAT = (
    "format: 'path x1 y1 ... x5 y5 [score]' per face, see README, "
    '"Aligning photos"'
)


def template_points(
    template: str = "sphereface",
    image_size: Sequence[int] | None = None,
) -> tuple[tuple[int, int], np.ndarray]:
    """((height, width), float64 (5, 2) points) of a template.

    With `image_size` other than the template's, the points are scaled by
    one factor (the template fitted inside, centred), so the warp stays a
    similarity transform.
    """
    if template not in TEMPLATES:
        raise ValueError(
            f"`template` must be one of {sorted(TEMPLATES)}. "
            f"Received: template={template!r}"
        )
    size, points = TEMPLATES[template]
    points = np.asarray(points, np.float64)
    if image_size is None or tuple(image_size) == size:
        return size, points
    height, width = (int(v) for v in image_size)
    if height < 8 or width < 8:
        raise ValueError(
            f"`image_size` must be (height, width), each >= 8. "
            f"Received: image_size={image_size!r}"
        )
    scale = min(height / size[0], width / size[1])
    # Pixel centres: a pixel of the template is `scale` pixels here.
    offset = np.array([width - scale * size[1], height - scale * size[0]])
    return (height, width), (points + 0.5) * scale + offset / 2 - 0.5


def similarity_transform(landmarks, target) -> tf.Tensor:
    """The least-squares similarity (no reflection) from landmarks to target.

    Args:
        landmarks: `(..., n, 2)` points (x, y), n >= 2 not all equal.
        target: `(n, 2)` or `(..., n, 2)` points they should land on.

    Returns:
        float64 `(..., 2, 3)` matrices M with M @ [x, y, 1] ≈ target point,
        M[:, :2] = [[a, −b], [b, a]] (a rotation times a scale > 0).
    """
    p = tf.cast(landmarks, tf.float64)
    q = tf.cast(target, tf.float64)
    q = tf.broadcast_to(q, tf.shape(p))
    p_mean = tf.reduce_mean(p, axis=-2, keepdims=True)
    q_mean = tf.reduce_mean(q, axis=-2, keepdims=True)
    px, py = tf.unstack(p - p_mean, axis=-1)
    qx, qy = tf.unstack(q - q_mean, axis=-1)
    # z = Σ conj(p̃) q̃ / Σ |p̃|², the complex least-squares factor.
    energy = tf.reduce_sum(px * px + py * py, axis=-1)
    a = tf.math.divide_no_nan(tf.reduce_sum(px * qx + py * qy, -1), energy)
    b = tf.math.divide_no_nan(tf.reduce_sum(px * qy - py * qx, -1), energy)
    p_mean = p_mean[..., 0, :]
    q_mean = q_mean[..., 0, :]
    tx = q_mean[..., 0] - (a * p_mean[..., 0] - b * p_mean[..., 1])
    ty = q_mean[..., 1] - (b * p_mean[..., 0] + a * p_mean[..., 1])
    return tf.stack(
        [tf.stack([a, -b, tx], -1), tf.stack([b, a, ty], -1)], axis=-2
    )


def warp(images, matrices, output_size: Sequence[int]) -> tf.Tensor:
    """Warps images by forward affine matrices (image → crop), bilinearly.

    Args:
        images: `(h, w, c)` or `(batch, h, w, c)`, any real or uint8 dtype.
        matrices: `(2, 3)` or `(batch, 2, 3)`, as `similarity_transform`
            returns (they must be invertible).
        output_size: (height, width) of the crop.

    Returns:
        The crops, `output_size` pixels, in the images' dtype (uint8 rounded);
        outside the image is 0.
    """
    images = tf.convert_to_tensor(images)
    single = images.shape.rank == 3
    if single:
        images = images[tf.newaxis]
        matrices = tf.convert_to_tensor(matrices)[tf.newaxis]
    m = tf.cast(matrices, tf.float64)
    a, b, tx = m[:, 0, 0], m[:, 0, 1], m[:, 0, 2]
    c, d, ty = m[:, 1, 0], m[:, 1, 1], m[:, 1, 2]
    det = a * d - b * c
    # The op maps each crop pixel back to the image: the inverse affine.
    ia, ib, ic, id_ = d / det, -b / det, -c / det, a / det
    itx = -(ia * tx + ib * ty)
    ity = -(ic * tx + id_ * ty)
    zeros = tf.zeros_like(ia)
    transforms = tf.cast(
        tf.stack([ia, ib, itx, ic, id_, ity, zeros, zeros], axis=-1),
        tf.float32,
    )
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(images, tf.float32),
        transforms=transforms,
        output_shape=tf.constant([int(v) for v in output_size], tf.int32),
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )
    if images.dtype == tf.uint8:
        out = tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)
    else:
        out = tf.cast(out, images.dtype)
    return out[0] if single else out


def align_face(
    image,
    landmarks,
    template: str = "sphereface",
    image_size: Sequence[int] | None = None,
) -> tf.Tensor:
    """An aligned crop from an image and its face's five landmarks.

    Args:
        image: `(h, w, c)` (or a batch `(batch, h, w, c)` with landmarks
            `(batch, 5, 2)`).
        landmarks: `(5, 2)` (x, y): left eye, right eye, nose, left and
            right mouth corner.
        template: "sphereface" (112×96) or "arcface" (112×112).
        image_size: crop size if not the template's (`template_points`).

    Returns:
        The crop, in the image's dtype. A TensorFlow op: usable in
        `tf.data.Dataset.map`.
    """
    size, points = template_points(template, image_size)
    matrix = similarity_transform(landmarks, points)
    return warp(image, matrix, size)


# --------------------------------------------------------------------------
# Landmarks: a detector or a five-point list


@dataclasses.dataclass(frozen=True)
class Face:
    """A detected face: box (x, y, width, height), score, (5, 2) landmarks."""

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray

    @property
    def area(self) -> float:
        return float(self.box[2] * self.box[3])


class MtcnnDetector:
    """Faces and five landmarks with MTCNN (the `mtcnn` package, whose
    weights ship in its wheel and which runs on TensorFlow).

    `detector(image)` takes a uint8 RGB `(h, w, 3)` array and returns a list
    of `Face`s. Any callable with that signature can stand in for it.
    """

    _KEYPOINTS = ("left_eye", "right_eye", "nose", "mouth_left",
                  "mouth_right")

    def __init__(self, min_face_size: int = 20):
        try:
            from mtcnn import MTCNN
        except ImportError:
            raise ImportError(
                "Face detection needs the mtcnn package: "
                f"{ALIGN_INSTALL}; or pass five-point landmarks from a file "
                "(--landmarks)."
            ) from None
        self.min_face_size = min_face_size
        self._mtcnn = MTCNN()
        # One call at a time: TensorFlow spreads each call over the cores,
        # and concurrent calls would only contend for them.
        self._lock = threading.Lock()

    def __call__(self, image: np.ndarray) -> list[Face]:
        with self._lock:
            found = self._mtcnn.detect_faces(
                np.asarray(image), min_face_size=self.min_face_size
            )
        faces = []
        for face in found:
            points = [face["keypoints"][k] for k in self._KEYPOINTS]
            faces.append(Face(
                box=tuple(float(v) for v in face["box"]),
                score=float(face["confidence"]),
                landmarks=np.asarray(points, np.float64),
            ))
        return faces


def parse_landmark_line(fields: list[str], where: str) -> np.ndarray:
    """(5, 2) float64 from the 10 numbers after a path (a score may follow).

    `where` names the file and line in the error.
    """
    try:
        if len(fields) not in (10, 11):
            raise ValueError
        values = np.array([float(v) for v in fields[:10]], np.float64)
        if not np.all(np.isfinite(values)):
            raise ValueError
    except ValueError:
        raise ValueError(
            f"{where}: expected a path and 10 landmark coordinates (an 11th "
            f"number, a score, may follow), found {' '.join(fields)!r} "
            f"({_LANDMARKS_FORMAT})."
        ) from None
    return values.reshape(5, 2)


def read_landmarks_file(
    path: str | os.PathLike,
) -> dict[str, list[np.ndarray]]:
    """A five-point list: {relative path: [(5, 2) landmarks of each face]}.

    One line per face, `path x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 [score]`, fields
    separated by spaces or tabs (insightface's `*_name_5pts_score.txt`
    layout); a path on several lines has several faces.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a malformed line (file and line named).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Landmarks file not found: {path} ({_LANDMARKS_FORMAT})."
        )
    faces: dict[str, list[np.ndarray]] = {}
    text = path.read_text(encoding="utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        points = parse_landmark_line(fields[1:], f"{path} line {number}")
        faces.setdefault(pathlib.PurePath(fields[0]).as_posix(), []).append(
            points
        )
    if not faces:
        raise ValueError(f"{path} is empty ({_LANDMARKS_FORMAT}).")
    return faces


# --------------------------------------------------------------------------
# A folder of photos


@dataclasses.dataclass
class AlignSummary:
    """What `align_folder` did (counts of images, and the faces written)."""

    images: int = 0
    aligned: int = 0
    faces_written: int = 0
    no_face: list = dataclasses.field(default_factory=list)
    already_done: int = 0


def _check_folders(input_dir: pathlib.Path, output_dir: pathlib.Path):
    if not input_dir.is_dir():
        raise FileNotFoundError(
            f"Input folder not found: {input_dir}. Pass the folder of photos "
            "(one sub-folder per identity, or images directly)."
        )
    source = input_dir.resolve()
    target = output_dir.resolve()
    if target == source or source in target.parents or (
        target in source.parents
    ):
        raise ValueError(
            f"--output_dir={output_dir} and --input_dir={input_dir} overlap; "
            "the "
            "aligner never writes into its input: give an output folder "
            "outside the input folder (and not containing it)."
        )


def _check_inside(path: pathlib.Path, output_dir: pathlib.Path):
    """Refuses a folder of `path` that a link takes out of `output_dir`.

    A sub-folder of the output that is a symbolic link (into the input, say)
    would have the crops written wherever it points.
    """
    root = output_dir.resolve()
    folder = path.parent
    if folder.resolve() == root or root in folder.resolve().parents:
        return
    link = folder
    while link != output_dir and not link.is_symlink():
        link = link.parent
    raise ValueError(
        f"{link} is a symbolic link to {link.resolve()}, outside "
        f"--output_dir={output_dir}; the aligner writes only inside its "
        "output folder: remove the link, or give another --output_dir."
    )


def _write_image(
    array: np.ndarray, path: pathlib.Path, output_dir: pathlib.Path
) -> None:
    """Writes via a temporary file and a rename: a file at `path` is whole.

    The file's mode is the usual one (0666 less the umask), as for any file
    a program creates; `path` must stay inside `output_dir` (no link out).
    """
    _check_inside(path, output_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    _check_inside(path, output_dir)
    while True:
        temporary = path.parent / (
            f".{path.stem}-{secrets.token_hex(6)}{path.suffix}"
        )
        try:
            # O_EXCL: never through an existing file or link.
            fd = os.open(
                temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666
            )
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as file:
            image = Image.fromarray(array)
            if path.suffix.lower() in (".jpg", ".jpeg"):
                image.save(file, format="JPEG", quality=95)
            else:
                image.save(file, format=Image.registered_extensions().get(
                    path.suffix.lower(), "PNG"))
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def _output_names(relative: pathlib.PurePath, count: int, all_faces: bool):
    suffix = relative.suffix
    if suffix.lower() in (".gif", ".pgm"):  # single-channel or paletted
        suffix = ".png"
    if not all_faces:
        return [relative.with_suffix(suffix)]
    return [relative.with_name(f"{relative.stem}_{k}{suffix}")
            for k in range(count)]


def _centre_crop(image: np.ndarray, size) -> np.ndarray:
    """The largest centred crop of the template's aspect, resized to it."""
    h, w = image.shape[:2]
    aspect = size[1] / size[0]
    crop_w = min(w, round(h * aspect))
    crop_h = min(h, round(crop_w / aspect))
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    crop = Image.fromarray(image[top:top + crop_h, left:left + crop_w])
    return np.asarray(crop.resize((size[1], size[0]), Image.BILINEAR))


def degenerate_landmarks(landmarks, image_shape) -> str | None:
    """Why a face's (5, 2) landmarks cannot give a crop, or None.

    Points that (nearly) coincide leave the similarity transform singular
    (an all-black crop). Their centre maps to the template's centre, inside
    the crop: a centre outside the image gives a crop off the image (black
    too), a centre inside puts image pixels in the crop.
    """
    points = np.asarray(landmarks, np.float64)
    spread = np.sqrt(((points - points.mean(0)) ** 2).sum(1).mean())
    if not spread >= 1.0:
        return (f"degenerate landmarks (spread {spread:.3g} px, the points "
                "coincide)")
    height, width = image_shape[:2]
    x, y = points.mean(0)
    if not (0 <= x <= width - 1 and 0 <= y <= height - 1):
        return (f"degenerate landmarks (centre ({x:.1f}, {y:.1f}) outside "
                f"the {width}x{height} image)")
    return None


def align_folder(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    template: str = "sphereface",
    detector: Callable[[np.ndarray], list[Face]] | None = None,
    landmarks: dict[str, list[np.ndarray]] | None = None,
    all_faces: bool = False,
    on_no_face: str = "skip",
    num_workers: int = 2,
    min_face_size: int = 20,
    progress: bool = True,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
) -> AlignSummary:
    """Aligns every image under `input_dir` into `output_dir`, same layout.

    Each image's largest face (by box area; with landmarks from a file, the
    first listed) or, with `all_faces`, every face (`<name>_<k>.<ext>`) is
    warped to `template`. Images without a face are listed in
    `<output_dir>/no_face.txt` (path, tab, what was done) with
    `on_no_face`: "skip" (nothing written) or "center_crop" (the centred
    crop of the template's aspect, resized); so are, skipped, images that
    do not decode, images of more than `max_pixels` pixels (width x height,
    read from the header before decoding; None: no budget), and faces whose
    landmarks cannot give a crop (`degenerate_landmarks`; with `all_faces`,
    the other faces are written).

    Never writes into `input_dir`, nor through a link out of
    `output_dir`; crops get the usual file mode (0666 less the umask).
    Resumable: an image whose output exists
    (every crop is written to a temporary file and renamed; with
    `all_faces`, `<name>_0` last) or that no_face.txt lists is not
    processed again, so rerunning after an interruption finishes the rest.

    Args:
        detector: a callable image → [`Face`]; default, when `landmarks`
            is None and some image is left to do,
            `MtcnnDetector(min_face_size)`.
        landmarks: {path relative to `input_dir` (posix): [(5, 2) points]}
            (`read_landmarks_file`); images not in it count as no face.
        num_workers: images processed at once (threads).

    Raises:
        FileNotFoundError, ValueError: a missing input, overlapping folders,
            a bad setting, or a landmarks entry naming no file.
    """
    input_dir, output_dir = pathlib.Path(input_dir), pathlib.Path(output_dir)
    _check_folders(input_dir, output_dir)
    size, points = template_points(template)
    if on_no_face not in NO_FACE_ACTIONS:
        raise ValueError(
            f"`on_no_face` must be one of {NO_FACE_ACTIONS}. "
            f"Received: on_no_face={on_no_face!r}"
        )
    if not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(
            f"`num_workers` must be an integer >= 1. "
            f"Received: num_workers={num_workers!r}"
        )
    if max_pixels is not None and (
        not isinstance(max_pixels, int) or max_pixels < 1
    ):
        raise ValueError(
            f"`max_pixels` must be None or an integer >= 1. "
            f"Received: max_pixels={max_pixels!r}"
        )
    files = sorted(
        p.relative_to(input_dir) for p in input_dir.rglob("*")
        if p.is_file() and is_image_file(p.name)
        and not any(part.startswith(".") for part in
                    p.relative_to(input_dir).parts)
    )
    if landmarks is not None:
        known = {f.as_posix() for f in files}
        missing = sorted(set(landmarks) - known)
        if missing:
            raise ValueError(
                f"The landmarks name images that are not under {input_dir} "
                f"({len(missing)}, e.g. {missing[:3]}); paths are relative "
                "to --input_dir."
            )
    output_dir.mkdir(parents=True, exist_ok=True)
    # Before any work: a sub-folder linked out of the output is refused.
    for folder in sorted({f.parent for f in files}):
        _check_inside(output_dir / folder / "x", output_dir)
    no_face_path = output_dir / NO_FACE_FILE
    listed = set()
    if no_face_path.is_file():
        for line in no_face_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                listed.add(line.split("\t")[0])
    summary = AlignSummary(images=len(files))
    todo = []
    for relative in files:
        first = output_dir / _output_names(relative, 1, all_faces)[0]
        if first.is_file() or relative.as_posix() in listed:
            summary.already_done += 1
        else:
            todo.append(relative)
    if landmarks is None and detector is None and todo:
        detector = MtcnnDetector(min_face_size)

    def process(relative):
        try:
            with Image.open(input_dir / relative) as opened:
                # Image.open has read the header only: the size is known
                # before any pixel is decoded.
                width, height = opened.size
                if max_pixels is not None and width * height > max_pixels:
                    return relative, (
                        f"too large ({width}x{height} pixels, more than "
                        f"--max_image_pixels={max_pixels}), skipped"
                    )
                # Pixels as shown (a phone's EXIF rotation applied), as
                # OpenCV's imread reads them for insightface's landmarks.
                opened = ImageOps.exif_transpose(opened)
                image = np.asarray(opened.convert("RGB"))
        except Exception as error:  # Pillow raises many types (SyntaxError)
            return relative, f"unreadable ({type(error).__name__}), skipped"
        if landmarks is not None:
            faces = [Face((0, 0, 0, 0), 1.0, p)
                     for p in landmarks.get(relative.as_posix(), [])]
        else:
            faces = sorted(detector(image), key=lambda f: -f.area)
        if not faces:
            if on_no_face == "center_crop":
                name = _output_names(relative, 1, all_faces)[0]
                _write_image(_centre_crop(image, size), output_dir / name,
                             output_dir)
                return relative, "no face: centre crop written"
            return relative, "no face: skipped"
        if not all_faces:
            faces = faces[:1]
        reasons = [degenerate_landmarks(f.landmarks, image.shape)
                   for f in faces]
        faces = [f for f, why in zip(faces, reasons) if why is None]
        if not faces:
            return relative, f"{next(filter(None, reasons))}: skipped"
        stacked = np.stack([f.landmarks for f in faces])
        crops = warp(
            np.broadcast_to(image, (len(faces),) + image.shape),
            similarity_transform(stacked, points),
            size,
        ).numpy()
        names = _output_names(relative, len(faces), all_faces)
        # <name>_0 last: its presence says the image is done.
        for crop, name in reversed(list(zip(crops, names))):
            _write_image(crop, output_dir / name, output_dir)
        dropped = [why for why in reasons if why is not None]
        if dropped:
            return relative, (len(faces), (
                f"{len(dropped)} of {len(reasons)} faces not written: "
                f"{dropped[0]}"
            ))
        return relative, len(faces)

    from ring_loss_tf.data.kanji import Progress

    bar = Progress(len(todo), f"Aligning {len(todo)} images", progress)
    with open(no_face_path, "a", encoding="utf-8") as log, \
            concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
        for relative, outcome in pool.map(process, todo):
            if isinstance(outcome, tuple):  # some faces were left out
                outcome, note = outcome
                log.write(f"{relative.as_posix()}\t{note}\n")
                log.flush()
            if isinstance(outcome, int):
                summary.aligned += 1
                summary.faces_written += outcome
            else:
                summary.no_face.append(relative.as_posix())
                log.write(f"{relative.as_posix()}\t{outcome}\n")
                log.flush()
            bar.update(1)
    return summary


if __name__ == "__main__":
    from ring_loss_tf.commands import align as _command

    _command.run()
