"""Tests of bench/peer.py: its PyTorch network computes what our step does.

Reference: the PyTorch network written independently in bench/peer.py
(`TorchNet`, autograd), on the Keras model's weights. One SGD step of our
`Trainer` and one of PyTorch from the same weights and batch must give the
same loss and the same weight change (the gradient, with momentum 0 and
lr 1), within float32 rounding. Were they different networks, the
speed comparison of bench/peer.py would compare different work.
"""

import numpy as np
import pytest
import tensorflow as tf
import torch

from tests.bench_scripts import load

peer = load("peer")

# bench/peer.py's networks at a size a test runs in seconds.
TINY = {
    "small_cnn": dict(peer.NETWORKS["small_cnn"], widths=(4, 6, 8),
                      image_size=(16, 12), embedding_dim=10, num_classes=7,
                      batch_size=8),
    "sphereface20": dict(peer.NETWORKS["sphereface20"], image_size=(32, 16),
                         embedding_dim=8, num_classes=5, batch_size=4),
}


@pytest.mark.parametrize("network, head", [
    ("small_cnn", "softmax"), ("small_cnn", "asoftmax"),
    ("sphereface20", "softmax"),
])
def test_torch_network_gives_our_loss_and_update(network, head):
    spec = TINY[network]
    batch = spec["batch_size"]
    images, labels = peer._batch(spec, batch, seed=4)
    trainer = peer.our_trainer(spec, head, batch, jit=False,
                               learning_rate=1.0, momentum=0.0, seed=2)
    trainer.initialize_radius(tf.constant(images))
    # Off the batch's mean norm, where ∂L/∂R would be 0 on both sides.
    radius = trainer.models.ring.radius
    radius.assign(0.5 * radius)
    net = peer.TorchNet(spec, head)
    peer.copy_keras_weights(trainer.models, net)
    before = {n: p.detach().numpy().copy() for n, p in net.named_parameters()}

    stats, _ = trainer.train_step(tf.constant(images), tf.constant(labels))
    # Our weights after the step, read through the same copy.
    stepped = peer.TorchNet(spec, head)
    peer.copy_keras_weights(trainer.models, stepped)
    ours = {n: p.detach().numpy() for n, p in stepped.named_parameters()}

    optimizer = peer.torch_optimizer(net, learning_rate=1.0, momentum=0.0)
    loss = peer.torch_step(
        net, optimizer,
        torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
        torch.from_numpy(labels.astype(np.int64)), step=1,
    )
    theirs = {n: p.detach().numpy() for n, p in net.named_parameters()}

    assert loss.item() == pytest.approx(stats["loss"], rel=1e-5)
    assert stats["ring_loss"] > 0
    changed = 0
    for name in before:
        change_ours = ours[name] - before[name]
        change_theirs = theirs[name] - before[name]
        scale = np.abs(change_theirs).max()
        np.testing.assert_allclose(change_ours, change_theirs, rtol=0,
                                   atol=2e-3 * scale + 1e-7, err_msg=name)
        changed += scale > 0
    # Every parameter moved: the comparison covers all of them.
    assert changed == len(before)
