"""SavedModels for the tests of what evaluate.py agrees to load.

`save_plain(path)` writes a tiny embedding model of any input size (uint8
RGB images → their mean colour, 3 numbers): what a third-party export looks
like. `save_crafted(path, kind, witness)` writes the same model with one
operation that reaches outside the model hidden in its serving function,
the way a hostile model would: writing `witness` (WriteFile), a Python
callback that writes it from a function nested in another (EagerPyFunc),
reading a file in a loop body (ReadFile in a While body function), or
reading a checkpoint (RestoreV2, allowed only in the saver's functions).
Not public API; test modules import helpers from here, never from another
test module.
"""

import tensorflow as tf

KINDS = ("write_file", "nested_py_function", "read_file_in_loop",
         "restore_v2")
# The operation each kind puts in the graph.
OPS = {
    "write_file": "WriteFile",
    "nested_py_function": "EagerPyFunc",
    "read_file_in_loop": "ReadFile",
    "restore_v2": "RestoreV2",
}
_IMAGES = tf.TensorSpec((None, None, None, 3), tf.uint8, name="images")


def _embed(images):
    return tf.reduce_mean(tf.cast(images, tf.float32), axis=[1, 2])


class _Plain(tf.Module):
    @tf.function(input_signature=[_IMAGES])
    def serve(self, images):
        return {"embedding": _embed(images)}


def save_plain(path):
    module = _Plain()
    tf.saved_model.save(module, str(path),
                        signatures={"serving_default": module.serve})
    return path


def _hidden(kind, witness):
    """The extra computation of `kind`: a scalar float32 that is 0."""
    witness = str(witness)
    if kind == "write_file":
        tf.io.write_file(witness, "written by the model")
        return tf.constant(0.0)
    if kind == "nested_py_function":

        def write():
            with open(witness, "w") as file:
                file.write("written by Python in the model")
            return 0.0

        @tf.function
        def inner():
            return tf.py_function(write, [], tf.float32)

        return inner()
    if kind == "read_file_in_loop":
        _, total = tf.while_loop(
            lambda i, total: i < 1,
            lambda i, total: (
                i + 1,
                total + tf.strings.length(tf.io.read_file(witness)),
            ),
            (tf.constant(0), tf.constant(0)),
        )
        return tf.cast(total, tf.float32) * 0.0
    if kind == "restore_v2":
        (value,) = tf.raw_ops.RestoreV2(
            prefix=witness, tensor_names=["x"], shape_and_slices=[""],
            dtypes=[tf.float32],
        )
        return tf.reduce_sum(value) * 0.0
    raise ValueError(f"unknown kind {kind!r}")


def save_crafted(path, kind, witness):
    """The plain model with the operation of `kind` in its serving
    function (see the module docstring)."""

    class Crafted(tf.Module):
        @tf.function(input_signature=[_IMAGES])
        def serve(self, images):
            extra = _hidden(kind, witness)
            return {"embedding": _embed(images) + extra}

    module = Crafted()
    tf.saved_model.save(module, str(path),
                        signatures={"serving_default": module.serve})
    return path
