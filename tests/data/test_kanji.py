"""Tests of the embedded KanjiVG data set (ring_loss_tf/kanji.py)."""

import hashlib
import os
import pathlib
import re
import xml.etree.ElementTree as ElementTree

import numpy as np
import pytest
from PIL import Image

from ring_loss_tf.data import eval_sets
from ring_loss_tf.data import kanji

TINY = dict(
    num_train_identities=6,
    num_test_identities=4,
    train_samples_per_identity=3,
    test_samples_per_identity=3,
    image_size=32,
    progress=False,
)


def bezier(p0, p1, p2, p3, t):
    """Closed form of a cubic Bezier in float64 (independent reference)."""
    p0, p1, p2, p3 = (np.asarray(p, np.float64) for p in (p0, p1, p2, p3))
    return (
        (1 - t) ** 3 * p0
        + 3 * (1 - t) ** 2 * t * p1
        + 3 * (1 - t) * t**2 * p2
        + t**3 * p3
    )


def tree_digest(root):
    """{relative path: sha256} of every file under root."""
    root = pathlib.Path(root)
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "settings.json"
    }


# --------------------------------------------------------------------------
# SVG path parsing


def test_parse_path_lines_absolute_and_relative():
    (points,) = kanji.parse_path("M10,20 L30,40 h5 v-5 l-1-1 H2 V3 Z")
    expected = [
        [10, 20], [30, 40], [35, 40], [35, 35], [34, 34], [2, 34], [2, 3],
        [10, 20],
    ]
    np.testing.assert_allclose(points, expected)


def test_parse_path_implicit_lineto_after_moveto():
    (absolute,) = kanji.parse_path("M0 0 10 0 10 10")
    (relative,) = kanji.parse_path("m1 1 10 0 0 10")
    np.testing.assert_allclose(absolute, [[0, 0], [10, 0], [10, 10]])
    np.testing.assert_allclose(relative, [[1, 1], [11, 1], [11, 11]])


def test_parse_path_cubic_and_smooth_against_closed_form():
    n = kanji._BEZIER_POINTS
    t = np.linspace(0, 1, n + 1)[1:, None]
    (absolute,) = kanji.parse_path("M1,2 C1,12 11,12 11,2 S21,-8 21,2")
    # Relative: each command's points are offsets from its start point.
    (relative,) = kanji.parse_path("M1,2 c0,10 10,10 10,0 s10,-10 10,0")
    first = bezier((1, 2), (1, 12), (11, 12), (11, 2), t)
    # S reflects the previous second control point about the current point.
    second = bezier((11, 2), (11, -8), (21, -8), (21, 2), t)
    expected = np.concatenate([[[1, 2]], first, second])
    np.testing.assert_allclose(absolute, expected, atol=1e-12)
    np.testing.assert_allclose(relative, expected, atol=1e-12)


def test_parse_path_numbers_without_separators():
    # KanjiVG writes "c3.19,0.62,6.25-1.5" and ".5.5" style numbers.
    (points,) = kanji.parse_path("M.5.5l1-1.5e0 0,2")
    np.testing.assert_allclose(points, [[0.5, 0.5], [1.5, -1.0], [1.5, 1.0]])


def test_parse_path_subpaths():
    paths = kanji.parse_path("M0,0 L1,0 M5,5 l1,1")
    assert len(paths) == 2
    np.testing.assert_allclose(paths[1], [[5, 5], [6, 6]])


@pytest.mark.parametrize(
    "d, message",
    [
        ("M0,0 A1,1,0,0,1,2,2", "outside M, C, S, L, H, V, Z"),
        ("M0,0 C1,1 2,2", "needs 6 numbers"),
        ("10,10", "must start with a command"),
        # Z takes no numbers: a parser that consumes none there never ends.
        ("M0,0 L1,1 Z 5", r"number after 'Z', which takes none"),
        ("M0,0 z1,2", r"number after 'z', which takes none"),
    ],
)
def test_parse_path_errors(d, message):
    with pytest.raises(ValueError, match=message):
        kanji.parse_path(d)


def test_character_files_are_the_kanjivg_cjk_set():
    files = kanji.character_files()
    assert len(files) == 6413
    assert all(0x4E00 <= c <= 0x9FFF for c in files)
    assert files[0x4E00].name == "04e00.svg" and files[0x4E00].is_file()


def test_load_strokes_matches_the_svg():
    path = kanji.character_files()[0x6C38]  # 永, 5 strokes
    strokes = kanji.load_strokes(path)
    # Independent reference: an XML parser and the first M of each path.
    svg = "{http://www.w3.org/2000/svg}"
    ds = [e.get("d") for e in ElementTree.parse(path).iter(f"{svg}path")]
    assert len(strokes) == len(ds) == 5
    for stroke, d in zip(strokes, ds):
        x, y = (float(v) for v in re.match(r"M([\d.]+),([\d.]+)", d).groups())
        np.testing.assert_allclose(stroke[0], [x, y])
        assert np.all((stroke > -5) & (stroke < kanji.GRID_SIZE + 5))


def test_load_strokes_errors_name_the_file_and_line(tmp_path):
    svg = tmp_path / "04e00.svg"
    svg.write_text('<svg>\n<path id="s1" d="M1,2 L3,4"/>\n'
                   '<path id="s2" d="M1,2 C3"/>\n</svg>\n')
    with pytest.raises(ValueError, match=(
        r"^KanjiVG file .*04e00\.svg line 3: SVG path command 'C' needs 6 "
        r"numbers\. Received: d='M1,2 C3' Reinstall the package: ")):
        kanji.load_strokes(svg)
    # Not UTF-8: the error names the file and the byte, so the user knows
    # which file to replace (a bare UnicodeDecodeError names neither).
    svg.write_bytes(b'<svg><path d="M1,2 L3,4"/>\xff\xfe</svg>')
    with pytest.raises(ValueError, match=(
        r"^KanjiVG file .*04e00\.svg is not UTF-8 text \(byte 26: invalid "
        r"start byte\)\. Reinstall")):
        kanji.load_strokes(svg)
    svg.write_text("<svg></svg>")
    with pytest.raises(ValueError, match=r"^No stroke paths .*/04e00\.svg"):
        kanji.load_strokes(svg)


# --------------------------------------------------------------------------
# Rendering


def test_render_sample_is_a_pure_function_of_its_arguments():
    args = dict(seed=3, split="train", sample=2, image_size=32)
    a = kanji.render_sample(0x6C38, **args)
    b = kanji.render_sample(0x6C38, **args)
    assert a.dtype == np.uint8 and a.shape == (32, 32)
    np.testing.assert_array_equal(a, b)
    for change in (dict(seed=4), dict(sample=3), dict(split="test")):
        other = kanji.render_sample(0x6C38, **{**args, **change})
        assert np.abs(other.astype(int) - a).mean() > 5, change


def test_render_draws_dark_ink_on_light_paper():
    image = kanji.render_sample(
        0x6C38, seed=0, split="train", sample=0, image_size=32
    )
    # Some ink, mostly paper, and the ink in the middle of the image.
    dark = image < (int(image.min()) + int(image.max())) / 2
    assert 0.03 < dark.mean() < 0.5
    rows, cols = np.nonzero(dark)
    assert 6 < rows.mean() < 26 and 6 < cols.mean() < 26


# --------------------------------------------------------------------------
# prepare


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("RING_LOSS_TF_CACHE", str(tmp_path / "a"))
    assert kanji.default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("RING_LOSS_TF_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert kanji.default_cache_dir() == tmp_path / "x" / "ring_loss_tf"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expected = tmp_path / "home" / ".cache" / "ring_loss_tf"
    assert kanji.default_cache_dir() == expected


def test_prepare_is_deterministic_cached_and_seeded(tmp_path, monkeypatch):
    serial = kanji.prepare(cache_dir=tmp_path / "a", num_workers=1, **TINY)
    parallel = kanji.prepare(cache_dir=tmp_path / "b", num_workers=2, **TINY)
    # Same settings -> the same bytes, whatever the number of workers.
    digest = tree_digest(serial)
    assert digest == tree_digest(parallel)
    assert serial.name == parallel.name  # the key does not depend on workers
    # No half-written directory is left beside the result.
    assert sorted(os.listdir(tmp_path / "a")) == [serial.name]

    # A second call uses the cache: generating again would fail here.
    def fail(*args, **kwargs):
        raise AssertionError("regenerated a cached data set")

    monkeypatch.setattr(kanji, "_run_tasks", fail)
    assert kanji.prepare(cache_dir=tmp_path / "a", **TINY) == serial
    monkeypatch.undo()

    other = kanji.prepare(cache_dir=tmp_path / "a", seed=1, **TINY)
    assert other != serial
    other_digest = tree_digest(other)
    assert not set(digest.values()) & set(other_digest.values())


def test_prepare_layout_splits_and_pairs(tmp_path):
    settings = dict(TINY, num_test_identities=25)
    root = kanji.prepare(cache_dir=tmp_path, **settings)
    train = sorted(os.listdir(root / "train"))
    test = sorted(os.listdir(root / "test"))
    assert len(train) == 6 and len(test) == 25
    assert not set(train) & set(test)  # disjoint identities
    for name in train:
        files = sorted(os.listdir(root / "train" / name))
        assert files == ["0000.png", "0001.png", "0002.png"]
    for name in test:
        files = sorted(os.listdir(root / "test" / name))
        assert files == [f"{name}_{n:04d}.png" for n in (1, 2, 3)]
    image = Image.open(root / "train" / train[0] / "0000.png")
    assert image.mode == "L" and image.size == (32, 32)
    # Each file is the renderer's output for (seed, split, identity, sample).
    codepoint = int(test[0][1:], 16)
    expected = kanji.render_sample(
        codepoint, seed=0, split="test", sample=1, image_size=32
    )
    np.testing.assert_array_equal(
        np.asarray(Image.open(root / "test" / test[0] / f"{test[0]}_0002.png")),
        expected,
    )

    # Identification: gallery and probes share identities, distractors not.
    parts = {
        part: sorted(os.listdir(root / "identification" / part))
        for part in ("gallery", "probes", "distractors")
    }
    assert parts["gallery"] == parts["probes"]
    assert not set(parts["gallery"]) & set(parts["distractors"])
    assert sorted(parts["gallery"] + parts["distractors"]) == test
    for name in parts["gallery"]:
        gallery = os.listdir(root / "identification" / "gallery" / name)
        probes = os.listdir(root / "identification" / "probes" / name)
        assert len(gallery) == 1 and len(probes) == 2
        assert not set(gallery) & set(probes)

    # Pairs round trip through the LFW reader.
    pairs = eval_sets.read_lfw_pairs(root / "pairs.txt", root / "test")
    assert pairs.num_folds == 10
    for k in range(10):
        in_fold = pairs.fold == k
        assert pairs.issame[in_fold].sum() == (~pairs.issame[in_fold]).sum() > 0
    identity = [pathlib.Path(n).parent.name for n in pairs.names]
    for left, right, same in zip(pairs.left, pairs.right, pairs.issame):
        assert (identity[left] == identity[right]) == same
        assert left != right
        # The loaded pixels are the files' pixels.
    np.testing.assert_array_equal(
        pairs.images[0, ..., 0], np.asarray(Image.open(pairs.names[0]))
    )


def test_prepare_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="must not exceed"):
        kanji.prepare(
            cache_dir=tmp_path, **{**TINY, "num_train_identities": 6410}
        )
    with pytest.raises(ValueError, match="test_samples_per_identity"):
        kanji.prepare(
            cache_dir=tmp_path, **{**TINY, "test_samples_per_identity": 1}
        )
    with pytest.raises(ValueError, match="num_workers"):
        kanji.prepare(cache_dir=tmp_path, num_workers=0, **TINY)
    assert not list(tmp_path.iterdir())


def test_progress_in_a_log_file_is_plain_lines(capsys):
    """Not a terminal (pytest's captured stderr): no carriage returns, one
    line per tenth, the last one at the total."""
    bar = kanji.Progress(37, "Generating", enabled=True)
    for _ in range(37):
        bar.update(1)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 10, lines
    assert all(l.startswith("Generating: ") for l in lines)
    assert lines[-1].startswith("Generating: 37/37 ")
    kanji.Progress(5, "Off", enabled=False).update(5)
    assert capsys.readouterr().err == ""
