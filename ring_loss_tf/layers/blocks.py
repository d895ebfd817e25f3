"""Backbone blocks the distributed step needs: `BatchNorm` (statistics of
this replica's batch, for `strategy.run`) and `GroupedConv2D` (a grouped
convolution computed as one dense convolution).
"""

import keras
from keras import ops

from ring_loss_tf.layers.ops import PACKAGE
from ring_loss_tf.layers.ops import check_positive
from ring_loss_tf.layers.ops import float32
from ring_loss_tf.layers.ops import plain_number
from ring_loss_tf.layers.ops import replica_local_weight


# --------------------------------------------------------------------------
# BatchNorm for the custom distributed step
# --------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package=PACKAGE)
class BatchNorm(keras.layers.Layer):
    """Batch normalisation over all axes but the last, for `strategy.run`.

    In training:  y = γ · (x − μ_B) / √(σ²_B + ε) + β, with μ_B, σ²_B the
    mean and (biased) variance of this replica's batch; the moving averages
    follow m ← momentum · m + (1 − momentum) · batch value. In inference
    the moving averages replace the batch statistics.

    `keras.layers.BatchNormalization` cannot be trained by the project's
    step: it writes its moving averages through a cross-replica merge,
    which a compiled function inside `strategy.run` does not allow. Here
    they are on-read replica-local weights (each replica updates its copy;
    reading or saving averages them), as A-Softmax's counter is. Batch
    statistics are per replica, as in insightface's trainer (plain
    BatchNorm under DDP): with several replicas the update is not the
    one-device update.

    Args:
        momentum: of the moving averages (0.9, PyTorch's 0.1).
        epsilon: ε.
        scale: learn γ (False: γ = 1, as insightface's embedding BN).
        center: learn β.
    """

    def __init__(self, momentum=0.9, epsilon=1e-5, scale=True, center=True,
                 **kwargs):
        super().__init__(**kwargs)
        momentum = plain_number(momentum)
        if not 0 <= momentum < 1:
            raise ValueError(
                f"`momentum` must be in [0, 1). Received: momentum={momentum!r}"
            )
        self.momentum = momentum
        self.epsilon = check_positive("epsilon", epsilon)
        self.scale = bool(scale)
        self.center = bool(center)

    def build(self, input_shape):
        shape = (input_shape[-1],)
        self.gamma = self.beta = None
        # Read in float32 under mixed precision, like the statistics.
        if self.scale:
            self.gamma = self.add_weight(
                shape=shape, name="gamma", initializer="ones", autocast=False
            )
        if self.center:
            self.beta = self.add_weight(
                shape=shape, name="beta", initializer="zeros", autocast=False
            )
        self.moving_mean = replica_local_weight(
            self, "moving_mean", shape, "zeros", "float32", "mean"
        )
        self.moving_variance = replica_local_weight(
            self, "moving_variance", shape, "ones", "float32", "mean"
        )

    def call(self, x, training=None):
        # In float32 under mixed precision, as keras.layers
        # .BatchNormalization: in float16, x − μ keeps few of the digits
        # that differ, and the gradient of 1/√(σ² + ε), −½(σ² + ε)^(−3/2),
        # overflows once σ² + ε < 4e-4 (NaN in MobileFaceNet's GDC).
        dtype = x.dtype
        x = float32(x)
        axes = tuple(range(len(x.shape) - 1))
        if training:
            mean, variance = ops.moments(x, axes=axes)
            for moving, value in (
                (self.moving_mean, mean), (self.moving_variance, variance),
            ):
                moving.assign(
                    self.momentum * moving + (1.0 - self.momentum) * value
                )
        else:
            mean, variance = self.moving_mean, self.moving_variance
        inverse = ops.rsqrt(variance + self.epsilon)
        if self.gamma is not None:
            inverse = inverse * self.gamma
        y = (x - mean) * inverse
        if self.beta is not None:
            y = y + self.beta
        return ops.cast(y, dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "momentum": self.momentum,
                "epsilon": self.epsilon,
                "scale": self.scale,
                "center": self.center,
            }
        )
        return config


def grouped_conv2d(inputs, kernel, groups, strides=1, padding="valid",
                   dilation_rate=1):
    """The grouped convolution of `inputs`, computed as one dense conv.

    `kernel` is `keras.layers.Conv2D(groups=g)`'s, `(k_h, k_w, c_in / g,
    c_out)`: input channels [i·c_in/g, (i+1)·c_in/g) feed only output
    channels [i·c_out/g, (i+1)·c_out/g). The dense kernel `(k_h, k_w, c_in,
    c_out)` holds those blocks on its diagonal and zeros elsewhere, so the
    result, and the gradient with respect to `kernel`, are the grouped
    convolution's.

    Args:
        inputs: `(batch, height, width, c_in)`.
        kernel: `(k_h, k_w, c_in / groups, c_out)`.
        groups: g, dividing c_in and c_out.
        strides, padding, dilation_rate: as `keras.ops.conv`.

    Returns: `(batch, out_height, out_width, c_out)`.
    """
    kernel = ops.convert_to_tensor(kernel)
    k_h, k_w, per_group, filters = kernel.shape
    blocks = ops.reshape(
        kernel, (k_h, k_w, 1, per_group, groups, filters // groups)
    )
    mask = ops.reshape(
        ops.eye(groups, dtype=kernel.dtype), (1, 1, groups, 1, groups, 1)
    )
    dense = ops.reshape(blocks * mask, (k_h, k_w, groups * per_group, filters))
    return ops.conv(
        inputs, dense, strides=strides, padding=padding,
        dilation_rate=dilation_rate,
    )


@keras.saving.register_keras_serializable(package=PACKAGE)
class GroupedConv2D(keras.layers.Conv2D):
    """`keras.layers.Conv2D` whose groups run as one dense convolution.

    Same arguments, weights and outputs as `keras.layers.Conv2D` (with
    `groups` g: a kernel `(k_h, k_w, c_in / g, filters)`), computed by
    `grouped_conv2d`: g times the multiply-adds, because TensorFlow's CPU
    kernels for grouped convolutions are slower than that by far.
    MobileFaceNet's 3×3 conv of 128 channels in 64 groups (batch 8, 56×56,
    forward + backward, 2 CPU cores, `bench/backbones.py`) takes 13 s as a
    grouped conv, with or without XLA, and 49 ms as the dense one (58 ms
    under XLA), which lets the whole network train at 17 images/s instead
    of under 1. On a GPU, where grouped convolutions are fast, the dense
    form only adds its multiply-adds.

    Input shape: `(batch, height, width, c_in)` (channels last). Output
    shape: as `keras.layers.Conv2D`'s.
    """

    def convolution_op(self, inputs, kernel):
        if self.groups == 1 or self.data_format != "channels_last":
            return super().convolution_op(inputs, kernel)
        return grouped_conv2d(
            inputs, kernel, self.groups, strides=list(self.strides),
            padding=self.padding, dilation_rate=self.dilation_rate,
        )
