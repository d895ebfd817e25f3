"""Embeds uint8 images with an embedding model, adapted to its input.

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
`ring_loss_tf.evaluation.protocols` runs the protocols on what it returns.

A SavedModel is a program, not data: its functions run whatever operations
they hold when called, and TensorFlow's own security guidance says to load
only models from sources you trust. `load_embedder` therefore reads the
graph of a SavedModel directory from its saved_model.pb first, before any of
it is loaded, and refuses a model whose graph holds an operation of
`UNSAFE_OPS` (file, network, debugging and Python-callback operations; see
`check_saved_model`) unless called with `trust_saved_model=True`.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
import tensorflow as tf

INPUT_NORMALIZATIONS = ("auto", "none", "unit")
EXPORT_SUBDIR = "export"  # where training writes the SavedModel (training.loop)


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


# --------------------------------------------------------------------------
# What a SavedModel may hold: inspected before loading, so nothing of it runs
# --------------------------------------------------------------------------

# Operations of TensorFlow's own registry that reach outside the model: the
# file system, the network, Python, or log files. An embedding model needs
# none of them (ours hold image decoding, arithmetic and variables). Ops a
# SavedModel names but this process has not registered fail to load, so a
# model cannot bring kernels of its own (e.g. one that starts a process).
_FILE_OPS = (
    # read, list or write files directly
    "ReadFile", "WriteFile", "MatchingFiles", "FileSystemSetConfiguration",
    "ImmutableConst",  # memory-maps a file
    # readers and datasets over files or databases
    "WholeFileReader", "WholeFileReaderV2", "TextLineReader",
    "TextLineReaderV2", "FixedLengthRecordReader", "FixedLengthRecordReaderV2",
    "TFRecordReader", "TFRecordReaderV2", "LMDBReader", "RecordInput",
    "MatchingFilesDataset", "ExperimentalMatchingFilesDataset",
    "TFRecordDataset", "TFRecordDatasetV2", "TextLineDataset",
    "FixedLengthRecordDataset", "FixedLengthRecordDatasetV2", "CSVDataset",
    "CSVDatasetV2", "ExperimentalCSVDataset", "LMDBDataset",
    "ExperimentalLMDBDataset", "SqlDataset", "ExperimentalSqlDataset",
    "DatasetToTFRecord", "ExperimentalDatasetToTFRecord",
    "SaveDataset", "SaveDatasetV2", "LoadDataset", "DistributedSave",
    "SnapshotDataset", "SnapshotDatasetV2", "SnapshotDatasetReader",
    "SnapshotChunkDataset", "SnapshotNestedDatasetReader",
    "ListSnapshotChunksDataset",
    "CacheDataset", "CacheDatasetV2",  # a cache file when given a name
    # ops with a file-name attribute or input
    "InitializeTableFromTextFile", "InitializeTableFromTextFileV2",
    "FixedUnigramCandidateSampler", "LoadAndRemapMatrix",
    "GenerateVocabRemapping",
    "DecodeProtoV2", "EncodeProto",  # descriptor_source may be a file
    "PrintV2",  # output_stream may be "file://<path>"
)
_CHECKPOINT_OPS = (
    "Save", "SaveSlices", "SaveV2", "Restore", "RestoreSlice", "RestoreV2",
    "DTensorRestoreV2", "MergeV2Checkpoints",
)
_LOG_OPS = (
    # summary (event) files and the debugger's dumps and URLs
    "CreateSummaryFileWriter", "CreateSummaryDbWriter", "SummaryWriter",
    "WriteSummary", "WriteRawProtoSummary", "WriteScalarSummary",
    "WriteHistogramSummary", "WriteImageSummary", "WriteAudioSummary",
    "WriteGraphSummary", "ImportEvent", "FlushSummaryWriter",
    "CloseSummaryWriter", "StatsAggregatorSetSummaryWriter",
    "DebugIdentity", "DebugIdentityV2", "DebugIdentityV3", "DebugNanCount",
    "DebugNumericSummary", "DebugNumericSummaryV2",
)
_NETWORK_OPS = (
    "RpcServer", "RpcServerRegister", "RpcServerStart", "RpcClient",
    "RpcCall", "RpcCheckStatus", "RpcGetValue", "DeleteRpcFutureResource",
    "RemoteCall", "DataServiceDataset", "DataServiceDatasetV2",
    "DataServiceDatasetV3", "DataServiceDatasetV4", "RegisterDataset",
    "RegisterDatasetV2",
)
_PYTHON_OPS = ("PyFunc", "PyFuncStateless", "EagerPyFunc")
UNSAFE_OPS = {
    **{op: "reads or writes files" for op in _FILE_OPS},
    **{op: "reads or writes checkpoint files" for op in _CHECKPOINT_OPS},
    **{op: "writes log or debug files" for op in _LOG_OPS},
    **{op: "uses the network" for op in _NETWORK_OPS},
    **{op: "calls Python code" for op in _PYTHON_OPS},
}


class UnsafeModelError(ValueError):
    """A SavedModel holds an operation of `UNSAFE_OPS`."""


def _read_saved_model(path: pathlib.Path):
    from google.protobuf import text_format
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    try:
        if (path / "saved_model.pb").is_file():
            proto.ParseFromString((path / "saved_model.pb").read_bytes())
        else:
            text_format.Parse(
                (path / "saved_model.pbtxt").read_text(), proto
            )
    except Exception as error:  # not a SavedModel proto at all
        raise ValueError(
            f"Could not load the SavedModel {path}: its saved_model.pb is "
            f"not a SavedModel ({type(error).__name__}: "
            f"{' '.join(str(error).split())[:200]})."
        ) from None
    return proto


def _called_functions(attrs):
    """Names of the functions an op's attributes name (a call, a loop or
    branch body, a dataset's map function), nested attributes included."""
    names = []
    stack = list(attrs.values())
    while stack:
        value = stack.pop()
        kind = value.WhichOneof("value")
        if kind == "func":
            names.append(value.func.name)
            stack.extend(value.func.attr.values())
        elif kind == "list":
            for func in value.list.func:
                names.append(func.name)
                stack.extend(func.attr.values())
    return names


def _node_name(tensor_name: str) -> str:
    return tensor_name.lstrip("^").split(":")[0]


def saved_model_ops(path) -> list[tuple[str, str]]:
    """(op, where) of each operation a SavedModel may run, read from its
    saved_model.pb without loading it.

    Every node of every meta graph and every function of its library
    (functions called from functions included) is listed, except the
    checkpoint operations (`SaveV2`, `RestoreV2`, ...) of the functions only
    its saver runs: every SavedModel has them (TensorFlow Serving restores
    the variables with them; `tf.saved_model.load` restores them itself and
    never calls them).
    """
    path = pathlib.Path(path)
    proto = _read_saved_model(path)
    found = []
    for meta_graph in proto.meta_graphs:
        graph = meta_graph.graph_def
        functions = {f.signature.name: f for f in graph.library.function}
        nodes = {n.name: n for n in graph.node}

        def reach(start_nodes, start_functions):
            """Nodes and functions `start_*` run (their inputs, calls)."""
            seen_nodes, seen_functions = set(), set()
            node_stack, function_stack = list(start_nodes), list(
                start_functions)
            while node_stack or function_stack:
                if node_stack:
                    name = node_stack.pop()
                    if name in seen_nodes or name not in nodes:
                        continue
                    seen_nodes.add(name)
                    node = nodes[name]
                    node_stack.extend(_node_name(i) for i in node.input)
                    function_stack.extend(_called_functions(node.attr))
                else:
                    name = function_stack.pop()
                    if name in seen_functions or name not in functions:
                        continue
                    seen_functions.add(name)
                    for node in functions[name].node_def:
                        function_stack.extend(_called_functions(node.attr))
            return seen_nodes, seen_functions

        saver = meta_graph.saver_def
        saver_roots = [
            _node_name(t) for t in (saver.save_tensor_name,
                                    saver.restore_op_name) if t
        ]
        saver_nodes, saver_functions = reach(saver_roots, [])
        # What a caller can run besides the saver: every other node, the
        # signatures' tensors, every other function and those the object
        # graph restores as callables.
        signature_nodes = [
            _node_name(info.name)
            for signature in meta_graph.signature_def.values()
            for info in (*signature.inputs.values(),
                         *signature.outputs.values())
        ]
        other_nodes, other_functions = reach(
            [n for n in nodes if n not in saver_nodes] + signature_nodes,
            [f for f in functions if f not in saver_functions]
            + list(meta_graph.object_graph_def.concrete_functions),
        )
        only_saver_nodes = saver_nodes - other_nodes
        only_saver_functions = saver_functions - other_functions

        def keep(op, saver_only):
            return not (saver_only and op in _CHECKPOINT_OPS)

        for node in graph.node:
            if keep(node.op, node.name in only_saver_nodes):
                found.append((node.op, f"node {node.name!r}"))
        for name, function in functions.items():
            for node in function.node_def:
                if keep(node.op, name in only_saver_functions):
                    found.append(
                        (node.op, f"function {name!r}, node {node.name!r}")
                    )
    return found


def check_saved_model(path) -> None:
    """Refuses a SavedModel whose graph holds an operation of `UNSAFE_OPS`.

    Reads saved_model.pb only (`saved_model_ops`): nothing of the model is
    loaded or run.

    Raises:
        UnsafeModelError: one line naming the operation, where it is, and
            the flag that loads the model anyway.
        ValueError: saved_model.pb is not a SavedModel.
    """
    path = pathlib.Path(path)
    for op, where in saved_model_ops(path):
        if op in UNSAFE_OPS:
            raise UnsafeModelError(
                f"Refusing to load the SavedModel {path}: its graph holds a "
                f"{op} operation ({where}), which {UNSAFE_OPS[op]}; a "
                "SavedModel is a program and would run it. If you trust "
                "where the model comes from, pass --trust_saved_model "
                "(trust_saved_model=True)."
            )


def _model_name(path: pathlib.Path) -> str:
    # ".../run1/export" is better named "run1".
    return path.parent.name if path.name == EXPORT_SUBDIR else path.name


# A call's activations grow with its pixels: an iResNet or MobileFaceNet
# takes about 55 MB per 112×112 image in inference on CPU, so 512 of them
# (the evaluation default) need ~28 GB; 64 need ~3.5 GB.
PIXELS_PER_CALL = 64 * 112 * 112


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
        batch_size: images per call, at most `PIXELS_PER_CALL` pixels'
            worth (64 images of 112×112).
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

    def calls_of(self, height, width):
        """Images per model call for images of (height, width)."""
        return max(1, min(self.batch_size,
                          PIXELS_PER_CALL // max(1, height * width)))

    def _embed(self, images: np.ndarray) -> np.ndarray:
        outputs = []
        height, width = self.image_size or np.shape(images)[1:3]
        batch = self.calls_of(height, width)
        for start in range(0, len(images), batch):
            x = self.adapt(images[start : start + batch])
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


def load_embedder(
    model,
    *,
    name: str | None = None,
    trust_saved_model: bool = False,
    **kwargs,
) -> Embedder:
    """An `Embedder` from a keras.Model, a SavedModel dir or a model_dir.

    A SavedModel is a program: loading and calling it runs the operations
    its author put in it. Unless `trust_saved_model`, its graph is read
    first and a model holding file, network, debugging or Python-callback
    operations is refused (`check_saved_model`). Load only models from
    sources you trust.

    Raises:
        FileNotFoundError: no SavedModel at `model`.
        UnsafeModelError: the SavedModel holds an operation of
            `UNSAFE_OPS` (and not `trust_saved_model`).
        ValueError: it cannot be loaded, or is not an embedding model.
    """
    if isinstance(model, (str, os.PathLike)):
        path = resolve_model_path(model)
        if not trust_saved_model:
            check_saved_model(path)
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
