"""TF_CONFIG: which workers a run has, which one this process is, and a
cluster on 127.0.0.1 for trying several workers on one machine.

Imports no TensorFlow: training decides what to do before the strategy
starts (the data is prepared first; see `training.train`).
"""

from __future__ import annotations

import json
import os
import socket


def _tf_config():
    try:
        return json.loads(os.environ.get("TF_CONFIG", "") or "{}")
    except json.JSONDecodeError as error:
        raise ValueError(
            f"TF_CONFIG is not valid JSON ({error}); set it as described in "
            "the tf.distribute multi-worker guide or unset it."
        ) from None


def tf_config_workers():
    """The worker addresses TF_CONFIG names (empty without TF_CONFIG)."""
    return _tf_config().get("cluster", {}).get("worker", [])


def is_chief_task():
    """Whether TF_CONFIG makes this process the chief (or there is none):
    the answer `trainer.is_chief` gives once the strategy exists."""
    config = _tf_config()
    task = config.get("task", {})
    if not task or task.get("type") == "chief":
        return True
    cluster = config.get("cluster", {})
    return (
        "chief" not in cluster
        and task.get("type") == "worker"
        and int(task.get("index", 0)) == 0
    )


def loopback_tf_configs(num_workers):
    """TF_CONFIG values (JSON strings), one per worker, of a cluster of
    `num_workers` processes on 127.0.0.1 at ports free now."""
    sockets = [socket.socket() for _ in range(num_workers)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    workers = [f"127.0.0.1:{s.getsockname()[1]}" for s in sockets]
    for s in sockets:
        s.close()
    return [
        json.dumps({"cluster": {"worker": workers},
                    "task": {"type": "worker", "index": index}})
        for index in range(num_workers)
    ]
