"""Backbones: functions returning a `keras.Model` from images to embeddings.

The input is the normalised image batch the data pipeline produces, shape
`(batch_size, height, width, channels)`, float; the output is the embedding
batch `(batch_size, embedding_dim)`. Losses and heads (`RingLoss`,
`ASoftmax`, ...) sit on top of the embedding; see `ring_loss_tf.training`.

- `sphereface20`: the paper's network (SphereFace-20, Liu et al. 2017, as used
  by Zheng et al. 2018): 112×96 RGB, four stages of 64/128/256/512 channels,
  each a stride-2 3×3 conv then 1/2/4/1 residual units of two 3×3 convs, PReLU
  everywhere, no BatchNorm, a 512-d fully-connected embedding. 28M parameters;
  a network for GPUs (about 12 images/s forward+backward on 2 CPU cores).
- `sphereface4`: the same stages without residual units (SphereFace-4).
- `small_cnn`: the CPU default for the embedded 32×32 grey characters. It
  downsamples first (a stride-2 conv on the input) because on a CPU the
  cost is the convolutions at full resolution: on 2 cores, six PReLU convs
  with a 2000-way softmax (batch 256) train at 580–1,140 images/s this way
  and at 340–640 when they downsample late.

Reference: https://arxiv.org/abs/1704.08063 (SphereFace, Table 2).
"""

import keras

from ring_loss_tf import layers
from ring_loss_tf.registry import EMBEDDING_BLOCKS

# The Caffe SphereFace model: Xavier for the stride-2 convs, N(0, 0.01) for
# the convs inside residual units, PReLU slopes initialised to 0.25.
_RESIDUAL_INIT = keras.initializers.RandomNormal(stddev=0.01)


def _check_common(input_shape, embedding_dim, embedding_block="fc"):
    if embedding_block not in EMBEDDING_BLOCKS:
        raise ValueError(
            f"`embedding_block` must be one of {EMBEDDING_BLOCKS}. "
            f"Received: embedding_block={embedding_block!r}"
        )
    if len(input_shape) != 3 or any(
        not isinstance(d, int) or d <= 0 for d in input_shape
    ):
        raise ValueError(
            "`input_shape` must be (height, width, channels) of positive "
            f"ints. Received: input_shape={input_shape!r}"
        )
    if not isinstance(embedding_dim, int) or embedding_dim <= 0:
        raise ValueError(
            "`embedding_dim` must be a positive int. "
            f"Received: embedding_dim={embedding_dim!r}"
        )


def _prelu(x, name):
    # One slope per channel, as Caffe's PReLU (channel_shared: false).
    return keras.layers.PReLU(
        alpha_initializer=keras.initializers.Constant(0.25),
        shared_axes=[1, 2],
        name=name,
    )(x)


class _Seeds:
    """Distinct initialiser seeds seed, seed+1, ... (None stays None)."""

    def __init__(self, seed):
        self.seed = seed

    def __call__(self):
        if self.seed is None:
            return None
        self.seed += 1
        return self.seed - 1


def _conv(x, filters, strides, name, initializer, seeds):
    return keras.layers.Conv2D(
        filters,
        3,
        strides=strides,
        padding="same",
        kernel_initializer=_seeded(initializer, seeds()),
        name=name,
    )(x)


def _seeded(initializer, seed):
    """A fresh initializer with `seed`: building twice gives equal weights."""
    if initializer == "glorot_uniform":
        return keras.initializers.GlorotUniform(seed=seed)
    if initializer == "he_normal":
        return keras.initializers.HeNormal(seed=seed)
    return keras.initializers.RandomNormal(
        stddev=initializer.stddev, seed=seed
    )


def _embedding(x, embedding_dim, embedding_block, initializer, name):
    """The last feature map → `(batch, embedding_dim)` (see EMBEDDING_BLOCKS)."""
    if embedding_block == "bn":
        x = layers.BatchNorm(name="feature_bn")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(
        embedding_dim, kernel_initializer=initializer, name=name
    )(x)
    if embedding_block == "bn":
        # insightface freezes this BatchNorm's scale at 1.
        x = layers.BatchNorm(scale=False, name="embedding_bn")(x)
    return x


def _sphereface(units, input_shape, embedding_dim, name, seed,
                embedding_block):
    """SphereFace stages: stride-2 conv + `units[i]` residual units each."""
    _check_common(input_shape, embedding_dim, embedding_block)
    seeds = _Seeds(seed)
    images = keras.Input(input_shape, name="images")
    x = images
    for stage, (filters, num_units) in enumerate(
        zip((64, 128, 256, 512), units), start=1
    ):
        prefix = f"conv{stage}"
        x = _conv(x, filters, 2, f"{prefix}_1", "glorot_uniform", seeds)
        x = _prelu(x, f"{prefix}_1_prelu")
        for unit in range(num_units):
            shortcut = x
            for j in (2 * unit + 2, 2 * unit + 3):
                x = _conv(x, filters, 1, f"{prefix}_{j}", _RESIDUAL_INIT, seeds)
                x = _prelu(x, f"{prefix}_{j}_prelu")
            x = keras.layers.Add(name=f"{prefix}_res{unit + 1}")([shortcut, x])
    embeddings = _embedding(
        x, embedding_dim, embedding_block,
        _seeded("glorot_uniform", seeds()), "fc5",
    )
    return keras.Model(images, embeddings, name=name)


def sphereface20(input_shape=(112, 96, 3), embedding_dim=512, seed=None,
                 embedding_block="fc"):
    """SphereFace-20: 20 conv layers, 1/2/4/1 residual units (the paper's).

    Args:
        input_shape: `(height, width, channels)`; the paper uses 112×96×3
            normalised as (x − 127.5) / 128.
        embedding_dim: size of the fully-connected embedding (paper: 512).
        seed: seed of the weight initialisers (None: random).
        embedding_block: "fc" (the paper's) or "bn" (BN → FC → BN, see
            `EMBEDDING_BLOCKS`).

    Returns:
        A `keras.Model` from `(batch, *input_shape)` images to
        `(batch, embedding_dim)` embeddings.
    """
    return _sphereface(
        (1, 2, 4, 1), input_shape, embedding_dim, "sphereface20", seed,
        embedding_block,
    )


def sphereface4(input_shape=(112, 96, 3), embedding_dim=512, seed=None,
                embedding_block="fc"):
    """SphereFace-4: the four stride-2 conv stages of SphereFace-20 only.

    Same arguments and output as `sphereface20`.
    """
    return _sphereface(
        (0, 0, 0, 0), input_shape, embedding_dim, "sphereface4", seed,
        embedding_block,
    )


def small_cnn(
    input_shape=(32, 32, 1), embedding_dim=128, seed=None, widths=(16, 32, 64),
    embedding_block="fc",
):
    """A small PReLU CNN for the embedded 32×32 grey characters (CPU default).

    Three stages of two 3×3 convs (`widths` channels; stride 2 on the first
    conv of each stage, so 32×32 → 16 → 8 → 4), PReLU, no BatchNorm (like
    SphereFace), then a fully-connected embedding. He-normal initialisation
    keeps the activation scale through the PReLUs (Glorot shrinks it about
    2× per layer here, so the first features would have norms near 0.1).

    Args:
        input_shape, embedding_dim, seed, embedding_block: as
            `sphereface20`.
        widths: channels of the three stages.

    Returns:
        A `keras.Model` from images to `(batch, embedding_dim)` embeddings.
    """
    _check_common(input_shape, embedding_dim, embedding_block)
    if len(widths) != 3 or any(
        not isinstance(w, int) or w <= 0 for w in widths
    ):
        raise ValueError(
            "`widths` must be three positive ints (channels per stage). "
            f"Received: widths={widths!r}"
        )
    seeds = _Seeds(seed)
    images = keras.Input(input_shape, name="images")
    x = images
    for stage, filters in enumerate(widths, start=1):
        for j, strides in ((1, 2), (2, 1)):
            x = _conv(
                x, filters, strides, f"conv{stage}_{j}", "he_normal", seeds
            )
            x = _prelu(x, f"conv{stage}_{j}_prelu")
    embeddings = _embedding(
        x, embedding_dim, embedding_block,
        _seeded("glorot_uniform", seeds()), "embedding",
    )
    return keras.Model(images, embeddings, name="small_cnn")

