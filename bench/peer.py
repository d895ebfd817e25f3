"""The project's training step against a PyTorch equivalent, side by side.

    python bench/peer.py                  # three networks, 2 heads (~15 min)
    python bench/peer.py --networks small_cnn --heads softmax --repeats 5
    python bench/peer.py --train_py --networks small_cnn,sphereface20 \\
        --heads softmax          # also train.py's own logged images/s

What is compared: one training step (forward, Ring loss + head + softmax
cross-entropy, weight decay, backward, SGD momentum update) of
`trainer.Trainer` (one replica, its default: XLA on GPUs, not on a CPU;
--xla adds the other setting) against the same network written here
in PyTorch (`TorchNet`: the same layers, the same padding, PReLU slopes,
Ring loss, heads and weight decay, and the same initial weights, copied from
the Keras model), run eagerly and, where it works here, under
`torch.compile`. Both sides use every core (`torch.set_num_threads`) on the
same synthetic batch. Rounds are interleaved (ours, eager, compiled, ours,
...), so a slow spell of a shared machine hits every side; the table gives
medians of the rounds and the median and range of the per-round ratios.
tests/bench/test_peer.py checks that `TorchNet` on the Keras weights gives our
loss and our update, so the two sides compute the same thing.

Networks (--networks):
    small_cnn     train.py's default: widths 16/32/64, 32x32x1, 128-d,
                  1,000 classes, batch 256
    cnn6          the same six PReLU convs at widths 32/64/128, 512-d,
                  2,000 classes, batch 256
    sphereface20  the paper's: 112x96x3, 512-d, 10,572 classes, batch 32

--train_py adds what a user sees: `train.py`'s own logged images/s (input
pipeline included; the median of its progress lines after the first, which
includes compilation) on a generated folder of random images of the
network's shapes (PNG 32x32 grey for small_cnn, JPEG 112x96 for
SphereFace-20), as train.py runs by default and with --jit=true, against
PyTorch eager steps timed between those runs.
"""

import argparse
import math
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import machine  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from ring_loss_tf.models import backbones  # noqa: E402
from ring_loss_tf import config as config_lib  # noqa: E402
from ring_loss_tf import layers  # noqa: E402
from ring_loss_tf.models import assembly as models_lib  # noqa: E402
from ring_loss_tf.training import trainer as trainer_lib  # noqa: E402
from ring_loss_tf.training import distribution  # noqa: E402

NETWORKS = {
    "small_cnn": dict(backbone="small_cnn", widths=(16, 32, 64),
                      image_size=(32, 32), channels=1, embedding_dim=128,
                      num_classes=1000, batch_size=256),
    "cnn6": dict(backbone="small_cnn", widths=(32, 64, 128),
                 image_size=(32, 32), channels=1, embedding_dim=512,
                 num_classes=2000, batch_size=256),
    "sphereface20": dict(backbone="sphereface20", widths=None,
                         image_size=(112, 96), channels=3, embedding_dim=512,
                         num_classes=10572, batch_size=32),
}
LAMBDA_RING = 0.01
WEIGHT_DECAY = 5e-4
LEARNING_RATE = 0.01
MOMENTUM = 0.9


# --------------------------------------------------------------------------
# Our side: the Keras models the Trainer trains
# --------------------------------------------------------------------------


def model_config(spec, head, seed=0):
    return config_lib.make(
        num_classes=spec["num_classes"], backbone=spec["backbone"],
        head=head, image_size=spec["image_size"], channels=spec["channels"],
        embedding_dim=spec["embedding_dim"], lambda_ring=LAMBDA_RING,
        margin_warmup_steps=0, seed=seed,
    )


def keras_models(spec, head, seed=0):
    """backbone → RingLoss → head, as `models.build_models` assembles it
    (built here because small_cnn's widths are not a setting)."""
    config = config_lib.resolve(model_config(spec, head, seed))
    shape = (*spec["image_size"], spec["channels"])
    options = {} if spec["widths"] is None else {"widths": spec["widths"]}
    embedding_model = getattr(backbones, spec["backbone"])(
        input_shape=shape, embedding_dim=spec["embedding_dim"], seed=seed,
        **options,
    )
    images = keras.Input(shape, name="images")
    labels = keras.Input((), dtype="int32", name="labels")
    embeddings = embedding_model(images)
    ring = layers.RingLoss(loss_weight=LAMBDA_RING, name="ring_loss")
    logits, head_layer = models_lib.build_head(
        head, ring(embeddings), labels, config.model, spec["num_classes"],
        seed,
    )
    train_model = keras.Model([images, labels], [logits, embeddings])
    return models_lib.Models(train_model, embedding_model, ring, head_layer)


def our_trainer(spec, head, batch_size, jit=None, learning_rate=LEARNING_RATE,
                momentum=MOMENTUM, seed=0):
    return trainer_lib.Trainer(
        distribution.build_strategy(["/cpu:0"]),
        lambda: keras_models(spec, head, seed),
        global_batch_size=batch_size, learning_rate=learning_rate,
        momentum=momentum, weight_decay=WEIGHT_DECAY, jit=jit,
    )


# --------------------------------------------------------------------------
# The PyTorch side
# --------------------------------------------------------------------------


def _same_padding(size, stride, kernel=3):
    """TensorFlow's "same": (before, after) padding of one dimension."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Conv(nn.Module):
    """A 3×3 conv padded as Keras' "same" (at stride 2 on an even size: 0
    before, 1 after), or, with `torch_padding`, PyTorch's usual padding=1
    (the same shapes and work, other border pixels)."""

    def __init__(self, in_channels, out_channels, stride, torch_padding):
        super().__init__()
        self.stride = stride
        self.torch_padding = torch_padding
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride,
                              padding=1 if torch_padding else 0)

    def forward(self, x):
        if not self.torch_padding:
            top, bottom = _same_padding(x.shape[2], self.stride)
            left, right = _same_padding(x.shape[3], self.stride)
            x = F.pad(x, (left, right, top, bottom))
        return self.conv(x)


class Unit(nn.Module):
    """SphereFace's residual unit: x + PReLU(conv(PReLU(conv(x))))."""

    def __init__(self, channels, torch_padding):
        super().__init__()
        self.conv1 = Conv(channels, channels, 1, torch_padding)
        self.prelu1 = nn.PReLU(channels, 0.25)
        self.conv2 = Conv(channels, channels, 1, torch_padding)
        self.prelu2 = nn.PReLU(channels, 0.25)

    def forward(self, x):
        return x + self.prelu2(self.conv2(self.prelu1(self.conv1(x))))


def _psi(cos, margin=4):
    """A-Softmax's ψ(θ) from cos θ (k from the thresholds, no gradient)."""
    frozen = cos.detach()
    k = torch.zeros_like(cos)
    for j in range(1, margin + 1):
        k = k + (frozen <= math.cos(j * math.pi / margin)).float()
    c2 = cos * cos
    cos_m = 8 * c2 * c2 - 8 * c2 + 1
    return (1 - 2 * torch.remainder(k, 2)) * cos_m - 2 * k


class TorchNet(nn.Module):
    """The network of `NETWORKS[name]` with Ring loss and a head, in
    PyTorch (NCHW). `loss(images, labels, step)` is the Trainer's loss:
    mean CE + λ/2·mean((‖F‖ − R)²) + wd/2·Σ‖W‖² over conv and dense
    kernels (not PReLU slopes, biases or R)."""

    def __init__(self, spec, head, torch_padding=False):
        super().__init__()
        self.head = head
        channels = spec["channels"]
        blocks = []
        if spec["backbone"] == "small_cnn":
            for width in spec["widths"]:
                for stride in (2, 1):
                    blocks += [Conv(channels, width, stride, torch_padding),
                               nn.PReLU(width, 0.25)]
                    channels = width
            units = ()
        else:
            units = (1, 2, 4, 1)
            for width, count in zip((64, 128, 256, 512), units):
                blocks += [Conv(channels, width, 2, torch_padding),
                           nn.PReLU(width, 0.25)]
                blocks += [Unit(width, torch_padding) for _ in range(count)]
                channels = width
        self.features = nn.Sequential(*blocks)
        height, width = spec["image_size"]
        for _ in range(4 if units else 3):
            height, width = math.ceil(height / 2), math.ceil(width / 2)
        self.feature_shape = (channels, height, width)
        self.embedding = nn.Linear(channels * height * width,
                                   spec["embedding_dim"])
        self.radius = nn.Parameter(torch.tensor(1.0))
        num_classes = spec["num_classes"]
        if head == "softmax":
            self.logits = nn.Linear(spec["embedding_dim"], num_classes)
        else:
            self.kernel = nn.Parameter(
                torch.empty(spec["embedding_dim"], num_classes)
            )
        self.decayed = [
            m.weight for m in self.modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))
        ] + ([] if head == "softmax" else [self.kernel])

    def embed(self, images):
        return self.embedding(torch.flatten(self.features(images), 1))

    def loss(self, images, labels, step=1):
        embeddings = self.embed(images)
        norms = torch.linalg.vector_norm(embeddings, dim=1)
        ring = LAMBDA_RING * 0.5 * torch.mean((norms - self.radius) ** 2)
        if self.head == "softmax":
            logits = self.logits(embeddings)
        else:
            # A-Softmax, m = 4, the Caffe λ schedule at training step t.
            lambda_ = max(5.0, 1000.0 / (1.0 + 0.12 * step))
            cos = torch.clamp(
                F.normalize(embeddings, dim=1)
                @ F.normalize(self.kernel, dim=0), -1.0, 1.0,
            )
            norms = norms[:, None]
            target = norms * (lambda_ * cos + _psi(cos)) / (1.0 + lambda_)
            mask = F.one_hot(labels.long(), cos.shape[1]).bool()
            logits = torch.where(mask, target, norms * cos)
        cross_entropy = F.cross_entropy(logits, labels.long())
        decay = 0.5 * WEIGHT_DECAY * sum(
            torch.sum(w * w) for w in self.decayed
        )
        return cross_entropy + ring + decay, cross_entropy, ring


def copy_keras_weights(models, net):
    """Our initial weights into `net` (HWIO → OIHW; the first dense layer's
    rows from Keras' NHWC flattening order to PyTorch's NCHW order)."""
    conv_layers = [
        layer for layer in models.embedding_model.layers
        if isinstance(layer, keras.layers.Conv2D)
    ]
    prelu_layers = [
        layer for layer in models.embedding_model.layers
        if isinstance(layer, keras.layers.PReLU)
    ]
    dense = next(
        layer for layer in models.embedding_model.layers
        if isinstance(layer, keras.layers.Dense)
    )
    torch_convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    torch_prelus = [m for m in net.modules() if isinstance(m, nn.PReLU)]
    assert len(conv_layers) == len(torch_convs)
    assert len(prelu_layers) == len(torch_prelus)

    def put(parameter, value):
        with torch.no_grad():
            parameter.copy_(torch.from_numpy(np.array(value)).reshape(
                parameter.shape))

    for layer, module in zip(conv_layers, torch_convs):
        put(module.weight, layer.kernel.numpy().transpose(3, 2, 0, 1))
        put(module.bias, layer.bias.numpy())
    for layer, module in zip(prelu_layers, torch_prelus):
        put(module.weight, layer.alpha.numpy().reshape(-1))
    channels, height, width = net.feature_shape
    kernel = dense.kernel.numpy().reshape(height, width, channels, -1)
    put(net.embedding.weight,
        kernel.transpose(2, 0, 1, 3).reshape(channels * height * width, -1).T)
    put(net.embedding.bias, dense.bias.numpy())
    put(net.radius, np.float32(models.ring.radius.numpy()))
    if net.head == "softmax":
        put(net.logits.weight, models.head.kernel.numpy().T)
        put(net.logits.bias, models.head.bias.numpy())
    else:
        put(net.kernel, models.head.kernel.numpy())


def torch_optimizer(net, learning_rate=LEARNING_RATE, momentum=MOMENTUM):
    # Weight decay is in the loss, as in the Trainer.
    return torch.optim.SGD(net.parameters(), lr=learning_rate,
                           momentum=momentum)


def torch_step(net, optimizer, images, labels, step=1, loss_fn=None):
    optimizer.zero_grad(set_to_none=True)
    loss, _, _ = (loss_fn or net.loss)(images, labels, step)
    loss.backward()
    optimizer.step()
    return loss


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------


def _batch(spec, batch_size, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (batch_size, *spec["image_size"],
                                 spec["channels"])).astype(np.float32)
    labels = rng.integers(0, spec["num_classes"], batch_size).astype(np.int32)
    return images, labels


def _rate(run, steps, batch_size):
    start = time.perf_counter()
    run(steps)
    return steps * batch_size / (time.perf_counter() - start)


OURS = "ours (Trainer)"


def sides(spec, head, batch_size, compile_torch, channels_last, xla=False):
    """{side: run(steps)} for our Trainer and PyTorch eager (/ compiled)."""
    images, labels = _batch(spec, batch_size)
    trainer = our_trainer(spec, head, batch_size)
    tf_images, tf_labels = tf.constant(images), tf.constant(labels)
    trainer.initialize_radius(tf_images)
    net = TorchNet(spec, head, torch_padding=True)
    copy_keras_weights(trainer.models, net)
    torch_images = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    torch_labels = torch.from_numpy(labels.astype(np.int64))

    def our_side(trainer):
        def run(steps):
            for _ in range(steps):
                stats, _ = trainer.train_step(tf_images, tf_labels)
            dict(stats)  # waits for the last step
        return run

    def eager_side(model, x):
        optimizer = torch_optimizer(model)

        def run(steps):
            for step in range(steps):
                loss = torch_step(model, optimizer, x, torch_labels, step + 1)
            loss.item()
        return run

    result = {OURS: our_side(trainer)}
    if xla:
        other = our_trainer(spec, head, batch_size, jit=not trainer.jit)
        other.initialize_radius(tf_images)
        other.models.train_model.set_weights(
            trainer.models.train_model.get_weights())
        result[f"ours (Trainer, {'no XLA' if trainer.jit else 'XLA'})"] = (
            our_side(other))
    result["PyTorch eager"] = eager_side(net, torch_images)
    if channels_last:
        net_cl = TorchNet(spec, head, torch_padding=True).to(
            memory_format=torch.channels_last)
        copy_keras_weights(trainer.models, net_cl)
        result["PyTorch eager, channels_last"] = eager_side(
            net_cl, torch_images.contiguous(memory_format=torch.channels_last)
        )
    if compile_torch:
        compiled_net = TorchNet(spec, head, torch_padding=True)
        copy_keras_weights(trainer.models, compiled_net)
        compiled_loss = torch.compile(compiled_net.loss)
        optimizer = torch_optimizer(compiled_net)

        def compiled(steps):
            for step in range(steps):
                loss = torch_step(compiled_net, optimizer, torch_images,
                                  torch_labels, 1, loss_fn=compiled_loss)
            loss.item()

        result["PyTorch torch.compile"] = compiled
    return result


def _ratio_line(name, ours, theirs):
    ratios = [a / b for a, b in zip(ours, theirs)]
    return (f"  ours / {name}: {statistics.median(ratios):.2f} "
            f"(per-round {min(ratios):.2f} .. {max(ratios):.2f})")


def sgemm_rate(size=2048, repeats=3):
    """NumPy's float32 matmul, FLOP/s (best of `repeats`): the rate the
    cores reach on the densest work there is."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    best = min(_seconds(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best


def _seconds(function):
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def training_flops(spec):
    """FLOPs per image of a training step: forward 2 per multiply-add of
    the convs and dense layers (the head included), backward twice that."""
    models = keras_models(spec, "softmax")
    macs = backbones.multiply_adds(models.embedding_model)
    macs += spec["embedding_dim"] * spec["num_classes"]
    return 3 * 2 * macs


def step_table(args):
    for network in args.networks.split(","):
        spec = NETWORKS[network]
        batch_size = args.batch_size or spec["batch_size"]
        for head in args.heads.split(","):
            started = time.perf_counter()
            runs = sides(spec, head, batch_size, args.compile,
                         args.channels_last, args.xla)
            failed = []
            for name, run in list(runs.items()):
                try:
                    run(args.warmup)  # compile, warm up
                except Exception as error:  # noqa: BLE001 - report, go on
                    failed.append(f"{name}: {type(error).__name__}: "
                                  f"{str(error).splitlines()[0][:200]}")
                    del runs[name]
            rates = {name: [] for name in runs}
            sgemm = []
            for _ in range(args.repeats):
                for name, run in runs.items():
                    rates[name].append(_rate(run, args.steps, batch_size))
                if args.sgemm:  # measured in every round, beside the steps
                    sgemm.append(sgemm_rate())
            print(f"{network} + Ring loss + {head}, "
                  f"{'x'.join(map(str, spec['image_size']))}x"
                  f"{spec['channels']}, {spec['num_classes']} classes, "
                  f"batch {batch_size}; {args.repeats} interleaved rounds x "
                  f"{args.steps} steps ({time.perf_counter() - started:.0f} "
                  "s):")
            for name, r in rates.items():
                print(f"  {name:<30} {statistics.median(r):8.1f} img/s "
                      f"(range {min(r):.1f} .. {max(r):.1f})")
            ours = rates[OURS]
            for name, r in rates.items():
                if name != OURS:
                    print(_ratio_line(name, ours, r))
            if sgemm:
                flops = training_flops(spec)
                print(f"  {flops / 1e9:.2f} GFLOP per image (forward + "
                      "backward = 3 x 2 x multiply-adds); NumPy sgemm "
                      f"2048^3 {statistics.median(sgemm) / 1e9:.0f} GFLOP/s "
                      f"(range {min(sgemm) / 1e9:.0f} .. "
                      f"{max(sgemm) / 1e9:.0f}); each side's share of it, "
                      "median of the rounds:")
                for name, r in rates.items():
                    shares = [a * flops / b for a, b in zip(r, sgemm)]
                    print(f"    {name:<30} "
                          f"{statistics.median(r) * flops / 1e9:6.1f} "
                          f"GFLOP/s, {100 * statistics.median(shares):5.1f} "
                          f"% (rounds {100 * min(shares):.0f} .. "
                          f"{100 * max(shares):.0f} %)")
            for line in failed:
                print(f"  not run: {line}")
            print(flush=True)


# --------------------------------------------------------------------------
# Where a step's time goes, by kind of op, on both sides
# --------------------------------------------------------------------------

PROFILE_KINDS = ("conv forward", "conv backward", "PReLU",
                 "dense (embedding, head)", "everything else")


def _tf_kind(name, op_type):
    if "Conv2DBackprop" in op_type:
        return "conv backward"
    if "Conv2D" in op_type:
        return "conv forward"
    if "prelu" in name.lower():
        return "PReLU"
    if "MatMul" in op_type:
        return "dense (embedding, head)"
    return "everything else"


def _torch_kind(name):
    if name == "aten::convolution_backward":
        return "conv backward"
    if name == "aten::mkldnn_convolution":
        return "conv forward"
    if "prelu" in name:
        return "PReLU"
    if name in ("aten::mm", "aten::addmm"):
        return "dense (embedding, head)"
    return "everything else"


def tf_op_times(run, steps):
    """Milliseconds per step by kind of op of TensorFlow's own profile
    (the XPlane of `tf.profiler`): the kernels' durations, which add up to
    the step when one inter-op thread runs them one after another."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        run(steps)
        tf.profiler.experimental.stop()
        path, = pathlib.Path(logdir).glob("plugins/profile/*/*.xplane.pb")
        space = xplane_pb2.XSpace.FromString(path.read_bytes())
    times = dict.fromkeys(PROFILE_KINDS, 0.0)
    for plane in space.planes:
        for line in plane.lines:
            for event in line.events:
                label = plane.event_metadata[event.metadata_id].name
                # A kernel's event is "op name:op type"; the executor's
                # and thread pool's own events ("A::B") and the call of the
                # step's function ("…:__inference_…") enclose them.
                if ":" not in label or "::" in label:
                    continue
                name, op_type = label.rsplit(":", 1)
                if op_type.strip().startswith("__inference"):
                    continue
                times[_tf_kind(name, op_type)] += event.duration_ps / 1e9
    return {kind: t / steps for kind, t in times.items()}


def torch_op_times(run, steps):
    """Milliseconds per step by kind of op of `torch.profiler` (self CPU
    time of each operator)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(steps)
    times = dict.fromkeys(PROFILE_KINDS, 0.0)
    for event in prof.key_averages():
        times[_torch_kind(event.key)] += event.self_cpu_time_total / 1e3
    return {kind: t / steps for kind, t in times.items()}


def profile_table(args):
    for network in args.networks.split(","):
        spec = NETWORKS[network]
        batch_size = args.batch_size or spec["batch_size"]
        runs = sides(spec, "softmax", batch_size, False, False)
        ours, eager = runs[OURS], runs["PyTorch eager"]
        ours(args.warmup)
        eager(args.warmup)
        wall = {OURS: [], "PyTorch eager": []}
        for _ in range(args.repeats):
            for name, run in ((OURS, ours), ("PyTorch eager", eager)):
                wall[name].append(
                    1e3 * _seconds(lambda run=run: run(args.steps))
                    / args.steps)
        mine = tf_op_times(ours, args.steps)
        theirs = torch_op_times(eager, args.steps)
        print(f"{network} + Ring loss + softmax, batch {batch_size}: "
              f"ms per step by kind of op ({args.steps} profiled steps "
              "each; TensorFlow with one inter-op thread, so its kernels "
              "run one at a time as PyTorch's do)")
        print(f"| kind of op | {OURS} | PyTorch eager | ours / PyTorch |")
        print("|---|---|---|---|")
        for kind in PROFILE_KINDS:
            print(f"| {kind} | {mine[kind]:.0f} | {theirs[kind]:.0f} | "
                  f"{mine[kind] / max(theirs[kind], 1e-9):.2f} |")
        total_mine, total_theirs = sum(mine.values()), sum(theirs.values())
        print(f"| all ops | {total_mine:.0f} | {total_theirs:.0f} | "
              f"{total_mine / total_theirs:.2f} |")
        a, b = (statistics.median(wall[n]) for n in wall)
        print(f"| the step, wall (median of {args.repeats} unprofiled "
              f"rounds) | {a:.0f} | {b:.0f} | {a / b:.2f} |")
        print(flush=True)


# --------------------------------------------------------------------------
# train.py's logged rate against PyTorch eager
# --------------------------------------------------------------------------


def _image_folder(root, spec, num_classes, per_class):
    """A folder per identity of random images of the network's shape
    (JPEG for RGB, PNG for grey)."""
    from PIL import Image

    rng = np.random.default_rng(1)
    height, width = spec["image_size"]
    suffix = "jpg" if spec["channels"] == 3 else "png"
    for c in range(num_classes):
        folder = root / f"id{c:05d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            shape = (height, width, 3) if spec["channels"] == 3 else (
                height, width)
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.{suffix}")
    return root


def _train_py_rate(data_dir, model_dir, spec, network, batch_size, steps,
                   log_every, steps_per_loop, jit):
    """train.py's own logged images/s: the median of its progress lines
    after the first (which includes compilation)."""
    command = [
        sys.executable, str(REPO / "train.py"),
        f"--data_dir={data_dir.parent}",
        f"--model_dir={model_dir}", f"--backbone={network}",
        f"--image_size={','.join(map(str, spec['image_size']))}",
        f"--channels={spec['channels']}",
        f"--embedding_dim={spec['embedding_dim']}",
        f"--lambda_ring={LAMBDA_RING}", f"--batch_size={batch_size}",
        f"--steps={steps}", f"--log_every={log_every}",
        f"--checkpoint_every={steps}", f"--steps_per_loop={steps_per_loop}",
        *([] if jit is None else [f"--jit={str(jit).lower()}"]),
        "--evaluate=false", "--export=false",
        # train.py's default augmentation: the embedded set's for the
        # 32x32 characters, "face" for a face folder.
        "--augment=" + ("characters" if network == "small_cnn" else "face"),
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    rates = [float(m) for m in re.findall(r"([\d.]+) img/s", done.stdout)]
    return statistics.median(rates[1:])


TRAINER_STEP = "ours (Trainer) step, default jit"


def train_py_table(args):
    for network in args.networks.split(","):
        if network == "cnn6":
            continue  # not a train.py backbone (its widths are fixed)
        spec = NETWORKS[network]
        batch_size = args.batch_size or spec["batch_size"]
        num_classes = 1000 if network == "small_cnn" else 100
        spec = dict(spec, num_classes=num_classes)
        steps, log_every = args.train_py_steps, args.train_py_log_every
        with tempfile.TemporaryDirectory() as directory:
            directory = pathlib.Path(directory)
            data_dir = _image_folder(
                directory / "data" / "train", spec, num_classes,
                max(2, -(-batch_size * 2 // num_classes)),
            )
            runs = sides(spec, "softmax", batch_size, False, False)
            eager, step = runs["PyTorch eager"], runs[OURS]
            eager(1)
            step(1)
            variants = {"train.py": None, "train.py --jit=true": True}
            rates = {name: [] for name in [
                *variants, "PyTorch eager step", TRAINER_STEP]}
            for r in range(args.repeats):
                rates[TRAINER_STEP].append(
                    _rate(step, args.steps, batch_size))
                for name, jit in variants.items():
                    rates[name].append(
                        _train_py_rate(
                            data_dir, directory / f"run{r}{jit}", spec,
                            network, batch_size, steps, log_every,
                            args.steps_per_loop, jit,
                        ))
                rates["PyTorch eager step"].append(
                    _rate(eager, args.steps, batch_size))
        print(f"train.py's logged img/s, {network} + Ring loss + softmax, "
              f"{'x'.join(map(str, spec['image_size']))}x{spec['channels']}"
              f" image folder, {num_classes} classes, batch {batch_size}, "
              f"--steps={steps} --log_every={log_every} "
              f"--steps_per_loop={args.steps_per_loop}; {args.repeats} "
              f"interleaved rounds (PyTorch: {args.steps} steps a round):")
        for name, r in rates.items():
            print(f"  {name:<30} {statistics.median(r):8.1f} img/s "
                  f"(range {min(r):.1f} .. {max(r):.1f})")
        for name in variants:
            print(_ratio_line("PyTorch eager step", rates[name],
                              rates["PyTorch eager step"]).replace(
                                  "ours", name))
        # train.py by default against the step it runs, fed from memory.
        print(_ratio_line(TRAINER_STEP, rates["train.py"],
                          rates[TRAINER_STEP]).replace("ours /",
                                                       "train.py /"))
        print(machine.describe(distribution.onednn_kernels_enabled()))
        print(flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--networks", default="small_cnn,cnn6,sphereface20")
    parser.add_argument("--heads", default="softmax,asoftmax")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="default: each network's (see NETWORKS)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no_compile", dest="compile", action="store_false",
                        help="skip torch.compile")
    parser.add_argument("--channels_last", action="store_true",
                        help="also PyTorch eager in channels_last")
    parser.add_argument("--xla", action="store_true",
                        help="also our Trainer with the other XLA setting "
                        "(its default: XLA on GPUs, not on a CPU)")
    parser.add_argument("--sgemm", action="store_true",
                        help="also each side's GFLOP/s against NumPy sgemm")
    parser.add_argument("--skip_step_table", action="store_true")
    parser.add_argument("--profile", action="store_true",
                        help="instead: ms per step by kind of op on each "
                        "side (TensorFlow with one inter-op thread)")
    parser.add_argument("--train_py", action="store_true")
    parser.add_argument("--train_py_steps", type=int, default=21)
    parser.add_argument("--train_py_log_every", type=int, default=10)
    parser.add_argument("--steps_per_loop", type=int, default=1)
    args = parser.parse_args()
    threads = os.cpu_count()
    torch.set_num_threads(threads)
    if args.profile:
        # Before TensorFlow starts its thread pools.
        tf.config.threading.set_inter_op_parallelism_threads(1)
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, PyTorch "
          f"{torch.__version__}; {threads} CPU threads each; "
          f"Ring loss λ={LAMBDA_RING}, SGD momentum {MOMENTUM}, "
          f"weight decay {WEIGHT_DECAY}; ours: the Trainer's default, "
          f"jit={distribution.jit_by_default(distribution.build_strategy())}"
          f"\n{machine.describe(distribution.onednn_kernels_enabled())}\n")
    if args.profile:
        profile_table(args)
        return
    if not args.skip_step_table:
        step_table(args)
    if args.train_py:
        train_py_table(args)


if __name__ == "__main__":
    main()
