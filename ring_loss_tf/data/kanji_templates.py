"""The embedded set's template variant: IJB-style templates of characters.

For tests and the quick start of template verification
(`ring_loss_tf.evaluation.ijb`) without IJB data. The characters are the first
`num_identities` unseen test characters of the embedded set
(`kanji.split_identities`, the same seed and sizes as training), so a model
trained with train.py's defaults meets none of them in training. Each gets
two templates; a template holds `media_per_template` media, and media k
is one hand (one `kanji.render_sample`) seen in 1 + k mod 3 "frames": the
rendering, then copies shifted by a pixel with fresh noise, as consecutive
frames of a video differ. Media of 1, 2 and 3 frames make pooling matter:
a media's frames together weigh as much as one still image.

Pairs: every pair of templates, genuine when both show one character
(100 characters: 100 genuine and 19,800 impostor pairs).

Layout (what `ijb.read_protocol` reads; no five-point file, the images
are aligned already):

    root/meta/kanji_face_tid_mid.txt
    root/meta/kanji_template_pair_label.txt
    root/loose_crop/<row>.png
    root/settings.json

Generated once into the embedded set's cache directory, keyed by the
settings, written to a temporary directory and renamed (never half
written); the same settings give byte-identical files.
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np

from ring_loss_tf.data import kanji

NAME = "kanji"


def _frames(image: np.ndarray, count: int, rng) -> list[np.ndarray]:
    frames = [image]
    for k in range(1, count):
        shifted = np.roll(image, (k % 2 * 2 - 1, k // 2), axis=(0, 1))
        noisy = shifted + rng.normal(0, 6, image.shape)
        frames.append(np.clip(np.round(noisy), 0, 255).astype(np.uint8))
    return frames


def prepare(
    *,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    num_train_identities: int = kanji.DEFAULT_NUM_TRAIN_IDENTITIES,
    num_test_identities: int = kanji.DEFAULT_NUM_TEST_IDENTITIES,
    num_identities: int | None = None,
    media_per_template: int = 3,
    image_size: int = 32,
) -> pathlib.Path:
    """Generates the template variant once and returns its root.

    Args:
        cache_dir, seed, num_train_identities, num_test_identities,
            image_size: those of the embedded set (`kanji.prepare`).
        num_identities: characters (two templates each), at most
            `num_test_identities`; default 100, or all test characters
            if fewer.
        media_per_template: media in each template (>= 1).
    """
    if num_identities is None:
        num_identities = min(100, num_test_identities)
    kanji.check_integers([
        ("num_identities", num_identities, 2),
        ("media_per_template", media_per_template, 1),
        ("image_size", image_size, 8),
    ])
    if num_identities > num_test_identities:
        raise ValueError(
            f"`num_identities` ({num_identities}) must not exceed "
            f"`num_test_identities` ({num_test_identities}): the templates "
            "are of unseen test characters."
        )
    settings = dict(
        variant="templates",
        seed=int(seed),
        num_train_identities=int(num_train_identities),
        num_test_identities=int(num_test_identities),
        num_identities=int(num_identities),
        media_per_template=int(media_per_template),
        image_size=int(image_size),
    )
    cache_dir = pathlib.Path(cache_dir or kanji.default_cache_dir())
    root = cache_dir.expanduser() / (
        f"kanji-templates-{kanji.settings_hash(settings)}"
    )
    if (root / "settings.json").is_file():
        return root
    _, test_ids = kanji.split_identities(
        seed, num_train_identities, num_test_identities
    )
    with kanji.staged_directory(root) as temporary:
        _write(temporary, test_ids[:num_identities], seed,
               media_per_template, image_size)
        (temporary / "settings.json").write_text(
            json.dumps(settings, indent=2) + "\n"
        )
    return root


def _write(root, codepoints, seed, media_per_template, image_size):
    (root / "meta").mkdir(parents=True)
    (root / "loose_crop").mkdir()
    rows, media, template = [], 0, 0
    owner = []
    for codepoint in codepoints:
        for half in range(2):
            template += 1
            owner.append(codepoint)
            for k in range(media_per_template):
                media += 1
                sample = half * media_per_template + k
                image = kanji.render_sample(
                    codepoint, seed=seed, split="test", sample=sample,
                    image_size=image_size,
                )
                rng = np.random.default_rng([seed, codepoint, sample, 0xF7])
                for frame in _frames(image, 1 + k % 3, rng):
                    name = f"{len(rows) + 1}.png"
                    (root / "loose_crop" / name).write_bytes(
                        kanji.encode_png(frame)
                    )
                    rows.append(f"{name} {template} {media}")
    (root / "meta" / f"{NAME}_face_tid_mid.txt").write_text(
        "\n".join(rows) + "\n"
    )
    pairs = [
        f"{a + 1} {b + 1} {int(owner[a] == owner[b])}"
        for a in range(len(owner)) for b in range(a + 1, len(owner))
    ]
    (root / "meta" / f"{NAME}_template_pair_label.txt").write_text(
        "\n".join(pairs) + "\n"
    )
