"""Backbones: functions returning a `keras.Model` from images to embeddings.

The input is the normalised image batch the data pipeline produces, shape
`(batch_size, height, width, channels)`, float; the output is the embedding
batch `(batch_size, embedding_dim)`. Losses and heads (`RingLoss`,
`ASoftmax`, ...) sit on top of the embedding; see `ring_loss_tf.training.loop`.

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
- `iresnet18`, `iresnet50`, `iresnet100`: insightface's improved ResNets
  (arcface_torch `backbones/iresnet.py`), 112×112 RGB → a 7×7×512 map,
  then insightface's own BN → FC → BN head, which is the "bn" embedding
  block. 24.0M, 43.6M and 65.2M parameters; 2.6, 6.3 and 12.1 GMACs.
- `mobilefacenet`: insightface's MobileFaceNet ("mbf", `scale=2`, 2.06M
  parameters, 0.44 GMACs) ending in the global depthwise conv of the paper
  (the "gdc" embedding block); `scale=1, embedding_dim=128` is the paper's
  network (1.00M parameters, 221M MACs).

Every backbone ends in `_embedding`, so `embedding_block` chooses how the
last feature map becomes the embedding for all of them; a backbone whose
published form has its own block (iResNet: "bn", MobileFaceNet: "gdc")
takes that block as its default here and in `registry.BACKBONES`.

References: https://arxiv.org/abs/1704.08063 (SphereFace, Table 2);
https://arxiv.org/abs/1801.07698 (ArcFace: the improved residual unit and
the BN → dropout → FC → BN output); https://arxiv.org/abs/1804.07573
(MobileFaceNets, Table 1).
"""

import math

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


def multiply_adds(model):
    """Multiply-adds per image of the convs and dense layers of `model`.

    Kernel size × output pixels, the nominal count of a grouped conv (also
    for `layers.GroupedConv2D`, which computes more); BatchNorm, PReLU and
    sums are left out. arcface_torch's README gives these as "FLOPs"
    (iresnet50: 6.3G) from ptflops, which adds the rest (about 3 % on
    MobileFaceNet).
    """
    total = 0
    for layer in model.layers:
        kernel = getattr(layer, "kernel", None)
        if kernel is None:
            continue
        size = math.prod(kernel.shape)
        if isinstance(
            layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)
        ):
            height, width = layer.output.shape[1:3]
            total += size * height * width
        elif isinstance(layer, keras.layers.Dense):
            total += size
    return total


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


def _embedding(x, embedding_dim, embedding_block, initializer, name, seeds):
    """The last feature map → `(batch, embedding_dim)` (EMBEDDING_BLOCKS)."""
    if embedding_block == "bn":
        x = layers.BatchNorm(name="feature_bn")(x)
    if embedding_block == "gdc":
        # One linear k_h×k_w filter per channel over the whole map: the
        # global depthwise conv MobileFaceNets puts in place of pooling.
        height, width, channels = x.shape[1:]
        x = _depthwise(
            x, (height, width), 1, "gdc",
            _he_fan_out(channels * height * width, seeds()),
        )
        x = layers.BatchNorm(name="gdc_bn")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(
        embedding_dim, use_bias=embedding_block != "gdc",
        kernel_initializer=initializer, name=name,
    )(x)
    if embedding_block == "bn":
        # insightface freezes this BatchNorm's scale at 1.
        x = layers.BatchNorm(scale=False, name="embedding_bn")(x)
    if embedding_block == "gdc":
        # insightface's GDC ends in a plain BatchNorm1d: its scale learns.
        x = layers.BatchNorm(name="embedding_bn")(x)
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
        _seeded("glorot_uniform", seeds()), "fc5", seeds,
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
        embedding_block: "fc" (the paper's), "bn" (BN → FC → BN) or "gdc"
            (global depthwise conv → FC → BN); see `EMBEDDING_BLOCKS`.

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
        _seeded("glorot_uniform", seeds()), "embedding", seeds,
    )
    return keras.Model(images, embeddings, name="small_cnn")


# --------------------------------------------------------------------------
# insightface's backbones (arcface_torch/backbones): iResNet, MobileFaceNet
# --------------------------------------------------------------------------


def _he_fan_out(fan_out, seed):
    """PyTorch's `kaiming_normal_(mode="fan_out", nonlinearity="relu")`.

    PyTorch's fan-out of a grouped or depthwise conv is out_channels ·
    k_h · k_w; Keras' "fan_out" of a depthwise kernel (k_h, k_w, C, 1)
    would be k_h · k_w, √C times wider, hence the explicit count.
    """
    return keras.initializers.RandomNormal(
        stddev=math.sqrt(2.0 / fan_out), seed=seed
    )


def _torch_padding(x, kernel_size, strides, name):
    """PyTorch's `padding=kernel_size // 2`, as (input, Keras padding).

    At stride 1 that is Keras' "same". At stride 2 on an even size it is
    not: "same" pads 0 before and 1 after, PyTorch 1 on each side, so every
    output pixel would sit one input pixel off (and weights ported from
    insightface would give other numbers). Explicit zero padding + "valid"
    gives PyTorch's pixels at any size.
    """
    if kernel_size == 1:
        return x, "valid"
    if strides == 1:
        return x, "same"
    x = keras.layers.ZeroPadding2D(kernel_size // 2, name=f"{name}_pad")(x)
    return x, "valid"


def _torch_conv(x, filters, kernel_size, strides, name, initializer,
                groups=1):
    """A bias-free conv padded as PyTorch's (`_torch_padding`)."""
    x, padding = _torch_padding(x, kernel_size, strides, name)
    # keras.layers.Conv2D's grouped kernels are ~260× slower on CPUs.
    conv = keras.layers.Conv2D if groups == 1 else layers.GroupedConv2D
    return conv(
        filters, kernel_size, strides=strides, padding=padding,
        groups=groups, use_bias=False, kernel_initializer=initializer,
        name=name,
    )(x)


def _depthwise(x, kernel_size, strides, name, initializer):
    """A bias-free depthwise conv padded as PyTorch's (a square kernel), or
    unpadded (a `(k_h, k_w)` kernel: the global depthwise conv)."""
    padding = "valid"
    if isinstance(kernel_size, int):
        x, padding = _torch_padding(x, kernel_size, strides, name)
    return keras.layers.DepthwiseConv2D(
        kernel_size, strides=strides, padding=padding, use_bias=False,
        depthwise_initializer=initializer, name=name,
    )(x)


def _bn(x, name):
    # PyTorch's BatchNorm2d: ε = 1e-5, momentum 0.1 (0.9 in Keras' sense).
    return layers.BatchNorm(momentum=0.9, epsilon=1e-5, name=name)(x)


# iresnet.py draws every conv from N(0, 0.1); BatchNorms start at γ = 1,
# β = 0 and PReLU slopes at 0.25 (PyTorch's defaults).
_IRESNET_INIT = keras.initializers.RandomNormal(stddev=0.1)


def _ibasic_block(x, planes, strides, name, seeds):
    """insightface's IBasicBlock: BN → conv3×3 → BN → PReLU → conv3×3
    (stride) → BN, plus the input (through conv1×1 (stride) + BN when the
    shape changes). No activation after the sum."""
    shortcut = x
    y = _bn(x, f"{name}_bn1")
    y = _torch_conv(
        y, planes, 3, 1, f"{name}_conv1", _seeded(_IRESNET_INIT, seeds())
    )
    y = _bn(y, f"{name}_bn2")
    y = _prelu(y, f"{name}_prelu")
    y = _torch_conv(
        y, planes, 3, strides, f"{name}_conv2",
        _seeded(_IRESNET_INIT, seeds()),
    )
    y = _bn(y, f"{name}_bn3")
    if strides != 1 or x.shape[-1] != planes:
        shortcut = _torch_conv(
            x, planes, 1, strides, f"{name}_downsample_conv",
            _seeded(_IRESNET_INIT, seeds()),
        )
        shortcut = _bn(shortcut, f"{name}_downsample_bn")
    return keras.layers.Add(name=f"{name}_add")([y, shortcut])


def _iresnet(blocks, input_shape, embedding_dim, name, seed,
             embedding_block):
    """iResNet: conv3×3 64 + BN + PReLU, four stages of `blocks[i]`
    IBasicBlocks (64/128/256/512 channels, the first of each at stride 2),
    then the embedding block."""
    _check_common(input_shape, embedding_dim, embedding_block)
    seeds = _Seeds(seed)
    images = keras.Input(input_shape, name="images")
    x = _torch_conv(
        images, 64, 3, 1, "conv1", _seeded(_IRESNET_INIT, seeds())
    )
    x = _bn(x, "bn1")
    x = _prelu(x, "prelu")
    for stage, (planes, num_blocks) in enumerate(
        zip((64, 128, 256, 512), blocks), start=1
    ):
        for block in range(num_blocks):
            x = _ibasic_block(
                x, planes, 2 if block == 0 else 1, f"layer{stage}_{block}",
                seeds,
            )
    # nn.Linear's default initialisation: U(±1/√fan_in).
    fc_init = keras.initializers.VarianceScaling(
        1.0 / 3.0, "fan_in", "uniform", seed=seeds()
    )
    embeddings = _embedding(
        x, embedding_dim, embedding_block, fc_init, "fc", seeds
    )
    return keras.Model(images, embeddings, name=name)


def iresnet50(input_shape=(112, 112, 3), embedding_dim=512, seed=None,
              embedding_block="bn"):
    """iResNet-50: 43.6M parameters, 6.3 GMACs at 112×112×3.

    insightface's arcface_torch `iresnet50` (`backbones/iresnet.py`):
    conv3×3 64 + BN + PReLU, then stages of 3/4/14/3 IBasicBlocks
    (`_ibasic_block`) with 64/128/256/512 channels, each stage starting at
    stride 2 (112 → 56 → 28 → 14 → 7), then BN → dropout → FC → BN with
    the last BN's scale frozen at 1. That output block is the "bn"
    embedding block (insightface trains with dropout 0, left out), so the
    stages stop at the 7×7×512 map and `_embedding` adds the block: one
    code path for every backbone, and `embedding_block` still chooses
    ("fc" and "gdc" are variants, not insightface's). Stride-2 3×3 convs
    pad 1 on each side as PyTorch does (`_torch_padding`); BN ε = 1e-5,
    momentum 0.1 in PyTorch's sense; PReLU per channel; convs N(0, 0.1) as
    insightface. A weight port must permute the FC's input rows: Keras
    flattens the map as (h, w, c), PyTorch as (c, h, w).

    Args:
        input_shape: `(height, width, channels)`; insightface's is 112×112×3
            (other sizes build: the FC takes the map the stages leave).
        embedding_dim: insightface's `num_features` (512).
        seed: seed of the weight initialisers (None: random).
        embedding_block: "bn" (insightface's), "fc" or "gdc".

    Returns:
        A `keras.Model` from `(batch, *input_shape)` images to
        `(batch, embedding_dim)` embeddings.

    Reference: https://arxiv.org/abs/1801.07698 (ArcFace).
    """
    return _iresnet(
        (3, 4, 14, 3), input_shape, embedding_dim, "iresnet50", seed,
        embedding_block,
    )


def iresnet18(input_shape=(112, 112, 3), embedding_dim=512, seed=None,
              embedding_block="bn"):
    """iResNet-18: 2/2/2/2 IBasicBlocks; 24.0M parameters, 2.6 GMACs.

    Same arguments and output as `iresnet50`.
    """
    return _iresnet(
        (2, 2, 2, 2), input_shape, embedding_dim, "iresnet18", seed,
        embedding_block,
    )


def iresnet100(input_shape=(112, 112, 3), embedding_dim=512, seed=None,
               embedding_block="bn"):
    """iResNet-100: 3/13/30/3 IBasicBlocks; 65.2M parameters, 12.1 GMACs.

    Same arguments and output as `iresnet50`.
    """
    return _iresnet(
        (3, 13, 30, 3), input_shape, embedding_dim, "iresnet100", seed,
        embedding_block,
    )


def _conv_bn_prelu(x, filters, kernel_size, strides, name, seeds, groups=1):
    """insightface's ConvBlock: conv (no bias) → BN → PReLU."""
    initializer = _he_fan_out(filters * kernel_size * kernel_size, seeds())
    if groups > 1 and groups == filters == x.shape[-1]:
        # One filter per channel (MobileFaceNet's second conv at scale 1).
        x = _depthwise(x, kernel_size, strides, name, initializer)
    else:
        x = _torch_conv(
            x, filters, kernel_size, strides, name, initializer, groups
        )
    x = _bn(x, f"{name}_bn")
    return _prelu(x, f"{name}_prelu")


def _bottleneck(x, filters, expanded, strides, name, seeds):
    """insightface's DepthWise (MobileNetV2's inverted residual): 1×1 conv
    to `expanded` channels + BN + PReLU, 3×3 depthwise (stride) + BN +
    PReLU, linear 1×1 conv to `filters` + BN; the input is added at
    stride 1 (insightface's `Residual`), not at stride 2."""
    y = _conv_bn_prelu(x, expanded, 1, 1, f"{name}_expand", seeds)
    y = _depthwise(
        y, 3, strides, f"{name}_dw", _he_fan_out(expanded * 9, seeds())
    )
    y = _bn(y, f"{name}_dw_bn")
    y = _prelu(y, f"{name}_dw_prelu")
    y = _torch_conv(
        y, filters, 1, 1, f"{name}_project", _he_fan_out(filters, seeds())
    )
    y = _bn(y, f"{name}_project_bn")
    if strides == 1:
        y = keras.layers.Add(name=f"{name}_add")([x, y])
    return y


def mobilefacenet(input_shape=(112, 112, 3), embedding_dim=512, seed=None,
                  embedding_block="gdc", scale=2):
    """MobileFaceNet as insightface's arcface_torch trains it ("mbf").

    insightface's `backbones/mobilefacenet.py` with its defaults (`blocks=
    (1, 4, 6, 2)`, `scale=2`, 512-d): 2.06M parameters, 0.44 GMACs at
    112×112×3 (insightface's README: "mobilefacenet-0.45G"). With
    `scale=1, embedding_dim=128` it is the paper's network (Chen et al.
    2018, Table 1: 0.99M parameters, 221M MAdds; this one has 1.00M, the
    BatchNorms and PReLUs counted, and 221M MACs).

    Layers (channels at `scale` s; t: the expanded width of a bottleneck):

        conv3×3/2 64s → 3×3 conv 64s in 64 groups (depthwise at s = 1)
        → bottleneck/2 64s (t 128) → 4 × bottleneck 64s (t 128)
        → bottleneck/2 128s (t 256) → 6 × bottleneck 128s (t 256)
        → bottleneck/2 128s (t 512) → 2 × bottleneck 128s (t 256)
        → conv1×1 512 → embedding block

    Every conv is bias-free and followed by BN, then PReLU (per channel)
    except the linear projections (`_bottleneck`). The default embedding
    block "gdc" is the paper's and insightface's: a linear 7×7 depthwise
    conv + BN, then a bias-free FC to `embedding_dim` + BN (learned scale,
    unlike the iResNet block). Stride-2 convs pad as PyTorch
    (`_torch_padding`); Kaiming-normal (fan-out) initialisation as
    insightface. `mbf_large` (`blocks=(2, 8, 12, 4)`, `scale=4`) is not
    offered: its first stage is a residual stack, another layout.

    On CPUs: the grouped conv is a `layers.GroupedConv2D` (TensorFlow's
    grouped kernel alone would hold the network under 1 image/s on 2
    cores); it trains at 17 images/s there without XLA and at 5 with it
    (XLA's CPU depthwise convs are slow), so train it with `--nojit`
    (`bench/backbones.py`).

    Args:
        input_shape: `(height, width, channels)`; 112×112×3 in both.
        embedding_dim: 512 (insightface) or 128 (the paper).
        seed: seed of the weight initialisers (None: random).
        embedding_block: "gdc" (the paper's), "bn" or "fc".
        scale: width multiplier of the stages (insightface 2, paper 1).

    Returns:
        A `keras.Model` from `(batch, *input_shape)` images to
        `(batch, embedding_dim)` embeddings.

    Reference: https://arxiv.org/abs/1804.07573 (MobileFaceNets).
    """
    _check_common(input_shape, embedding_dim, embedding_block)
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(
            "`scale` must be a positive int (insightface's mbf: 2, the "
            f"paper: 1). Received: scale={scale!r}"
        )
    seeds = _Seeds(seed)
    images = keras.Input(input_shape, name="images")
    x = _conv_bn_prelu(images, 64 * scale, 3, 2, "conv1", seeds)
    x = _conv_bn_prelu(x, 64 * scale, 3, 1, "conv2_dw", seeds, groups=64)
    stages = (  # (channels, expanded at stride 2, expanded after, repeats)
        (64 * scale, 128, 128, 4),
        (128 * scale, 256, 256, 6),
        (128 * scale, 512, 256, 2),
    )
    index = 0
    for filters, down_expanded, expanded, repeats in stages:
        for j in range(repeats + 1):
            index += 1
            x = _bottleneck(
                x, filters, down_expanded if j == 0 else expanded,
                2 if j == 0 else 1, f"bottleneck{index}", seeds,
            )
    x = _conv_bn_prelu(x, 512, 1, 1, "conv_sep", seeds)
    embeddings = _embedding(
        x, embedding_dim, embedding_block,
        _he_fan_out(embedding_dim, seeds()), "embedding", seeds,
    )
    return keras.Model(images, embeddings, name="mobilefacenet")
