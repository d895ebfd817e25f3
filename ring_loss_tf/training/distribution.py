"""Distribution: the strategy for this process (one machine's devices, or
the workers of a TF_CONFIG), whether a run compiles with XLA by default, and
which worker is the chief."""

from __future__ import annotations

import tensorflow as tf

from ring_loss_tf.cluster import tf_config_workers


def build_strategy(devices=None, collectives="auto"):
    """The distribution strategy for this process.

    - `TF_CONFIG` naming several workers: `MultiWorkerMirroredStrategy`
      (one replica per local GPU, or the CPU) with `collectives`: "auto"
      lets TensorFlow choose (NCCL where every worker has GPUs, ring
      otherwise), "nccl" or "ring" force one.
    - Otherwise `MirroredStrategy` over `devices`, default all visible GPUs,
      or the CPU when there is none. On CPU-only device lists the gradients
      are reduced with `ReductionToOneDevice`: the default collectives can
      fail with "Shape mismatch in the collective instance" when a second
      strategy with another model runs in the same process (seen with
      TensorFlow 2.21 when a test builds two trainers).

    Args:
        devices: device names, e.g. `["/cpu:0", "/cpu:1"]` (logical CPU
            devices); None for the default above.
        collectives: "auto", "nccl" or "ring" (multi-worker runs only; one
            machine's GPUs use NCCL through `MirroredStrategy`'s default).
    """
    if len(tf_config_workers()) > 1:
        if devices is not None:
            raise ValueError(
                "`devices` cannot be combined with a multi-worker TF_CONFIG: "
                "each worker uses its local devices. Received: "
                f"devices={devices!r}"
            )
        implementations = tf.distribute.experimental.CommunicationImplementation
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=getattr(implementations, collectives.upper())
        )
        return tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=options
        )
    if devices is None:
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus] or ["/cpu:0"]
    devices = list(devices)
    cpu_only = all("CPU" in d.upper() for d in devices)
    cross_device_ops = None
    if cpu_only:
        cross_device_ops = tf.distribute.ReductionToOneDevice()
    return tf.distribute.MirroredStrategy(
        devices, cross_device_ops=cross_device_ops
    )


def jit_by_default(strategy, xla_on_cpu=True):
    """Whether a run that does not say compiles with XLA.

    On GPUs, yes. On a CPU, only when TensorFlow's convolutions are not
    oneDNN's (`onednn_kernels_enabled`): TensorFlow turns oneDNN on by
    default only on CPUs with AVX512_VNNI, AVX512_BF16, AVX_VNNI or AMX, and
    without it its Eigen convolutions trained at half XLA's rate, while
    with it XLA was the slower one (docs: performance). XLA when the
    question cannot be answered. `xla_on_cpu=False` (a backbone's
    `registry.Backbone.xla_on_cpu`) keeps XLA off on any CPU.
    """
    if any("GPU" in device.upper()
           for device in strategy.extended.worker_devices):
        return True
    return xla_on_cpu and not onednn_kernels_enabled()


def onednn_kernels_enabled():
    """Whether this process's TensorFlow runs its CPU ops with oneDNN: its
    default on CPUs of the AVX-512 VNNI / AMX kind, not on AVX2-only ones;
    `TF_ENABLE_ONEDNN_OPTS=0|1` (read when TensorFlow loads) overrides.
    None when TensorFlow does not say."""
    try:
        from tensorflow.python.util import _pywrap_util_port
        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return None


def is_chief(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    cluster = resolver.cluster_spec().as_dict()
    return (
        "chief" not in cluster
        and resolver.task_type == "worker"
        and resolver.task_id == 0
    )
