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


def peer_tasks():
    """The tasks this worker waits for as MultiWorkerMirroredStrategy
    starts: [(name, address)], e.g. [("worker 1", "127.0.0.1:2223")], and
    this worker's own address; ([], None) unless TF_CONFIG names several
    workers (the case `trainer.build_strategy` makes a multi-worker
    strategy for).

    Raises:
        ValueError: TF_CONFIG's task is not one of its cluster's tasks.
    """
    config = _tf_config()
    jobs = config.get("cluster", {})
    if len(jobs.get("worker", [])) <= 1:
        return [], None
    task = config.get("task", {})
    own = (task.get("type"), int(task.get("index", 0)))
    tasks = [
        ((job, index), address)
        for job in ("chief", "worker")
        for index, address in enumerate(jobs.get(job, []))
    ]
    addresses = dict(tasks)
    if own not in addresses:
        raise ValueError(
            f"TF_CONFIG's task {own[0]} {own[1]} is not in its cluster "
            f"({', '.join(f'{j} {i}' for (j, i), _ in tasks)}); give each "
            "process its own task of the same cluster."
        )
    peers = [(f"{job} {index}", address)
             for (job, index), address in tasks if (job, index) != own]
    return peers, addresses[own]


def split_address(address):
    """(host, port) of a TF_CONFIG address "host:port" ("[::1]:port" for
    IPv6).

    Raises:
        ValueError: no port, or not a number.
    """
    host, _, port = str(address).rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"TF_CONFIG address {address!r} is not host:port; write each "
            "task's address as host:port, e.g. 10.0.0.2:2222."
        )
    return host.strip("[]"), int(port)


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
