"""Evaluation data: verification pairs and identification folders.

Verification sets come as LFW-format directories with a `pairs.txt`
(`read_lfw_pairs`; `make_pairs_file` writes one for any folder-per-identity
set) or as insightface `.bin` files (`read_bin`, with a restricted unpickler
that cannot run code); both give a `VerificationSet`. Identification
galleries, probes and distractors are image folders (`read_image_folder`).
Images are loaded with `ring_loss_tf.data.pipeline.load_images`, the training
pipeline's decoding and resizing.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pathlib
import pickle
import re
import warnings

import numpy as np
import tensorflow as tf

from ring_loss_tf.data import pipeline
from ring_loss_tf.data.images import is_image_file

_PAIRS_FORMAT = (
    "format: a header 'num_folds pairs_per_fold', then per fold "
    "pairs_per_fold lines 'name n1 n2' (same identity) and as many "
    "'name1 n1 name2 n2' (different identities)"
)


def ordinal(n: int) -> str:
    """1 -> '1st', 2 -> '2nd', 3 -> '3rd', 11 -> '11th', 21 -> '21st'."""
    n = int(n)
    suffix = {1: "st", 2: "nd", 3: "rd"}.get(abs(n) % 10, "th")
    if abs(n) % 100 in (11, 12, 13):
        suffix = "th"
    return f"{n}{suffix}"


# --------------------------------------------------------------------------
# Identification: folders of images


def read_image_folder(
    root: str | os.PathLike,
    *,
    image_size: tuple[int, int] | None = None,
    channels: int | None = None,
    load: bool = True,
) -> tuple[np.ndarray | list[str], np.ndarray, list[str]]:
    """A folder per identity as (images, labels int32, class_names).

    For the gallery, probes and distractors of identification. `images` is a
    uint8 (N, h, w, c) array (see `pipeline.load_images`), or with `load=False`
    the list of file paths.
    """
    paths, labels, class_names = pipeline.list_image_folder(root)
    if not load:
        return paths, labels, class_names
    images = pipeline.load_images(
        paths, image_size=image_size, channels=channels
    )
    return images, labels, class_names


# --------------------------------------------------------------------------
# Verification sets


@dataclasses.dataclass
class VerificationSet:
    """Pairs of images to verify.

    Attributes:
        images: uint8 (N, H, W, C), each distinct image once.
        left, right: int (P,) indices into `images` of each pair.
        issame: bool (P,), whether the pair shows one identity.
        fold: int (P,), the fold (0 .. num_folds - 1) of each pair.
        names: (N,) where each image came from (path or "<file> image i").
    """

    images: np.ndarray
    left: np.ndarray
    right: np.ndarray
    issame: np.ndarray
    fold: np.ndarray
    names: list[str] = dataclasses.field(default_factory=list)

    @property
    def num_folds(self) -> int:
        return int(self.fold.max()) + 1 if len(self.fold) else 0


_LFW_NAME = re.compile(r"(.+)_(\d+)$")


def _lfw_numbering(directory: pathlib.Path) -> dict[int, pathlib.Path]:
    """Number -> file of one identity folder.

    Files named `<identity>_<nnnn>.<ext>` (LFW) keep their number; a folder
    with no such file is numbered by sorted position from 1; a mix is an
    error (the numbers would be ambiguous).
    """
    files = sorted(
        p for p in directory.iterdir() if is_image_file(p.name) and p.is_file()
    )
    numbered = {}
    for file in files:
        match = _LFW_NAME.fullmatch(file.stem)
        if match and match.group(1) == directory.name:
            numbered[int(match.group(2))] = file
    if numbered and len(numbered) != len(files):
        raise ValueError(
            f"{directory} mixes LFW-named files (<identity>_<nnnn>.<ext>) "
            "with other names, so pair numbers are ambiguous; rename the "
            "files one way."
        )
    if numbered:
        return numbered
    return {n: file for n, file in enumerate(files, start=1)}


def parse_pairs_file(
    pairs_path: str | os.PathLike,
) -> list[tuple[str, int, str, int, int]]:
    """Parses an LFW pairs.txt: [(name1, n1, name2, n2, fold), ...].

    Header: "num_folds pairs_per_fold" (or one number: one fold); each fold
    has 2 x pairs_per_fold lines, "name n1 n2" for a genuine pair and
    "name1 n1 name2 n2" for an impostor pair, fields separated by tabs or
    spaces. A pair repeated (either way round) is kept, with one
    `DataWarning` naming the lines: it counts twice in the accuracy.

    Raises:
        FileNotFoundError: `pairs_path` is not a file.
        ValueError: an empty file, a bad header or pair line, a pair of an
            image with itself, or a pair count other than the header's; the
            message names the file, the line and the expected format.
    """
    pairs_path = pathlib.Path(pairs_path)
    if not pairs_path.is_file():
        raise FileNotFoundError(f"Pairs file not found: {pairs_path}")
    lines = [
        (number, line.split())
        for number, line in enumerate(
            pairs_path.read_text(encoding="utf-8", errors="replace")
            .splitlines(),
            start=1,
        )
        if line.strip()
    ]
    if not lines:
        raise ValueError(f"{pairs_path} is empty ({_PAIRS_FORMAT}).")
    header_number, header = lines[0]
    try:
        numbers = [int(v) for v in header]
        if len(numbers) not in (1, 2) or min(numbers) < 1:
            raise ValueError
    except ValueError:
        raise ValueError(
            f"{pairs_path} line {header_number}: expected the header "
            f"'num_folds pairs_per_fold', found {' '.join(header)!r} "
            f"({_PAIRS_FORMAT})."
        ) from None
    num_folds, per_fold = numbers if len(numbers) == 2 else (1, numbers[0])
    pairs = []
    first_line_of: dict[tuple, int] = {}
    repeats = []
    for index, (number, fields) in enumerate(lines[1:]):
        try:
            if len(fields) == 3:
                pair = (fields[0], int(fields[1]), fields[0], int(fields[2]))
            elif len(fields) == 4:
                pair = (fields[0], int(fields[1]), fields[2], int(fields[3]))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"{pairs_path} line {number}: expected 'name n1 n2' or "
                f"'name1 n1 name2 n2' with integer n, found "
                f"{' '.join(fields)!r} ({_PAIRS_FORMAT})."
            ) from None
        ends = tuple(sorted([pair[:2], pair[2:]]))
        if ends[0] == ends[1]:
            raise ValueError(
                f"{pairs_path} line {number}: {' '.join(fields)!r} pairs "
                f"image {pair[1]} of {pair[0]!r} with itself, a match "
                "whatever the model; name two different images "
                f"({_PAIRS_FORMAT})."
            )
        if ends in first_line_of:
            repeats.append((number, first_line_of[ends], fields))
        else:
            first_line_of[ends] = number
        pairs.append(pair + (index // (2 * per_fold),))
    expected = num_folds * 2 * per_fold
    if len(pairs) != expected:
        raise ValueError(
            f"{pairs_path}: the header (line {header_number}) promises "
            f"{num_folds} folds x 2 x {per_fold} = {expected} pairs, found "
            f"{len(pairs)} pair lines ({_PAIRS_FORMAT})."
        )
    if repeats:
        number, first, fields = repeats[0]
        warnings.warn(
            f"{pairs_path}: {len(repeats)} pair line(s) repeat an earlier "
            f"pair (first: line {number}, {' '.join(fields)!r}, is the pair "
            f"of line {first}); each repeat counts again in the accuracy. "
            "Replace the repeats with new pairs.",
            pipeline.DataWarning,
            stacklevel=2,
        )
    return pairs


def read_lfw_pairs(
    pairs_path: str | os.PathLike,
    lfw_dir: str | os.PathLike,
    *,
    image_size: tuple[int, int] | None = None,
    channels: int | None = None,
) -> VerificationSet:
    """An LFW-format verification set: pairs.txt over a folder per identity.

    Pair "name n" refers to `lfw_dir/name/name_<nnnn>.<ext>` (any image
    extension); in a folder without LFW-named files, to its n-th image in
    sorted order (as `make_pairs_file` writes for such folders). Each image
    is loaded once (see `pipeline.load_images` for `image_size` and
    `channels`).

    Raises:
        FileNotFoundError: `lfw_dir` is not a directory or `pairs_path` is
            not a file.
        ValueError: as `parse_pairs_file`, or a pair names an image that is
            not there (file and line named).
        tf.errors.InvalidArgumentError: an image does not decode (the file
            named).
    """
    lfw_dir = pathlib.Path(lfw_dir)
    if not lfw_dir.is_dir():
        raise FileNotFoundError(
            f"LFW image directory not found: {lfw_dir}. Pass the directory "
            "holding one folder per identity, <identity>/<identity>_<nnnn>"
            ".<ext>, that the pairs.txt names refer to (evaluate.py "
            "--lfw_dir=DIR --pairs=DIR/pairs.txt)."
        )
    pairs = parse_pairs_file(pairs_path)
    numbering: dict[str, dict[int, pathlib.Path]] = {}
    index_of: dict[pathlib.Path, int] = {}
    names: list[pathlib.Path] = []
    left, right, issame, fold = [], [], [], []
    lines = _pair_line_numbers(pairs_path)
    for (name1, n1, name2, n2, k), line in zip(pairs, lines):
        ends = []
        for name, n in ((name1, n1), (name2, n2)):
            if name not in numbering:
                if name in (".", "..") or "/" in name or os.sep in name:
                    raise ValueError(
                        f"{pairs_path} line {line}: {name!r} is not an "
                        f"identity folder name under {lfw_dir} (no '/', "
                        f"'.' or '..'); {_PAIRS_FORMAT}."
                    )
                directory = lfw_dir / name
                try:
                    is_dir = directory.is_dir()
                except OSError:  # e.g. a name too long for the file system
                    is_dir = False
                numbering[name] = _lfw_numbering(directory) if is_dir else {}
            file = numbering[name].get(n)
            if file is None:
                raise ValueError(
                    f"{pairs_path} line {line}: no image {n} of {name!r}: "
                    f"expected {lfw_dir / name / f'{name}_{n:04d}'}.<ext> "
                    f"(or the {ordinal(n)} image of that folder)."
                )
            if file not in index_of:
                index_of[file] = len(names)
                names.append(file)
            ends.append(index_of[file])
        left.append(ends[0])
        right.append(ends[1])
        issame.append(name1 == name2)
        fold.append(k)
    images = pipeline.load_images(
        names, image_size=image_size, channels=channels
    )
    return VerificationSet(
        images=images,
        left=np.asarray(left, np.int64),
        right=np.asarray(right, np.int64),
        issame=np.asarray(issame, bool),
        fold=np.asarray(fold, np.int64),
        names=[str(n) for n in names],
    )


def _pair_line_numbers(pairs_path) -> list[int]:
    text = pathlib.Path(pairs_path).read_text(
        encoding="utf-8", errors="replace"
    )
    numbers = [n for n, l in enumerate(text.splitlines(), 1) if l.strip()]
    return numbers[1:]


def make_pairs_file(
    root: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    num_folds: int = 10,
    pairs_per_fold: int = 300,
    seed: int = 0,
) -> pathlib.Path:
    """Writes an LFW-format pairs.txt for a folder-per-identity set.

    Each of the `num_folds` folds gets `pairs_per_fold` genuine pairs (two
    distinct images of one identity) and as many impostor pairs (images of
    two identities), no pair twice. With at least 2 x num_folds identities
    the folds are identity-disjoint, as in LFW (identities are dealt to the
    folds by a seeded shuffle); otherwise the pairs are drawn from all
    identities and dealt to the folds. Genuine pairs go round-robin over the
    identities so each contributes about equally. Numbers follow
    `_lfw_numbering` (LFW file numbers, or sorted position). The result is
    a pure function of the folder listing and `seed`.

    Returns:
        `output_path`, as a Path. Read it with `read_lfw_pairs(output_path,
        root)`.
    """
    root = pathlib.Path(root)
    for name, value in (("num_folds", num_folds),
                        ("pairs_per_fold", pairs_per_fold)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(
                f"`{name}` must be a positive integer. Received: {value!r}"
            )
    paths, labels, class_names = pipeline.list_image_folder(root)
    numbers = [
        sorted(_lfw_numbering(root / name)) for name in class_names
    ]
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xFA125]))
    order = rng.permutation(len(class_names))
    disjoint = len(class_names) >= 2 * num_folds
    if disjoint:
        groups = [order[k::num_folds] for k in range(num_folds)]
        wanted = pairs_per_fold
    else:
        groups = [order]
        wanted = pairs_per_fold * num_folds
    folds_genuine, folds_impostor = [], []
    for group in groups:
        genuine = _genuine_pairs(group, numbers, wanted, rng)
        impostor = _impostor_pairs(group, numbers, wanted, rng)
        if len(genuine) < wanted or len(impostor) < wanted:
            raise ValueError(
                f"{root} has too few images for {num_folds} folds of "
                f"{pairs_per_fold} genuine and impostor pairs"
                + (" (folds are identity-disjoint)" if disjoint else "")
                + f": found {len(genuine)} genuine and {len(impostor)} "
                "impostor pairs for a fold. Lower `pairs_per_fold`."
            )
        folds_genuine.append(genuine)
        folds_impostor.append(impostor)
    if not disjoint:
        g, i = folds_genuine[0], folds_impostor[0]
        folds_genuine = [g[k::num_folds] for k in range(num_folds)]
        folds_impostor = [i[k::num_folds] for k in range(num_folds)]
    lines = [f"{num_folds}\t{pairs_per_fold}"]
    for genuine, impostor in zip(folds_genuine, folds_impostor):
        for a, n1, n2 in genuine:
            lines.append(f"{class_names[a]}\t{n1}\t{n2}")
        for a, n1, b, n2 in impostor:
            lines.append(f"{class_names[a]}\t{n1}\t{class_names[b]}\t{n2}")
    output_path = pathlib.Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    output_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return output_path


def _genuine_pairs(group, numbers, wanted, rng):
    """Up to `wanted` distinct (identity, n1, n2), round-robin over group."""
    pools = {}
    for a in group:
        count = len(numbers[a])
        if count < 2:
            continue
        i, j = np.triu_indices(count, k=1)
        if len(i) > 200_000:  # sample a subset of a very large identity
            chosen = rng.choice(len(i), 200_000, replace=False)
            i, j = i[chosen], j[chosen]
        pick = rng.permutation(len(i))
        pools[int(a)] = collections.deque(zip(i[pick].tolist(),
                                              j[pick].tolist()))
    out = []
    while len(out) < wanted and pools:
        for a in list(pools):
            if len(out) == wanted:
                break
            i, j = pools[a].popleft()
            out.append((a, numbers[a][i], numbers[a][j]))
            if not pools[a]:
                del pools[a]
    return out


def _impostor_pairs(group, numbers, wanted, rng):
    """Up to `wanted` distinct (identity a, n1, identity b, n2), a != b."""
    group = [int(a) for a in group]
    if len(group) < 2:
        return []
    sizes = np.array([len(numbers[a]) for a in group])
    total = (sizes.sum() ** 2 - (sizes**2).sum()) // 2
    seen, out = set(), []
    attempts = 0
    while len(out) < min(wanted, total) and attempts < 50 * wanted + 1000:
        attempts += 1
        x, y = rng.choice(len(group), 2, replace=False)
        if x > y:
            x, y = y, x
        i = int(rng.integers(sizes[x]))
        j = int(rng.integers(sizes[y]))
        key = (x, i, y, j)
        if key in seen:
            continue
        seen.add(key)
        out.append((group[x], numbers[group[x]][i],
                    group[y], numbers[group[y]][j]))
    return out


# --------------------------------------------------------------------------
# insightface .bin verification sets


class UnsafePickleError(pickle.UnpicklingError):
    """A .bin file asked to load something other than plain data."""


def _latin1_encode(text, encoding="latin1"):
    # Python 3 pickles bytes at protocol < 3 as _codecs.encode(str, "latin1").
    if encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"refusing _codecs.encode with {encoding!r}")
    return text.encode("latin1")


def _empty_bytes(*args):
    # Python 3 pickles b"" at protocol < 3 as __builtin__.bytes().
    if args:
        raise UnsafePickleError("refusing bytes() with arguments")
    return b""


def _safe_dtype(*args, **kwargs):
    dtype = np.dtype(*args, **kwargs)
    if dtype.hasobject:
        raise UnsafePickleError("refusing a numpy array of Python objects")
    return dtype


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only bytes, str, numbers, lists, tuples, bools and numpy
    arrays of plain dtypes; any other global (a function, a class) is
    refused, so a malicious file cannot run code."""

    def find_class(self, module, name):
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise UnsafePickleError(
                f"refusing to load global {module}.{name}: a .bin may hold "
                "only bytes, lists, tuples, bools and numpy arrays"
            )
        return allowed()


def _numpy_reconstruct(cls, shape, dtype):
    if cls is not np.ndarray:
        raise UnsafePickleError(f"refusing to reconstruct {cls!r}")
    return np.ndarray.__new__(np.ndarray, shape, _safe_dtype(dtype))


def _numpy_scalar(dtype, data=None):
    dtype = _safe_dtype(dtype)
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError("numpy scalar without raw bytes")
    # A copy: a view would export the pickle's (possibly bytearray) buffer.
    return np.frombuffer(bytes(data), dtype=dtype, count=1)[0].copy()


_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: _safe_dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,
    ("__builtin__", "bytes"): lambda: _empty_bytes,
    ("builtins", "bytes"): lambda: _empty_bytes,
}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED_GLOBALS[(_module, "_reconstruct")] = lambda: _numpy_reconstruct
    _ALLOWED_GLOBALS[(_module, "scalar")] = lambda: _numpy_scalar
del _module


def _bin_images(path, bins) -> list[bytes]:
    """The encoded images of a .bin: bytes, or arrays of their bytes."""
    if not isinstance(bins, (list, tuple, np.ndarray)):
        raise ValueError(
            f"{path}: expected a list of encoded images as the first item of "
            f"(images, issame), found {type(bins).__name__}. {_BIN_FIX}"
        )
    out = []
    for i, item in enumerate(bins):
        if isinstance(item, (bytes, bytearray)):
            out.append(bytes(item))
        elif isinstance(item, np.ndarray) and item.dtype.kind in "biuf":
            out.append(item.tobytes())
        else:
            raise ValueError(
                f"{path}: image {i} is of type {type(item).__name__}, not "
                f"encoded image bytes. {_BIN_FIX}"
            )
    return out


def _bin_issame(path, issame) -> np.ndarray:
    """The same-identity flags of a .bin as a bool vector."""
    try:
        flags = np.asarray(issame) if isinstance(
            issame, (list, tuple, np.ndarray)) else None
    except (ValueError, TypeError, OverflowError):
        flags = None
    if flags is None or flags.ndim != 1 or (
        len(flags) and flags.dtype.kind not in "biu"
    ):
        raise ValueError(
            f"{path}: expected a list of booleans as the second item of "
            f"(images, issame), found {type(issame).__name__}"
            + (f" of {flags.dtype}, shape {flags.shape}"
               if flags is not None else "")
            + f". {_BIN_FIX}"
        )
    return flags.astype(bool)


_BIN_FIX = (
    "Use a .bin from insightface's datasets, or re-create it with their "
    "lfw2pack.py (a pickle of (images, issame))."
)


def read_bin(
    path: str | os.PathLike,
    *,
    image_size: tuple[int, int] | None = None,
    channels: int | None = None,
    num_folds: int = 10,
) -> VerificationSet:
    """An insightface verification `.bin` (lfw.bin, cfp_fp.bin, agedb_30.bin).

    The file is a pickle of `(bins, issame_list)`: 2P encoded images (pair i
    is images 2i and 2i+1) and P booleans. It is read with
    `RestrictedUnpickler`. Folds are P/num_folds consecutive pairs, as
    insightface's evaluation splits them.

    Raises:
        FileNotFoundError: `path` is not a file.
        UnsafePickleError: the pickle asks to load code or Python objects.
        ValueError: not a pickle, or not of (images, issame), or not 2
            images per pair; the message names the file (and the image).
        tf.errors.InvalidArgumentError: an image does not decode; the
            message names "<path> image <i>".
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Verification .bin file not found: {path}")
    with open(path, "rb") as file:
        try:
            loaded = RestrictedUnpickler(file, encoding="bytes").load()
        except UnsafePickleError as error:
            raise UnsafePickleError(f"{path}: {error}") from None
        except Exception as error:
            raise ValueError(
                f"{path} is not an insightface .bin file (a pickle of "
                f"(images, issame)): {type(error).__name__}: "
                f"{' '.join(str(error).split())} near byte offset "
                f"{file.tell()}. {_BIN_FIX}"
            ) from None
    if not (isinstance(loaded, (tuple, list)) and len(loaded) == 2):
        raise ValueError(
            f"{path}: expected a pickled pair (images, issame), found "
            f"{type(loaded).__name__}."
        )
    bins, issame = loaded
    bins = _bin_images(path, bins)
    issame = _bin_issame(path, issame)
    if len(bins) != 2 * len(issame) or not len(issame):
        raise ValueError(
            f"{path}: expected 2 images per pair, found {len(bins)} images "
            f"for {len(issame)} pairs."
        )
    names = [f"{path} image {i}" for i in range(len(bins))]
    items = tf.data.Dataset.from_tensor_slices(
        (tf.constant(bins), tf.constant(names))
    )
    images = pipeline.load_encoded_images(
        items, len(bins), image_size, channels
    )
    pairs = len(issame)
    return VerificationSet(
        images=images,
        left=np.arange(0, 2 * pairs, 2),
        right=np.arange(1, 2 * pairs, 2),
        issame=issame,
        fold=np.arange(pairs) * num_folds // pairs,
        names=names,
    )
