"""Runs the evaluation protocols on an embedding model; writes tables/plots.

The model is a `keras.Model` in this process or an exported SavedModel,
loaded with `tf.saved_model.load` (so `ring_loss_tf.layers` are not needed to
load it). `Embedder` adapts uint8 images to the model's declared input:

    channels   grey → 3 equal channels, colour → grey (ITU-R 601-2 luma,
               as `images.to_channels`)
    size       resized (bilinear, antialiased, rounded) if the model has a
               fixed size that differs
    dtype      uint8 inputs get the uint8 pixels; float inputs get
               (x − 127.5) / 128, the normalisation of the training pipeline
               (`images.normalize`), unless `input_normalization="none"` (raw
               0..255) or "unit" (x / 255)

and, with `flip=True`, returns f(x) + f(mirror(x)) (horizontal flip).

Protocols (numbers from `ring_loss_tf.metrics`):

- verification of LFW-format pairs or insightface `.bin` sets: 10-fold
  accuracy, TAR@FAR, EER, AUC, the ROC, feature-norm statistics;
- low resolution: the same pairs with the probe image (the right image of
  each pair, or both) downsampled by a factor k (area average to
  round(h/k) × round(w/k)) and resized back (bilinear), as in Ring loss
  §5.4; with the mean norm ratio ‖f(low)‖ / ‖f(full)‖ of those images;
- identification: probes against a gallery plus distractors (rank-1,
  rank-5, CMC), distractors embedded in chunks or read from a `.npy` of
  embeddings (memory-mapped).

`format_table` prints the results, `write_outputs` writes `results.json`
and PNG plots (ROC on a log-FAR axis, CMC, norm histograms; matplotlib is
imported only then).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from typing import Sequence

import numpy as np
import tensorflow as tf

from ring_loss_tf import data
from ring_loss_tf import eval_data
from ring_loss_tf import metrics

INPUT_NORMALIZATIONS = ("auto", "none", "unit")
LOW_RES_SIDES = ("probe", "both")
EXPORT_SUBDIR = "export"  # where training writes the SavedModel (training.py)
_PLOT_FARS = metrics.DEFAULT_FARS


def _is_saved_model(path: pathlib.Path) -> bool:
    return (path / "saved_model.pb").is_file() or (
        path / "saved_model.pbtxt"
    ).is_file()


def resolve_model_path(path: str | os.PathLike) -> pathlib.Path:
    """A SavedModel directory, or a training model_dir holding `export/`."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"Model not found: {path}. Pass a SavedModel directory (with "
            "saved_model.pb) or a training --model_dir (with export/)."
        )
    if _is_saved_model(path):
        return path
    if _is_saved_model(path / EXPORT_SUBDIR):
        return path / EXPORT_SUBDIR
    if path.is_dir() and (
        (path / "checkpoint").is_file() or (path / "config.json").is_file()
    ):
        raise FileNotFoundError(
            f"{path} is a training directory without an exported model "
            f"({path / EXPORT_SUBDIR}/saved_model.pb missing): let train.py "
            "finish (it exports at the end) or export the checkpoint first."
        )
    raise FileNotFoundError(
        f"{path} is neither a SavedModel directory (no saved_model.pb) nor "
        f"a training model_dir (no {EXPORT_SUBDIR}/saved_model.pb)."
    )


def _model_name(path: pathlib.Path) -> str:
    # ".../run1/export" is better named "run1".
    return path.parent.name if path.name == EXPORT_SUBDIR else path.name


class Embedder:
    """Embeds uint8 images with a Keras model or a SavedModel signature.

    Args:
        model: a `keras.Model`, or the object `tf.saved_model.load` returns.
        signature: the serving signature to call (SavedModel only); default
            "serving_default", else "serve", else the only one.
        output_key: which output of the signature holds the embedding;
            default "embedding" if present, else the only output.
        input_normalization: for float inputs, "auto" ((x − 127.5) / 128),
            "none" (0..255) or "unit" (x / 255). uint8 inputs get pixels.
        batch_size: images per call.
        name: label in tables and plots.

    Attributes:
        image_size: (height, width) the model declares, or None if dynamic.
        channels: channels the model declares, or None.
        input_dtype: the declared input dtype (a `tf.DType`).
    """

    def __init__(
        self,
        model,
        *,
        signature: str | None = None,
        output_key: str | None = None,
        input_normalization: str = "auto",
        batch_size: int = 256,
        name: str = "model",
    ):
        if input_normalization not in INPUT_NORMALIZATIONS:
            raise ValueError(
                f"`input_normalization` must be one of "
                f"{INPUT_NORMALIZATIONS}. Received: {input_normalization!r}"
            )
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be ≥ 1. Got {batch_size}")
        self.input_normalization = input_normalization
        self.batch_size = int(batch_size)
        self.name = name
        self.signature = None
        self.output_key = None
        if hasattr(model, "signatures"):
            self._init_saved_model(model, signature, output_key)
        elif hasattr(model, "inputs") and callable(model):
            self._init_keras(model)
        else:
            raise TypeError(
                "`model` must be a keras.Model or a loaded SavedModel. "
                f"Received: {type(model).__name__}"
            )
        shape = list(self._input_spec.shape)
        if len(shape) != 4:
            raise ValueError(
                f"{name}: expected an image input (batch, height, width, "
                f"channels), the model declares shape {shape}."
            )
        self.input_dtype = tf.as_dtype(self._input_spec.dtype)
        if not (self.input_dtype.is_floating or self.input_dtype == tf.uint8):
            raise ValueError(
                f"{name}: unsupported input dtype {self.input_dtype.name}; "
                "expected uint8 or a float type."
            )
        h, w, c = shape[1:]
        self.image_size = (int(h), int(w)) if h and w else None
        self.channels = int(c) if c else None

    def _init_saved_model(self, loaded, signature, output_key):
        names = sorted(loaded.signatures.keys())
        if signature is None:
            for candidate in ("serving_default", "serve"):
                if candidate in loaded.signatures:
                    signature = candidate
                    break
            else:
                if len(names) != 1:
                    raise ValueError(
                        f"{self.name}: choose a signature (--signature); the "
                        f"SavedModel has {names or 'none'}."
                    )
                signature = names[0]
        if signature not in loaded.signatures:
            raise ValueError(
                f"{self.name}: no signature {signature!r}; it has {names}."
            )
        function = loaded.signatures[signature]
        args, kwargs = function.structured_input_signature
        inputs = dict(kwargs)
        inputs.update({f"arg{i}": spec for i, spec in enumerate(args)})
        if len(inputs) != 1:
            raise ValueError(
                f"{self.name}: signature {signature!r} has inputs "
                f"{sorted(inputs)}; an embedding model has one image input."
            )
        ((self._input_name, self._input_spec),) = inputs.items()
        outputs = function.structured_outputs
        if not isinstance(outputs, dict):
            outputs = {"output_0": outputs}
        if output_key is None:
            if "embedding" in outputs:
                output_key = "embedding"
            elif len(outputs) == 1:
                (output_key,) = outputs
            else:
                raise ValueError(
                    f"{self.name}: signature {signature!r} has outputs "
                    f"{sorted(outputs)}; choose one with --output_key."
                )
        if output_key not in outputs:
            raise ValueError(
                f"{self.name}: no output {output_key!r}; the signature has "
                f"{sorted(outputs)}."
            )
        self.signature, self.output_key = signature, output_key
        self._loaded = loaded  # keeps the variables alive
        self._function = function

        def call(x):
            result = function(**{self._input_name: x})
            if not isinstance(result, dict):
                return result
            return result[output_key]

        self._call = call

    def _init_keras(self, model):
        if len(model.inputs) != 1:
            raise ValueError(
                f"{self.name}: the Keras model has {len(model.inputs)} "
                "inputs; an embedding model has one image input."
            )
        tensor = model.inputs[0]
        self._input_spec = tf.TensorSpec(tensor.shape, tensor.dtype)
        self._model = model
        self._call = lambda x: model(x, training=False)

    def describe(self) -> dict:
        """The input the model declares and how images are adapted to it."""
        return {
            "name": self.name,
            "signature": self.signature,
            "output_key": self.output_key,
            "input_dtype": self.input_dtype.name,
            "image_size": list(self.image_size) if self.image_size else None,
            "channels": self.channels,
            "input_normalization": (
                "uint8 pixels"
                if self.input_dtype == tf.uint8
                else self.input_normalization
            ),
        }

    def adapt(self, images: np.ndarray) -> np.ndarray:
        """uint8 (n, h, w, c) → what the model's input expects."""
        images = np.asarray(images)
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(
                f"{self.name}: expected uint8 images (n, h, w, c). "
                f"Received: {images.dtype} {images.shape}"
            )
        have = images.shape[-1]
        if self.channels is not None and have != self.channels:
            if self.channels == 3 and have == 1:
                images = np.repeat(images, 3, axis=-1)
            elif self.channels == 1 and have >= 3:
                luma = images[..., :3].astype(np.float32) @ np.array(
                    [0.299, 0.587, 0.114], np.float32
                )
                images = np.clip(np.round(luma), 0, 255).astype(np.uint8)
                images = images[..., None]
            else:
                raise ValueError(
                    f"{self.name}: the model takes {self.channels} "
                    f"channels, the images have {have}."
                )
        if self.image_size is not None and images.shape[1:3] != tuple(
            self.image_size
        ):
            resized = tf.image.resize(
                tf.cast(images, tf.float32), self.image_size, antialias=True
            )
            images = np.clip(np.round(resized.numpy()), 0, 255)
            images = images.astype(np.uint8)
        if self.input_dtype == tf.uint8:
            return images
        x = images.astype(np.float32)
        if self.input_normalization == "auto":
            x = (x - 127.5) / 128.0
        elif self.input_normalization == "unit":
            x = x / 255.0
        return x.astype(self.input_dtype.as_numpy_dtype)

    def __call__(self, images: np.ndarray, *, flip: bool = False):
        """Embeddings float32 (n, d); with `flip`, f(x) + f(mirror(x))."""
        plain = self._embed(images)
        if not flip:
            return plain
        return plain + self._embed(np.asarray(images)[:, :, ::-1])

    def embed_with_plain(self, images: np.ndarray, *, flip: bool):
        """(embeddings used for scores, plain f(x) for norm statistics)."""
        plain = self._embed(images)
        if not flip:
            return plain, plain
        return plain + self._embed(np.asarray(images)[:, :, ::-1]), plain

    def _embed(self, images: np.ndarray) -> np.ndarray:
        outputs = []
        for start in range(0, len(images), self.batch_size):
            x = self.adapt(images[start : start + self.batch_size])
            y = self._call(tf.constant(x))
            y = np.asarray(y, np.float32)
            if y.ndim != 2 or y.shape[0] != len(x):
                raise ValueError(
                    f"{self.name}: expected embeddings (batch, d), the model "
                    f"returned shape {y.shape}."
                )
            outputs.append(y)
        if not outputs:
            raise ValueError(f"{self.name}: no images to embed.")
        return np.concatenate(outputs)


def load_embedder(model, *, name: str | None = None, **kwargs) -> Embedder:
    """An `Embedder` from a keras.Model, a SavedModel dir or a model_dir."""
    if isinstance(model, (str, os.PathLike)):
        path = resolve_model_path(model)
        try:
            loaded = tf.saved_model.load(str(path))
        except Exception as error:  # a broken or foreign directory
            raise ValueError(
                f"Could not load the SavedModel {path}: "
                f"{type(error).__name__}: {str(error).splitlines()[0]}"
            ) from error
        return Embedder(loaded, name=name or _model_name(path), **kwargs)
    return Embedder(
        model, name=name or getattr(model, "name", "model"), **kwargs
    )


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


def evaluate_verification(
    embedder: Embedder,
    pairs: eval_data.VerificationSet,
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
    scores = metrics.pair_scores(emb[pairs.left], emb[pairs.right], metric)
    out = {
        "result": metrics.verify(
            scores, pairs.issame, fold=pairs.fold, fars=fars
        ),
        "norms": metrics.norm_statistics(plain),
        "embed_seconds": embed_seconds,
        "num_images": int(len(pairs.images)),
        "low_res": {},
    }
    plain_norm = np.linalg.norm(plain, axis=1)
    for factor in low_res:
        low_images = downsample(pairs.images, factor)
        low, low_plain = embedder.embed_with_plain(low_images, flip=flip)
        left = low if low_res_side == "both" else emb
        scores = metrics.pair_scores(left[pairs.left], low[pairs.right], metric)
        low_norm = np.linalg.norm(low_plain, axis=1)
        ok = plain_norm > 0
        out["low_res"][factor] = {
            "result": metrics.verify(
                scores, pairs.issame, fold=pairs.fold, fars=fars
            ),
            "norms": metrics.norm_statistics(low_plain),
            "norm_ratio": float(np.mean(low_norm[ok] / plain_norm[ok])),
        }
    return out


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
    paths, labels, class_names = eval_data.read_image_folder(root, load=False)
    names = np.asarray(class_names)[labels]
    parts = []
    for start in range(0, len(paths), chunk_size):
        images = data.load_images(
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
) -> ModelReport:
    """Runs every requested protocol for one model.

    Args:
        embedder: an `Embedder`.
        verification_sets: {name: `eval_data.VerificationSet`, or a callable
            (image_size, channels) -> VerificationSet, called once}.
        identification: None or {"gallery", "probes", "distractors"
            (optional)} paths.
        metric, flip, low_res, low_res_side, fars: see
            `evaluate_verification`.
        max_rank: CMC length.
    """
    metrics._check_metric(metric)
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
        },
        verification=verification,
        identification=ident,
    )


# ---------------------------------------------------------------------------
# Output.


def _pct(x, digits=2):
    return "n/a" if x is None else f"{100 * x:.{digits}f}"


def format_table(reports: Sequence[ModelReport]) -> str:
    """A plain-text table of the reports (rates in %)."""
    lines = []
    for report in reports:
        s = report.settings
        fars = s["fars"]
        lines.append(
            f"Model {report.model['name']}: metric={s['metric']}, "
            f"flip={s['flip']}"
        )
        if report.verification:
            rows = []
            for name, v in report.verification.items():
                rows.append((name, v["result"]))
                for factor, low in v["low_res"].items():
                    rows.append((f"{name} 1/{factor:g}", low["result"]))
            width = max(len(name) for name, _ in rows) + 2
            head = (
                f"  {'set':<{width}}{'genuine/impostor':>17}"
                f"{'accuracy %':>16}"
                + "".join(f"{'TAR@' + format(f, '.0e'):>11}" for f in fars)
                + f"{'EER %':>8}{'AUC %':>8}"
            )
            lines += [
                "  Verification (10-fold accuracy mean ± std; TAR in %, "
                "n/a: FAR below 1/impostors)",
                head,
            ]
            for name, r in rows:
                acc = f"{_pct(r.accuracy_mean)} ± {_pct(r.accuracy_std)}"
                lines.append(
                    f"  {name:<{width}}"
                    f"{f'{r.num_genuine}/{r.num_impostor}':>17}{acc:>16}"
                    + "".join(f"{_pct(r.tar_at_far[f]):>11}" for f in fars)
                    + f"{_pct(r.eer):>8}{_pct(r.auc):>8}"
                )
            for name, v in report.verification.items():
                n = v["norms"]
                lines.append(
                    f"  Feature norms ({name}): mean {n['mean']:.4g}, "
                    f"std {n['std']:.3g}, cv {n['cv']:.3f}, min "
                    f"{n['min']:.4g}, 1st pct {n['p01']:.4g}, max "
                    f"{n['max']:.4g}"
                )
                for factor, low in v["low_res"].items():
                    lines.append(
                        f"    1/{factor:g} resolution ({s['low_res_side']} "
                        f"side): mean norm {low['norms']['mean']:.4g}, "
                        f"{low['norm_ratio']:.3f}× full resolution, cv "
                        f"{low['norms']['cv']:.3f}"
                    )
        if report.identification:
            r = report.identification["result"]
            lines.append(
                f"  Identification: {r.ranks.size} probes vs "
                f"{r.num_gallery} gallery + {r.num_distractors} "
                f"distractors: rank-1 {_pct(r.rank1)}%, rank-5 "
                f"{_pct(r.rank5)}%"
            )
        lines.append("")
    return "\n".join(lines)


def _import_pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "PNG plots need matplotlib: pip install matplotlib "
            "(or run without plots)."
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def write_outputs(
    reports: Sequence[ModelReport],
    output_dir: str | os.PathLike,
    *,
    plots: bool = True,
    extra: dict | None = None,
) -> list[pathlib.Path]:
    """Writes results.json and the PNG plots; returns the paths written.

    Plots: `roc_<set>.png` (every model's ROC on a log-FAR axis, low
    resolution dashed), `cmc.png`, `norms_<set>.png` (norm histograms).
    """
    output_dir = pathlib.Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    payload = {"models": [r.to_dict() for r in reports]}
    if extra:
        payload.update(extra)
    json_path = output_dir / "results.json"
    json_path.write_text(json.dumps(payload, indent=1) + "\n")
    written = [json_path]
    if not plots:
        return written
    plt = _import_pyplot()
    set_names = []
    for r in reports:
        set_names += [n for n in r.verification if n not in set_names]
    for set_name in set_names:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for r in reports:
            v = r.verification.get(set_name)
            if v is None:
                continue
            curves = [(r.model["name"], v["result"], "-")]
            curves += [
                (f"{r.model['name']} 1/{f:g}", low["result"], "--")
                for f, low in v["low_res"].items()
            ]
            for label, res, style in curves:
                c = res.roc
                keep = c.far > 0
                ax.plot(
                    c.far[keep],
                    c.tar[keep],
                    style,
                    drawstyle="steps-post",
                    label=f"{label} (AUC {100 * res.auc:.2f}%)",
                )
        ax.set_xscale("log")
        ax.set_xlabel("false accept rate")
        ax.set_ylabel("true accept rate")
        ax.set_title(f"ROC: {set_name}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        path = output_dir / f"roc_{_safe(set_name)}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

        fig, ax = plt.subplots(figsize=(6, 4.5))
        for r in reports:
            v = r.verification.get(set_name)
            if v is None:
                continue
            norms = [(r.model["name"], v["norms"])]
            norms += [
                (f"{r.model['name']} 1/{f:g}", low["norms"])
                for f, low in v["low_res"].items()
            ]
            for label, n in norms:
                h = n["histogram"]
                ax.stairs(h["counts"], h["edges"], label=label)
        ax.set_xlabel("embedding norm ‖f(x)‖₂")
        ax.set_ylabel("images")
        ax.set_title(f"Feature norms: {set_name}")
        ax.legend(fontsize=8)
        path = output_dir / f"norms_{_safe(set_name)}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    with_ident = [r for r in reports if r.identification]
    if with_ident:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for r in with_ident:
            res = r.identification["result"]
            ranks = np.arange(1, res.cmc.size + 1)
            ax.plot(
                ranks,
                100 * res.cmc,
                drawstyle="steps-post",
                label=f"{r.model['name']} (rank-1 {100 * res.rank1:.2f}%)",
            )
        ax.set_xscale("log")
        ax.set_xlabel("rank")
        ax.set_ylabel("identification rate (%)")
        num = with_ident[0].identification["result"].num_distractors
        ax.set_title(f"CMC: gallery + {num} distractors")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        path = output_dir / "cmc.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def verify_pairs(embedding_model, pairs_path, image_dir):
    """10-fold accuracy and TAR@FAR 1e-3, 1e-4 of `pairs_path` (LFW format)
    for an in-memory embedding model (the end of training)."""
    embedder = load_embedder(embedding_model, name="model")
    pairs = eval_data.read_lfw_pairs(
        pairs_path, image_dir, image_size=embedder.image_size,
        channels=embedder.channels,
    )
    embeddings = embedder(pairs.images)
    scores = metrics.pair_scores(
        embeddings[pairs.left], embeddings[pairs.right]
    )
    return metrics.verify(
        scores, pairs.issame, fold=getattr(pairs, "fold", None),
        fars=(1e-3, 1e-4),
    )


def format_verification(result, title):
    """A short markdown table of a `metrics.VerificationResult`."""

    def rate(x):
        return "n/a" if x is None else f"{100 * x:.2f}%"

    rows = [
        f"{title}: {result.num_genuine} genuine, {result.num_impostor} "
        "impostor pairs",
        "| 10-fold accuracy | TAR@FAR=1e-3 | TAR@FAR=1e-4 |",
        "|---|---|---|",
        f"| {100 * result.accuracy_mean:.2f}% ± {100 * result.accuracy_std:.2f}"
        f" | {rate(result.tar_at_far.get(1e-3))}"
        f" | {rate(result.tar_at_far.get(1e-4))} |",
    ]
    return "\n".join(rows)
