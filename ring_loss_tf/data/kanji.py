"""The embedded default data set: synthetic handwriting of KanjiVG characters.

No face data set of useful size ships in any package, and nothing may be
downloaded at run time, so the default data set is an open-set identity
problem built from real data a package installs: the stroke data of the 6,413
CJK characters of KanjiVG (`pip install kanjivg`; CC BY-SA 3.0, (c) Ulrich
Apel, https://kanjivg.tagaini.net). Each character is an identity; each sample
redraws its strokes as a new seeded "hand":

    global affine     rotation, scale, aspect, shear and shift of the glyph
    per stroke        a small affine jitter about the stroke's centre and a
                      smooth wobble along the stroke
    everywhere        a smooth random displacement field
    pen and paper     pen width, blur, ink and background levels, noise

rendered with Pillow at `SUPERSAMPLE` times the output size and downsampled
(32x32 grey by default).

Every image is a pure function of (seed, split, identity, sample index): the
same settings give byte-identical files. `prepare` generates the set once, in
parallel over the cores, into a cache directory keyed by a hash of the
settings (written to a temporary directory, then renamed, so a half-written
cache is never used) and returns its root, laid out as ordinary data so every
reader and evaluation protocol of `ring_loss_tf.data.pipeline` runs on it:

    root/train/<identity>/<nnnn>.png               training identities
    root/test/<identity>/<identity>_<nnnn>.png     LFW layout, unseen identities
    root/pairs.txt                                 LFW pairs.txt over root/test
    root/identification/gallery/<identity>/*.png   first test sample of half of
    root/identification/probes/<identity>/*.png    the test identities, the
    root/identification/distractors/<identity>/*.png  rest; the other half
    root/settings.json                             the settings that made it

Identities are named after their code point (`U4E00` for 一).

Over 600 lines: the stroke parser, the renderer, the seeded hands and
the cached layout make one generator whose cache key covers all of them; a
split would let one change without the key.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import io
import json
import math
import os
import pathlib
import re
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFilter

# `prepare` keeps each generated set there.
from ring_loss_tf.layouts import default_cache_dir  # noqa: F401

# Bump when the renderer or the layout changes: it is part of the cache key.
GENERATOR_VERSION = 1

# KanjiVG's drawing grid (viewBox 0 0 109 109).
GRID_SIZE = 109.0

# Strokes are drawn at this multiple of the output size, then box-filtered.
SUPERSAMPLE = 3

# Points per flattened Bezier segment.
_BEZIER_POINTS = 8

# The split codes mixed into each sample's seed.
_SPLIT_CODES = {"train": 0, "test": 1}

DEFAULT_NUM_TRAIN_IDENTITIES = 1000
DEFAULT_NUM_TEST_IDENTITIES = 500
DEFAULT_TRAIN_SAMPLES_PER_IDENTITY = 40
DEFAULT_TEST_SAMPLES_PER_IDENTITY = 10
DEFAULT_PAIRS_PER_FOLD = 1000


_TOKEN = re.compile(
    r"([MmCcSsLlHhVvZz])|([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
)
_ARITY = {"M": 2, "L": 2, "H": 1, "V": 1, "C": 6, "S": 4, "Z": 0}
_PATH_DATA = re.compile(r'<path\b[^>]*?\sd="([^"]*)"')


# --------------------------------------------------------------------------
# SVG path parsing


def _bernstein(num_points):
    t = np.linspace(0.0, 1.0, num_points + 1)[1:, None]
    s = 1.0 - t
    return np.concatenate([s**3, 3 * s**2 * t, 3 * s * t**2, t**3], axis=1)


_BERNSTEIN = _bernstein(_BEZIER_POINTS)


def _cubic(p0, p1, p2, p3):
    """Points of a cubic Bezier at t = 1/n, ..., 1 (p0 excluded), (n, 2)."""
    return _BERNSTEIN @ np.array([p0, p1, p2, p3])


def parse_path(d: str) -> list[np.ndarray]:
    """Flattens an SVG path `d` attribute into polylines.

    Supports the commands KanjiVG uses and their neighbours: M, C, S, L, H,
    V, Z, each absolute (upper case) or relative (lower case), with implicit
    repetition (extra coordinates repeat the command; after M they are L).
    Cubic Beziers are flattened to `_BEZIER_POINTS` points per segment.

    Args:
        d: the path data, e.g. "M11,54.25c3.19,0.62,6.25,0.75,9.73,0.5".

    Returns:
        One float64 array of shape (num_points, 2) per subpath (a new subpath
        starts at each M), in the path's coordinates.

    Raises:
        ValueError: an unknown command or character, missing coordinates,
            or numbers after Z; the message shows `d`.
    """
    tokens = _TOKEN.findall(d.replace(",", " "))
    leftover = _TOKEN.sub("", d.replace(",", " ")).strip()
    if leftover:
        raise ValueError(
            f"SVG path data has characters outside M, C, S, L, H, V, Z and "
            f"numbers: {leftover[:20]!r}. Received: d={d!r}"
        )
    subpaths: list[list[np.ndarray]] = []
    current = np.zeros(2)
    start = np.zeros(2)
    last_control = None  # second control point of the previous C/S
    command = None
    i = 0
    while i < len(tokens):
        letter, number = tokens[i]
        if letter:
            command = letter
            i += 1
            if command in "Zz":
                if subpaths:
                    subpaths[-1].append(start[None].copy())
                current = start.copy()
                last_control = None
                continue
        elif command is None:
            raise ValueError(
                "SVG path data must start with a command (M). "
                f"Received: d={d!r}"
            )
        elif command in "Zz":
            # A closepath takes no numbers (and repeating it would not
            # consume them: without this check the loop never ends).
            raise ValueError(
                f"SVG path data has a number after {command!r}, which takes "
                f"none; start a new subpath with M. Received: d={d!r}"
            )
        arity = _ARITY[command.upper()]
        values = [tok[1] for tok in tokens[i : i + arity]]
        if len(values) < arity or any(not v for v in values):
            raise ValueError(
                f"SVG path command {command!r} needs {arity} numbers. "
                f"Received: d={d!r}"
            )
        values = np.asarray([float(v) for v in values])
        i += arity
        relative = command.islower()
        upper = command.upper()
        if upper == "M":
            point = current + values if relative else values
            subpaths.append([point[None].copy()])
            current = point
            start = point.copy()
            last_control = None
            # Further coordinate pairs after a moveto are linetos.
            command = "l" if relative else "L"
            continue
        if not subpaths:
            subpaths.append([current[None].copy()])
        if upper == "L":
            point = current + values if relative else values
            subpaths[-1].append(point[None])
            current = point
            last_control = None
        elif upper == "H":
            point = current.copy()
            point[0] = current[0] + values[0] if relative else values[0]
            subpaths[-1].append(point[None])
            current = point
            last_control = None
        elif upper == "V":
            point = current.copy()
            point[1] = current[1] + values[0] if relative else values[0]
            subpaths[-1].append(point[None])
            current = point
            last_control = None
        elif upper == "C":
            offset = current if relative else 0.0
            p1, p2, p3 = values.reshape(3, 2) + offset
            subpaths[-1].append(_cubic(current, p1, p2, p3))
            last_control = p2
            current = p3
        else:  # S: the first control point reflects the previous one
            offset = current if relative else 0.0
            p2, p3 = values.reshape(2, 2) + offset
            p1 = current if last_control is None else 2 * current - last_control
            subpaths[-1].append(_cubic(current, p1, p2, p3))
            last_control = p2
            current = p3
    return [np.concatenate(parts) for parts in subpaths]


def load_strokes(svg_path: str | os.PathLike) -> list[np.ndarray]:
    """The strokes of one KanjiVG file as polylines on the 109x109 grid.

    Returns one (num_points, 2) float64 array per stroke, in stroke order
    (the document order of the `path` elements).

    Raises:
        FileNotFoundError: (an OSError) the file cannot be opened.
        ValueError: the file is not UTF-8, has no stroke path, or a path's
            data does not parse; the message names the file (and the line).
    """
    # A regular expression is 20x faster than an XML parser on these files,
    # whose only `path` elements are the strokes.
    fix = "Reinstall the package: `pip install --force-reinstall kanjivg`."
    raw = pathlib.Path(svg_path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"KanjiVG file {svg_path} is not UTF-8 text (byte "
            f"{error.start}: {error.reason}). {fix}"
        ) from None
    strokes = []
    for match in _PATH_DATA.finditer(text):
        try:
            strokes.extend(parse_path(match.group(1)))
        except ValueError as error:
            line = text.count("\n", 0, match.start()) + 1
            raise ValueError(
                f"KanjiVG file {svg_path} line {line}: {error} {fix}"
            ) from None
    if not strokes:
        raise ValueError(
            f"No stroke paths (<path d=...>) in KanjiVG file {svg_path}. "
            + fix
        )
    return strokes


@functools.lru_cache(maxsize=1)
def character_files() -> dict[int, pathlib.Path]:
    """Code point -> SVG file of every CJK unified ideograph in KanjiVG.

    The files are located through the installed distribution's file list
    (kanji/<5 hex digits>.svg; variants such as `-Kaisho` are left out), so
    no path is hard-coded. Raises a RuntimeError naming the fix if the
    `kanjivg` package is not installed.
    """
    try:
        distribution = importlib.metadata.distribution("kanjivg")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            "The default data set needs the KanjiVG stroke data: "
            "`pip install kanjivg`, or pass a data directory instead."
        ) from None
    pattern = re.compile(r"kanji/([0-9a-f]{5})\.svg")
    files = {}
    for file in distribution.files or ():
        match = pattern.fullmatch(str(file).replace(os.sep, "/"))
        if match:
            codepoint = int(match.group(1), 16)
            if 0x4E00 <= codepoint <= 0x9FFF:
                files[codepoint] = pathlib.Path(distribution.locate_file(file))
    if not files:
        raise RuntimeError(
            "The installed `kanjivg` distribution lists no kanji/*.svg files; "
            "reinstall it: `pip install --force-reinstall kanjivg`."
        )
    return dict(sorted(files.items()))


def identity_name(codepoint: int) -> str:
    """Folder name of a character identity: `U4E00` for U+4E00."""
    return f"U{codepoint:04X}"


@functools.lru_cache(maxsize=4096)
def _strokes_of(codepoint: int) -> tuple[np.ndarray, np.ndarray]:
    return _as_packed(load_strokes(character_files()[codepoint]))


# --------------------------------------------------------------------------
# Rendering


def _sample_rng(seed: int, split: str, codepoint: int, sample: int):
    return np.random.default_rng(
        np.random.SeedSequence([seed, _SPLIT_CODES[split], codepoint, sample])
    )


def _affine(rotation, scale_x, scale_y, shear):
    c, s = math.cos(rotation), math.sin(rotation)
    rotate = np.array([[c, -s], [s, c]])
    return rotate @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag(
        [scale_x, scale_y]
    )


def render_strokes(
    strokes, rng: np.random.Generator, image_size: int = 32
) -> np.ndarray:
    """Draws strokes as one random hand: a (image_size, image_size) uint8.

    The random draws (units: the 109 grid unless said otherwise): global
    rotation N(0, 6 deg), scale U(0.78, 1.02), aspect exp N(0, 0.08), shear
    N(0, 0.12), shift N(0, 4); a displacement field of 3 random sinusoids of
    amplitude about U(0, 1.6); per stroke, rotation N(0, 4 deg), scales
    exp N(0, 0.07), shift N(0, 1.8) and a half-sine wobble of amplitude about
    U(0, 1.2) along the stroke; pen width U(2.2, 5.0); blur radius U(0, 0.7)
    output pixels; ink U(0, 90) and background U(160, 255) grey levels;
    Gaussian noise of sigma U(0, 10) levels. Dark ink on light paper.
    """
    points, starts = _as_packed(strokes)
    num_strokes = len(starts) - 1
    canvas_size = image_size * SUPERSAMPLE
    centre = GRID_SIZE / 2
    g = rng.normal(0, 1, size=8)
    u = rng.uniform(0, 1, size=9)
    s = rng.normal(0, 1, size=(num_strokes, 7))
    v = rng.uniform(0, 1, size=(num_strokes, 2))

    aspect = math.exp(0.08 * g[0])
    scale = 0.78 + 0.24 * u[0]
    matrix = _affine(
        math.radians(6 * g[1]), scale * aspect, scale / aspect, 0.12 * g[2]
    )
    shift = 4 * g[3:5]
    field_freq = 0.06 * rng.normal(0, 1, size=(3, 2))
    field_phase = 2 * math.pi * u[1:4]
    field_amp = 1.6 * u[4] * rng.normal(0, 1, size=(3, 2)) / 1.7
    pen = 2.2 + 2.8 * u[5]

    # Per-stroke affine jitter about each stroke's centre, vectorised.
    index = np.repeat(np.arange(num_strokes), np.diff(starts))
    angle = np.radians(4 * s[:, 0])
    cos, sin = np.cos(angle), np.sin(angle)
    scale_x, scale_y = np.exp(0.07 * s[:, 1]), np.exp(0.07 * s[:, 2])
    jitter = np.stack(
        [cos * scale_x, -sin * scale_y, sin * scale_x, cos * scale_y], axis=1
    ).reshape(num_strokes, 2, 2)
    stroke_centre = np.add.reduceat(points, starts[:-1]) / np.diff(starts)[
        :, None
    ]
    local = points - stroke_centre[index]
    p = np.einsum("nij,nj->ni", jitter[index], local) + stroke_centre[index]
    p += 1.8 * s[index, 3:5]
    # Wobble: a half sine along each stroke's point index.
    position = np.arange(len(points)) - starts[index]
    length = np.maximum(np.diff(starts) - 1, 1)[index]
    wobble = np.sin(math.pi * position / length + 2 * math.pi * v[index, 0])
    p += (1.2 * v[index, 1] / 1.4)[:, None] * s[index, 5:7] * wobble[:, None]
    p += np.sin(p @ field_freq.T + field_phase) @ field_amp
    p = ((p - centre) @ matrix.T + centre + shift) * (canvas_size / GRID_SIZE)

    mask = Image.new("L", (canvas_size, canvas_size), 0)
    draw = ImageDraw.Draw(mask)
    width = max(1, int(round(pen * canvas_size / GRID_SIZE)))
    radius = width / 2
    flat = p.tolist()
    for k in range(num_strokes):
        xy = [tuple(q) for q in flat[starts[k] : starts[k + 1]]]
        if len(xy) > 1:
            draw.line(xy, fill=255, width=width, joint="curve")
        # Round caps: Pillow's lines end square.
        for x, y in (xy[0], xy[-1]):
            draw.ellipse(
                (x - radius, y - radius, x + radius, y + radius), fill=255
            )
    small = mask.reduce(SUPERSAMPLE)
    blur = float(0.7 * u[6])
    if blur > 0.05:
        small = small.filter(ImageFilter.GaussianBlur(blur))
    ink, background = 90 * u[7], 160 + 95 * u[8]
    alpha = np.asarray(small, dtype=np.float32) / 255.0
    image = background + (ink - background) * alpha
    image += rng.normal(0, 10 * rng.uniform(), size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _as_packed(strokes):
    """(all points (n, 2), stroke start offsets (num_strokes + 1,))."""
    if isinstance(strokes, tuple) and len(strokes) == 2 and isinstance(
        strokes[1], np.ndarray
    ) and strokes[1].dtype.kind == "i":
        return strokes
    points = np.concatenate(strokes)
    starts = np.cumsum([0] + [len(stroke) for stroke in strokes])
    return points, starts


def render_sample(
    codepoint: int, *, seed: int, split: str, sample: int, image_size: int
) -> np.ndarray:
    """One sample: a pure function of (seed, split, identity, sample index).

    Returns a (image_size, image_size) uint8 grey image of the character
    with code point `codepoint`.
    """
    rng = _sample_rng(seed, split, codepoint, sample)
    return render_strokes(_strokes_of(codepoint), rng, image_size)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 grey image (deterministic for given pixels)."""
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------
# Splits and generation


def split_identities(
    seed: int, num_train_identities: int, num_test_identities: int
) -> tuple[list[int], list[int]]:
    """Disjoint (train, test) code point lists from a seeded shuffle."""
    codepoints = np.array(list(character_files()), dtype=np.int64)
    total = num_train_identities + num_test_identities
    if num_train_identities < 1 or num_test_identities < 2:
        raise ValueError(
            "The default data set needs >= 1 training and >= 2 test "
            "identities. Received: "
            f"num_train_identities={num_train_identities}, "
            f"num_test_identities={num_test_identities}"
        )
    if total > len(codepoints):
        raise ValueError(
            f"KanjiVG has {len(codepoints)} characters; the training and test "
            f"identities together must not exceed that. Received: "
            f"num_train_identities={num_train_identities}, "
            f"num_test_identities={num_test_identities}"
        )
    order = np.random.default_rng(
        np.random.SeedSequence([seed, 0x5EED])
    ).permutation(len(codepoints))
    chosen = codepoints[order[:total]].tolist()
    return chosen[:num_train_identities], chosen[num_train_identities:]


def _render_chunk(task):
    """Worker: renders and writes one chunk of samples; returns its size."""
    directory, seed, split, codepoint, samples, image_size, names = task
    for sample, name in zip(samples, names):
        image = render_sample(
            codepoint, seed=seed, split=split, sample=sample,
            image_size=image_size,
        )
        with open(os.path.join(directory, name), "wb") as file:
            file.write(encode_png(image))
    return len(samples)


class Progress:
    """Progress on stderr (no dependency): a bar redrawn in place on a
    terminal; in a log file (not a TTY), one plain line per tenth."""

    def __init__(self, total, label, enabled):
        self.total, self.label, self.enabled = total, label, enabled
        self.done, self.start, self.last = 0, time.monotonic(), 0.0
        self.tty = enabled and sys.stderr.isatty()
        self.tenths_written = 0

    def update(self, n):
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        fraction = self.done / max(self.total, 1)
        elapsed = now - self.start
        eta = elapsed / max(fraction, 1e-9) - elapsed
        status = (f"{self.done}/{self.total} {elapsed:5.1f}s elapsed, "
                  f"{eta:5.1f}s left")
        if not self.tty:
            tenths = int(10 * fraction)
            if tenths > self.tenths_written:
                self.tenths_written = tenths
                sys.stderr.write(f"{self.label}: {status}\n")
                sys.stderr.flush()
            return
        if now - self.last > 0.2 or self.done == self.total:
            self.last = now
            bar = "#" * int(30 * fraction)
            sys.stderr.write(f"\r{self.label} [{bar:<30}] {status}")
            if self.done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def _worker_count(num_workers):
    if num_workers is None:
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:
            return max(1, os.cpu_count() or 1)
    if num_workers < 1:
        raise ValueError(
            f"`num_workers` must be >= 1 or None (all cores). "
            f"Received: num_workers={num_workers}"
        )
    return num_workers


def _run_tasks(tasks, total, num_workers, progress):
    bar = Progress(total, "Generating the KanjiVG data set", progress)
    if num_workers == 1:
        for task in tasks:
            bar.update(_render_chunk(task))
        return
    import multiprocessing

    # fork: children need only numpy and Pillow, and spawning would import
    # the package (and Keras) again in each worker.
    methods = multiprocessing.get_all_start_methods()
    method = "fork" if "fork" in methods else None
    context = multiprocessing.get_context(method)
    with context.Pool(num_workers) as pool:
        for n in pool.imap_unordered(_render_chunk, tasks, chunksize=1):
            bar.update(n)


def check_integers(checks) -> None:
    """Raises ValueError naming the first (name, value, minimum) whose value
    is not an integer >= minimum."""
    for name, value, minimum in checks:
        if not isinstance(value, (int, np.integer)) or value < minimum:
            raise ValueError(
                f"`{name}` must be an integer >= {minimum}. "
                f"Received: {name}={value!r}"
            )


def settings_hash(settings: dict) -> str:
    """The cache key: a hash of the settings, the generator and KanjiVG."""
    payload = dict(settings)
    payload["generator_version"] = GENERATOR_VERSION
    payload["kanjivg_version"] = importlib.metadata.version("kanjivg")
    text = json.dumps(payload, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def prepare(
    *,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    num_train_identities: int = DEFAULT_NUM_TRAIN_IDENTITIES,
    num_test_identities: int = DEFAULT_NUM_TEST_IDENTITIES,
    train_samples_per_identity: int = DEFAULT_TRAIN_SAMPLES_PER_IDENTITY,
    test_samples_per_identity: int = DEFAULT_TEST_SAMPLES_PER_IDENTITY,
    image_size: int = 32,
    num_workers: int | None = None,
    progress: bool = True,
    pairs_per_fold: int = DEFAULT_PAIRS_PER_FOLD,
) -> pathlib.Path:
    """Generates the default data set once and returns its root directory.

    See the module docstring for the layout. The defaults (1,000 training
    characters x 40 samples, 500 test characters x 10, 32x32) generate in
    about a minute on 2 cores. The pairs file has 10 folds of
    `pairs_per_fold` genuine and as many impostor pairs (fewer if the test
    set is too small to have that many distinct genuine pairs).

    Args:
        cache_dir: where data sets are kept; default `default_cache_dir()`.
        seed: selects the identities and every sample's hand.
        num_train_identities, num_test_identities: disjoint character sets.
        train_samples_per_identity, test_samples_per_identity: images per
            character (test needs >= 2 for genuine pairs).
        image_size: side of the square grey images, in pixels.
        num_workers: processes; default all usable cores.
        progress: draw a progress bar on stderr.
        pairs_per_fold: genuine (and impostor) pairs per fold of pairs.txt.

    Returns:
        The root directory (`<cache_dir>/kanji-<hash>`).
    """
    from ring_loss_tf.data import eval_sets  # imports TensorFlow: only here

    check_integers([
        ("train_samples_per_identity", train_samples_per_identity, 1),
        ("test_samples_per_identity", test_samples_per_identity, 2),
        ("image_size", image_size, 8),
        ("pairs_per_fold", pairs_per_fold, 1),
    ])
    num_workers = _worker_count(num_workers)
    settings = dict(
        seed=int(seed),
        num_train_identities=int(num_train_identities),
        num_test_identities=int(num_test_identities),
        train_samples_per_identity=int(train_samples_per_identity),
        test_samples_per_identity=int(test_samples_per_identity),
        image_size=int(image_size),
        pairs_per_fold=int(pairs_per_fold),
    )
    cache_dir = pathlib.Path(cache_dir or default_cache_dir()).expanduser()
    root = cache_dir / f"kanji-{settings_hash(settings)}"
    if (root / "settings.json").is_file():
        return root
    train_ids, test_ids = split_identities(
        seed, num_train_identities, num_test_identities
    )
    with staged_directory(root) as temporary:
        tasks, total = [], 0
        for split, ids, count in [
            ("train", train_ids, train_samples_per_identity),
            ("test", test_ids, test_samples_per_identity),
        ]:
            for codepoint in ids:
                name = identity_name(codepoint)
                directory = temporary / split / name
                directory.mkdir(parents=True)
                if split == "train":
                    names = [f"{n:04d}.png" for n in range(count)]
                else:  # LFW numbering starts at 1
                    names = [f"{name}_{n + 1:04d}.png" for n in range(count)]
                tasks.append(
                    (str(directory), int(seed), split, codepoint,
                     list(range(count)), int(image_size), names)
                )
                total += count
        started = time.monotonic()
        _run_tasks(tasks, total, num_workers, progress)
        _write_identification(temporary, test_ids)
        folds = 10
        genuine_available = num_test_identities * math.comb(
            test_samples_per_identity, 2
        )
        eval_sets.make_pairs_file(
            temporary / "test",
            temporary / "pairs.txt",
            num_folds=folds,
            pairs_per_fold=max(1, min(pairs_per_fold,
                                      genuine_available // folds // 2)),
            seed=seed,
        )
        settings["generation_seconds"] = round(time.monotonic() - started, 2)
        settings["num_workers"] = num_workers
        settings["source"] = (
            "KanjiVG (CC BY-SA 3.0, Ulrich Apel, https://kanjivg.tagaini.net)"
        )
        (temporary / "settings.json").write_text(
            json.dumps(settings, indent=2) + "\n"
        )
    return root


@contextlib.contextmanager
def staged_directory(root: pathlib.Path):
    """A temporary directory beside `root`, renamed to `root` at the end.

    A generated set is never seen half written: it appears under its name
    whole, once its `settings.json` is in, or not at all (on an error the
    temporary directory is removed). If another process renamed the same
    set into place first, its copy is kept and this one removed.
    """
    root.parent.mkdir(parents=True, exist_ok=True)
    temporary = pathlib.Path(
        tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent)
    )
    try:
        yield temporary
        try:
            os.rename(temporary, root)
        except OSError:
            if not (root / "settings.json").is_file():
                raise
            # Another process finished the same set first: use theirs.
            shutil.rmtree(temporary, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _write_identification(root: pathlib.Path, test_ids: list[int]) -> None:
    """Gallery, probes and distractors copied from the test split.

    The first half of the test identities (in their seeded order) form the
    gallery (their first sample) and the probes (their other samples); the
    second half are distractors (all their samples).
    """
    half = max(1, len(test_ids) // 2)
    for index, codepoint in enumerate(test_ids):
        name = identity_name(codepoint)
        files = sorted((root / "test" / name).iterdir())
        if index < half:
            targets = [("gallery", files[:1]), ("probes", files[1:])]
        else:
            targets = [("distractors", files)]
        for part, chosen in targets:
            directory = root / "identification" / part / name
            directory.mkdir(parents=True)
            for file in chosen:
                shutil.copyfile(file, directory / file.name)
