"""Tests of face alignment (ring_loss_tf/align.py): the similarity transform
against Umeyama's SVD solution, the warp against a NumPy bilinear sampler,
the ops inside tf.data, and folders of photos aligned end to end (MTCNN on a
real photograph that matplotlib ships)."""

import os
import pathlib
import re
import stat

import matplotlib
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from ring_loss_tf.data import align
from ring_loss_tf.commands import align as align_command
from tests.data_files import png_of_size
from tests.data_files import png_with_broken_chunk

GRACE_HOPPER = (
    pathlib.Path(matplotlib.get_data_path()) / "sample_data"
    / "grace_hopper.jpg"
)


def umeyama(source, target, allow_reflection=False):
    """Umeyama (1991) in float64 NumPy: the least-squares s·R, t by SVD.

    With `allow_reflection` the sign correction S is left out, giving the
    least-squares orthogonal map, which may mirror.
    """
    source = np.asarray(source, np.float64)
    target = np.asarray(target, np.float64)
    mu_s, mu_t = source.mean(0), target.mean(0)
    s, t = source - mu_s, target - mu_t
    covariance = t.T @ s / len(source)
    u, d, vt = np.linalg.svd(covariance)
    sign = np.eye(2)
    if not allow_reflection and np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1
    rotation = u @ sign @ vt
    scale = np.trace(np.diag(d) @ sign) / (s**2).sum(1).mean()
    translation = mu_t - scale * rotation @ mu_s
    return np.c_[scale * rotation, translation]


def apply(matrix, points):
    return points @ matrix[:, :2].T + matrix[:, 2]


_, SPHEREFACE = align.template_points("sphereface")


def test_similarity_transform_equals_umeyama_on_noisy_landmarks():
    rng = np.random.default_rng(0)
    for _ in range(20):
        angle = rng.uniform(-np.pi, np.pi)
        scale = rng.uniform(0.2, 5)
        rotation = np.array([[np.cos(angle), -np.sin(angle)],
                             [np.sin(angle), np.cos(angle)]])
        # Landmarks of a face seen at some pose, with detector noise.
        landmarks = (SPHEREFACE @ rotation.T) * scale + rng.uniform(
            -300, 300, 2) + rng.normal(0, 3, (5, 2))
        got = align.similarity_transform(landmarks, SPHEREFACE).numpy()
        np.testing.assert_allclose(got, umeyama(landmarks, SPHEREFACE),
                                   rtol=1e-9, atol=1e-9)
        assert got[0, 0] == got[1, 1] and got[0, 1] == -got[1, 0]


def test_an_exact_similarity_is_recovered_and_batches_agree():
    rng = np.random.default_rng(1)
    truth = np.array([[0.8, -0.6, 10.0], [0.6, 0.8, -4.0]]) * [[2], [2]]
    truth[:, 2] /= 2
    inverse = np.linalg.inv(np.r_[truth, [[0, 0, 1]]])[:2]
    landmarks = apply(inverse, SPHEREFACE)
    got = align.similarity_transform(landmarks, SPHEREFACE).numpy()
    np.testing.assert_allclose(got, truth, atol=1e-9)
    batch = np.stack([landmarks, landmarks + rng.normal(0, 2, (5, 2))])
    batched = align.similarity_transform(batch, SPHEREFACE).numpy()
    np.testing.assert_allclose(batched[0], got, atol=1e-12)
    np.testing.assert_allclose(batched[1], umeyama(batch[1], SPHEREFACE),
                               atol=1e-9)


def test_mirrored_landmarks_give_a_rotation_not_a_reflection():
    # The template mirrored left-right: the best orthogonal fit is the
    # reflection itself (residual 0); a face must never be mirrored.
    mirrored = SPHEREFACE * [-1, 1] + [200, 0]
    reflecting = umeyama(mirrored, SPHEREFACE, allow_reflection=True)
    assert np.linalg.det(reflecting[:, :2]) < 0
    np.testing.assert_allclose(apply(reflecting, mirrored), SPHEREFACE,
                               atol=1e-9)
    got = align.similarity_transform(mirrored, SPHEREFACE).numpy()
    assert np.linalg.det(got[:, :2]) > 0
    np.testing.assert_allclose(got, umeyama(mirrored, SPHEREFACE), atol=1e-9)


def bilinear_reference(image, matrix, size):
    """Each crop pixel sampled at M⁻¹(x, y) in float64, zero outside."""
    inverse = np.linalg.inv(np.r_[matrix, [[0, 0, 1]]])
    h, w = image.shape[:2]
    out = np.zeros(tuple(size) + image.shape[2:])
    for i in range(size[0]):
        for j in range(size[1]):
            x, y, _ = inverse @ [j, i, 1]
            x0, y0 = int(np.floor(x)), int(np.floor(y))
            fx, fy = x - x0, y - y0
            for dy, dx, weight in ((0, 0, (1 - fx) * (1 - fy)),
                                   (0, 1, fx * (1 - fy)),
                                   (1, 0, (1 - fx) * fy), (1, 1, fx * fy)):
                yy, xx = y0 + dy, x0 + dx
                if 0 <= yy < h and 0 <= xx < w:
                    out[i, j] += weight * image[yy, xx]
    return out


def test_warp_equals_a_numpy_bilinear_sampler():
    rng = np.random.default_rng(2)
    image = rng.uniform(0, 255, (40, 30, 3)).astype(np.float32)
    landmarks = SPHEREFACE * 0.3 + rng.normal(0, 0.5, (5, 2))
    matrix = align.similarity_transform(landmarks, SPHEREFACE).numpy()
    got = align.warp(image, matrix, (112, 96)).numpy()
    expected = bilinear_reference(image, matrix, (112, 96))
    # Inside the image, away from its border, where the op's edge
    # handling (half a pixel) does not matter.
    inverse = np.linalg.inv(np.r_[matrix, [[0, 0, 1]]])
    jj, ii = np.meshgrid(np.arange(96), np.arange(112))
    x, y, _ = np.tensordot(inverse, [jj, ii, np.ones_like(ii)], axes=1)
    inside = (x > 0.5) & (x < 28.5) & (y > 0.5) & (y < 38.5)
    assert inside.sum() > 2000
    np.testing.assert_allclose(got[inside], expected[inside], atol=2e-3)
    assert np.all(got[(x < -1.5) | (y < -1.5)] == 0)


def test_align_face_in_tf_data_equals_eager():
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (3, 60, 50, 3), dtype=np.uint8)
    landmarks = np.stack([SPHEREFACE * 0.5 + rng.normal(0, 1, (5, 2))
                          for _ in range(3)])
    eager = align.align_face(images, landmarks, "arcface").numpy()
    assert eager.shape == (3, 112, 112, 3) and eager.dtype == np.uint8
    mapped = tf.data.Dataset.from_tensor_slices((images, landmarks)).map(
        lambda image, points: align.align_face(image, points, "arcface")
    ).batch(3)
    np.testing.assert_array_equal(next(iter(mapped)).numpy(), eager)
    single = align.align_face(images[1], landmarks[1], "arcface").numpy()
    np.testing.assert_array_equal(single, eager[1])


def test_template_points_keep_their_shape_at_another_size():
    (h, w), points = align.template_points("arcface", (56, 56))
    assert (h, w) == (56, 56)
    _, full = align.template_points("arcface")
    # Half the size: pixel centres map as (p + 0.5) / 2 - 0.5.
    np.testing.assert_allclose(points, (full + 0.5) / 2 - 0.5)
    # 112×96 inside 56×112 (height 56): the same face shape, scale 1/2,
    # centred across the width.
    (h, w), narrow = align.template_points("sphereface", (56, 112))
    _, sphereface = align.template_points("sphereface")
    fit = umeyama(sphereface, narrow)
    np.testing.assert_allclose(apply(fit, sphereface), narrow, atol=1e-9)
    np.testing.assert_allclose(fit[:, :2], np.eye(2) / 2, atol=1e-12)
    assert narrow[:, 0].mean() == pytest.approx(
        (sphereface[:, 0].mean() + 0.5) / 2 - 0.5 + 32)
    with pytest.raises(ValueError, match=r"`template` must be one of"):
        align.template_points("vgg")


# --------------------------------------------------------------------------
# Folders


def write_photo(path, face_at=None, size=(120, 100)):
    """A noise image; landmarks are given separately (no real face)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    Image.fromarray(
        rng.integers(0, 256, size + (3,), dtype=np.uint8)
    ).save(path)


class FakeDetector:
    """Returns the faces it was given for an image of that exact size."""

    def __init__(self, faces_by_shape):
        self.faces_by_shape = faces_by_shape
        self.calls = 0

    def __call__(self, image):
        self.calls += 1
        return self.faces_by_shape.get(image.shape[:2], [])


def snapshot(root):
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_align_folder_keeps_layout_lists_no_face_and_resumes(tmp_path):
    source = tmp_path / "photos"
    write_photo(source / "ann" / "1.png", size=(120, 100))
    write_photo(source / "ann" / "2.jpg", size=(90, 80))
    write_photo(source / "bob" / "1.jpg", size=(70, 70))  # no face
    (source / "bob" / "notes.txt").write_text("not an image")
    before = snapshot(source)
    small = align.Face((0, 0, 10, 10), 0.9, SPHEREFACE * 0.3)
    large = align.Face((0, 0, 40, 40), 0.8, SPHEREFACE * 0.6 + 5)
    detector = FakeDetector({(120, 100): [small, large],
                             (90, 80): [large]})
    out = tmp_path / "aligned"
    summary = align.align_folder(source, out, detector=detector,
                                 progress=False)
    assert (summary.images, summary.aligned, summary.no_face) == (
        3, 2, ["bob/1.jpg"])
    assert snapshot(source) == before  # the input is never written
    written = sorted(p.relative_to(out).as_posix()
                     for p in out.rglob("*") if p.is_file())
    assert written == ["ann/1.png", "ann/2.jpg", "no_face.txt"]
    assert (out / "no_face.txt").read_text() == "bob/1.jpg\tno face: skipped\n"
    # The largest face (by box area) of 1.png, not the first listed.
    with Image.open(source / "ann" / "1.png") as photo:
        expected = align.align_face(np.asarray(photo), large.landmarks)
    with Image.open(out / "ann" / "1.png") as crop:
        assert crop.size == (96, 112)
        np.testing.assert_array_equal(np.asarray(crop), expected.numpy())

    # Resumable: a second run does nothing; a lost output is redone alone.
    os.unlink(out / "ann" / "2.jpg")
    detector.calls = 0
    again = align.align_folder(source, out, detector=detector,
                               progress=False)
    assert (again.already_done, again.aligned, detector.calls) == (2, 1, 1)
    assert not [p for p in out.rglob(".*") if p.is_file()]  # no temp files


def test_all_faces_and_centre_crop(tmp_path):
    source = tmp_path / "in"
    write_photo(source / "group.png", size=(120, 100))
    write_photo(source / "empty.png", size=(50, 60))
    faces = [align.Face((0, 0, 10, 10), 1, SPHEREFACE * s) for s in
             (0.3, 0.5, 0.7)]
    out = tmp_path / "out"
    align.align_folder(source, out, detector=FakeDetector(
        {(120, 100): faces}), all_faces=True, on_no_face="center_crop",
        template="arcface", progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["empty_0.png", "group_0.png", "group_1.png",
                     "group_2.png", "no_face.txt"]
    with Image.open(out / "group_1.png") as crop:
        np.testing.assert_array_equal(
            np.asarray(crop),
            align.align_face(np.asarray(Image.open(source / "group.png")),
                             faces[1].landmarks, "arcface").numpy())
    with Image.open(out / "empty_0.png") as crop:
        assert crop.size == (112, 112)
    assert "empty.png\tno face: centre crop written" in (
        out / "no_face.txt").read_text()


def test_exif_rotation_is_applied_before_detection(tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to show
    Image.fromarray(np.zeros((120, 100, 3), np.uint8)).save(
        source / "phone.jpg", exif=exif)
    face = align.Face((0, 0, 10, 10), 1, SPHEREFACE * 0.5)
    detector = FakeDetector({(100, 120): [face]})  # the shape as shown
    summary = align.align_folder(source, tmp_path / "out",
                                 detector=detector, progress=False)
    assert (summary.aligned, summary.no_face) == (1, [])


def test_landmarks_file_and_command_line(tmp_path, capsys):
    source = tmp_path / "in"
    write_photo(source / "a" / "x.png")
    write_photo(source / "a" / "y.png")
    points = SPHEREFACE * 0.8 + 3
    listing = tmp_path / "5pts.txt"
    listing.write_text(
        "a/x.png " + " ".join(f"{v:.4f}" for v in points.ravel())
        + " 0.99\n")
    out = tmp_path / "out"
    assert align_command.call([f"--input={source}", f"--output={out}",
                               f"--landmarks={listing}"]) == 0
    printed = capsys.readouterr().out
    assert "Aligned 1 of 2 images (1 faces)" in printed
    assert "1 without a face, listed in" in printed
    with Image.open(out / "a" / "x.png") as crop:
        np.testing.assert_array_equal(
            np.asarray(crop),
            align.align_face(np.asarray(Image.open(source / "a" / "x.png")),
                             points).numpy())


@pytest.mark.parametrize(
    "text, message",
    [
        ("a/x.png 1 2 3\n", r"5pts\.txt line 1: expected a path and 10 "
         r"landmark coordinates"),
        ("\na/x.png 1 2 3 4 5 6 7 8 9 z\n", r"5pts\.txt line 2: expected"),
        ("a/nothere.png 1 2 3 4 5 6 7 8 9 10\n",
         r"The landmarks name images that are not under \S+in \(1, "),
        ("", r"5pts\.txt is empty"),
    ],
)
def test_bad_landmarks_files(tmp_path, capsys, text, message):
    write_photo(tmp_path / "in" / "a" / "x.png")
    (tmp_path / "5pts.txt").write_text(text)
    with pytest.raises(SystemExit) as stopped:
        align_command.call([f"--input={tmp_path / 'in'}",
                            f"--output={tmp_path / 'out'}",
                            f"--landmarks={tmp_path / '5pts.txt'}"])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(message, error), error


def test_output_inside_the_input_is_refused(tmp_path):
    write_photo(tmp_path / "in" / "x.png")
    before = snapshot(tmp_path)
    for output in (tmp_path / "in" / "aligned", tmp_path / "in", tmp_path):
        with pytest.raises(ValueError, match=r"never writes into its input"):
            align.align_folder(tmp_path / "in", output, landmarks={},
                               progress=False)
    assert snapshot(tmp_path) == before


def test_a_photo_pillow_cannot_read_is_listed_and_the_rest_aligned(
        tmp_path):
    source = tmp_path / "in"
    write_photo(source / "a" / "ok.png")
    noise = np.random.default_rng(1).integers(0, 256, (120, 100, 3), np.uint8)
    broken = source / "a" / "broken.png"
    broken.write_bytes(png_with_broken_chunk(noise))
    with pytest.raises(SyntaxError, match="broken PNG file"):
        with Image.open(broken) as image:
            image.load()
    points = {"a/ok.png": [SPHEREFACE], "a/broken.png": [SPHEREFACE]}
    out = tmp_path / "out"
    for run in range(2):  # the rerun finds both done, and does not stop
        summary = align.align_folder(source, out, landmarks=points,
                                     progress=False)
        assert (summary.aligned, summary.no_face, summary.already_done) == (
            (1, ["a/broken.png"], 0) if run == 0 else (0, [], 2))
    assert (out / "no_face.txt").read_text() == (
        "a/broken.png\tunreadable (SyntaxError), skipped\n")
    assert (out / "a" / "ok.png").is_file()
    assert not (out / "a" / "broken.png").exists()


def test_an_output_folder_linked_into_the_input_is_refused(tmp_path, capsys):
    source = tmp_path / "in"
    write_photo(source / "ann" / "1.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "ann").symlink_to(source, target_is_directory=True)
    before = snapshot(source)
    message = (
        rf"^{re.escape(str(out / 'ann'))} is a symbolic link to "
        rf"{re.escape(str(source.resolve()))}, outside --output_dir="
        rf"{re.escape(str(out))}; the aligner writes only inside its output "
        r"folder: remove the link, or give another --output_dir\.$"
    )
    with pytest.raises(ValueError, match=message):
        align.align_folder(source, out, landmarks={"ann/1.png": [SPHEREFACE]},
                           progress=False)
    listing = tmp_path / "5pts.txt"
    listing.write_text(
        "ann/1.png " + " ".join(f"{v:.4f}" for v in SPHEREFACE.ravel()) + "\n")
    with pytest.raises(SystemExit) as stopped:
        align_command.call([f"--input={source}", f"--output={out}",
                            f"--landmarks={listing}"])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(message[1:], error), error
    assert snapshot(source) == before  # nothing written through the link
    assert not (out / "no_face.txt").exists()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_crops_get_the_usual_file_mode(tmp_path, umask):
    write_photo(tmp_path / "in" / "x.png")
    previous = os.umask(umask)
    try:
        align.align_folder(tmp_path / "in", tmp_path / "out",
                           landmarks={"x.png": [SPHEREFACE]}, progress=False)
    finally:
        os.umask(previous)
    mode = stat.S_IMODE((tmp_path / "out" / "x.png").stat().st_mode)
    assert mode == 0o666 & ~umask, oct(mode)  # 0644 under umask 022


def test_degenerate_landmarks_are_listed_not_written(tmp_path):
    source = tmp_path / "in"
    for name in ("same.png", "off.png", "good.png", "group.png"):
        write_photo(source / name, size=(120, 100))
    same = np.full((5, 2), [50.0, 60.0])  # one point five times
    off = SPHEREFACE * 0.8 + 1000  # a face far outside the 100 x 120 photo
    centre = off.mean(0)
    points = {"same.png": [same], "off.png": [off], "good.png": [SPHEREFACE],
              "group.png": [SPHEREFACE, same]}
    out = tmp_path / "out"
    summary = align.align_folder(source, out, landmarks=points,
                                 all_faces=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "good_0.png", "group_0.png", "no_face.txt"]
    assert (summary.aligned, summary.faces_written) == (2, 2)
    assert sorted(summary.no_face) == ["off.png", "same.png"]
    lines = sorted((out / "no_face.txt").read_text().splitlines())
    assert lines == sorted([
        "same.png\tdegenerate landmarks (spread 0 px, the points "
        "coincide): skipped",
        f"off.png\tdegenerate landmarks (centre ({centre[0]:.1f}, "
        f"{centre[1]:.1f}) outside the 100x120 image): skipped",
        "group.png\t1 of 2 faces not written: degenerate landmarks (spread "
        "0 px, the points coincide)",
    ])
    with Image.open(out / "group_0.png") as crop:
        np.testing.assert_array_equal(
            np.asarray(crop),
            align.align_face(np.asarray(Image.open(source / "group.png")),
                             SPHEREFACE).numpy())
    assert align.degenerate_landmarks(SPHEREFACE, (112, 96)) is None


def test_images_over_the_pixel_budget_are_listed_before_decoding(
        tmp_path, capsys):
    source = tmp_path / "in"
    write_photo(source / "ok.png", size=(120, 100))
    bomb = png_of_size(12000, 12000)
    assert len(bomb) < 20_000  # 17 KB; 144 million pixels decoded
    (source / "bomb.png").write_bytes(bomb)
    # Its header says 300 x 200; its data would not decode.
    (source / "fake.png").write_bytes(png_of_size(300, 200, idat=b"junk"))
    points = {name: [SPHEREFACE] for name in ("ok.png", "bomb.png",
                                              "fake.png")}
    out = tmp_path / "out"
    summary = align.align_folder(source, out, landmarks=points,
                                 progress=False)
    assert (summary.aligned, sorted(summary.no_face)) == (
        1, ["bomb.png", "fake.png"])
    assert sorted((out / "no_face.txt").read_text().splitlines()) == [
        "bomb.png\ttoo large (12000x12000 pixels, more than "
        "--max_image_pixels=67108864), skipped",
        "fake.png\tunreadable (OSError), skipped",
    ]
    # With a budget of 50000 pixels the fake is refused by its header alone.
    listing = tmp_path / "5pts.txt"
    listing.write_text("".join(
        f"{name} " + " ".join(f"{v:.4f}" for v in SPHEREFACE.ravel()) + "\n"
        for name in points))
    assert align_command.call([
        f"--input={source}", f"--output={tmp_path / 'out2'}",
        f"--landmarks={listing}", "--max_image_pixels=50000",
    ]) == 0
    assert "fake.png\ttoo large (300x200 pixels, more than "\
        "--max_image_pixels=50000), skipped" in (
            tmp_path / "out2" / "no_face.txt").read_text()
    with pytest.raises(SystemExit):
        align_command.call([f"--input={source}",
                            f"--output={tmp_path / 'out3'}",
                            "--max_image_pixels=0"])
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "--max_image_pixels=0: must be >= 1 (e.g. 67108864, 8192x8192).")


def test_mtcnn_aligns_a_real_photograph_onto_the_template(tmp_path):
    """End to end: MTCNN finds Grace Hopper's face, the crop is warped to
    SphereFace's template, and MTCNN run again on the crop finds her eyes,
    nose and mouth corners near the template's points."""
    source = tmp_path / "photos" / "grace"
    source.mkdir(parents=True)
    (source / "grace_hopper.jpg").write_bytes(GRACE_HOPPER.read_bytes())
    detector = align.MtcnnDetector()
    summary = align.align_folder(tmp_path / "photos", tmp_path / "aligned",
                                 detector=detector, progress=False)
    assert (summary.aligned, summary.no_face) == (1, [])
    with Image.open(tmp_path / "aligned" / "grace" / "grace_hopper.jpg") as f:
        crop = np.asarray(f.convert("RGB"))
    assert crop.shape == (112, 96, 3)
    faces = detector(crop)
    assert len(faces) == 1 and faces[0].score > 0.9
    error = np.linalg.norm(faces[0].landmarks - SPHEREFACE, axis=1)
    # MTCNN returns whole pixels; the eyes land within 3 px, and no point
    # is off by more than 5 px (the nose tip, a point detectors disagree on).
    assert error[:2].max() < 3 and error.max() < 5, error
    # On the photograph the face is ~170 px wide: a failed warp (wrong
    # direction, mirrored, unscaled) would put points tens of pixels away.
    original = detector(np.asarray(Image.open(GRACE_HOPPER).convert("RGB")))
    assert np.linalg.norm(original[0].landmarks - SPHEREFACE, axis=1).min() > 50
