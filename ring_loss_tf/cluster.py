"""Which workers a run has and which one this process is: from TF_CONFIG,
or from the variables SLURM's `srun` gives each task; and a cluster on
127.0.0.1 for trying several workers on one machine.

A SLURM job step becomes the TF_CONFIG it stands for (`detect`, `use`):
TensorFlow's MultiWorkerMirroredStrategy and the rest of the package then
read one description of the cluster. This is `SlurmClusterResolver`'s
reading of SLURM_STEP_NODELIST and SLURM_STEP_TASKS_PER_NODE without its
GPU probing: with its default arguments it runs `nvidia-smi` (missing on
CPU nodes), and `gpus_per_node=0` raises a ValueError. Each task uses the
devices SLURM lets it see.

Imports no TensorFlow: training decides what to do before the strategy
starts (the data is prepared first; see `training.train`), and train.py
reports a bad cluster environment before TensorFlow loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket

from ring_loss_tf.errors import ConfigError

CLUSTER_SOURCES = ("auto", "tf_config", "slurm", "none")
# The first worker port of a SLURM step without reserved ports: one range of
# SLURM_PORTS_PER_JOB ports per job id, so two jobs sharing a node differ.
SLURM_BASE_PORT = 20000
SLURM_PORTS_PER_JOB = 16
SLURM_JOB_SLOTS = 2500


def _tf_config():
    return _tf_config_of(os.environ)


def _tf_config_of(environ):
    try:
        return json.loads(environ.get("TF_CONFIG", "") or "{}")
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


@dataclasses.dataclass(frozen=True)
class Cluster:
    """The workers of a run and this process's place among them.

    Attributes:
        source: "tf_config", "slurm" or "none" (one process).
        workers: the worker addresses, "host:port", in task-index order
            (a TF_CONFIG's chief task first).
        index: this process's place in `workers` (0 is the chief).
        gpus_per_task: SLURM's GPUs per task (None when it does not say).
    """

    source: str
    workers: tuple = ()
    index: int = 0
    gpus_per_task: int | None = None

    @property
    def num_workers(self):
        return max(1, len(self.workers))

    def tf_config(self):
        """The TF_CONFIG JSON of this worker (None for one process)."""
        if len(self.workers) < 2:
            return None
        return json.dumps({"cluster": {"worker": list(self.workers)},
                           "task": {"type": "worker", "index": self.index}})

    def describe(self):
        """E.g. "slurm, worker 1 of 2"."""
        text = f"{self.source}, worker {self.index} of {self.num_workers}"
        if self.gpus_per_task is not None:
            text += f", {self.gpus_per_task} GPU(s) per task"
        return text


def _cluster_error(mode, problem, fix):
    return ConfigError("cluster", mode, problem, fix)


def expand_hostlist(text):
    """SLURM's host list syntax as a list: "node[01-03,07],gpu5" ->
    node01, node02, node03, node07, gpu5 (zero padding kept; several
    bracket groups in one name give every combination)."""
    item_pattern = r"(?:[^,\[\]]|\[[^\[\]]*\])+"
    if not re.fullmatch(rf"{item_pattern}(?:,{item_pattern})*", text):
        raise ValueError(f"{text!r} is not a SLURM host list")
    names = []
    for item in re.findall(item_pattern, text):
        parts = re.split(r"(\[[^\]]*\])", item)
        expanded = [""]
        for part in parts:
            if not part.startswith("["):
                choices = [part]
            else:
                choices = []
                for piece in part[1:-1].split(","):
                    low, _, high = piece.partition("-")
                    if not low.isdigit() or (high and not high.isdigit()):
                        raise ValueError(
                            f"{piece!r} in {text!r} is not a number or a "
                            "range of numbers")
                    if not high:
                        choices.append(low)
                        continue
                    if int(high) < int(low):
                        raise ValueError(
                            f"the range {piece!r} in {text!r} runs "
                            "backwards")
                    choices.extend(str(n).zfill(len(low))
                                   for n in range(int(low), int(high) + 1))
            expanded = [e + c for e in expanded for c in choices]
        names.extend(expanded)
    if not names or any(not n or "[" in n or "]" in n for n in names):
        raise ValueError(f"{text!r} is not a SLURM host list")
    return names


def expand_tasks_per_node(text):
    """SLURM's tasks per node as a list: "2(x3),1" -> [2, 2, 2, 1]."""
    counts = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not match:
            raise ValueError(f"{text!r} is not a SLURM tasks-per-node list "
                             "(e.g. 2(x3),1)")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def _slurm_int(environ, name, mode):
    value = environ.get(name)
    if value is None or not value.strip().isdigit():
        raise _cluster_error(
            mode, f"{name}={value!r} is not a task count or index",
            "run under srun (which sets it), or pass --cluster=none")
    return int(value)


def _slurm_cluster(environ, mode):
    """The cluster of a SLURM job step: the workers in node order, each
    node's tasks at consecutive ports; this task is (SLURM_NODEID,
    SLURM_LOCALID), so any task distribution gives each task one index."""
    def bad(problem):
        return _cluster_error(
            mode, problem,
            "run train.py as the tasks of one srun step (its variables "
            "unchanged), or pass --cluster=none")

    try:
        nodes = expand_hostlist(environ.get("SLURM_STEP_NODELIST", ""))
        counts = expand_tasks_per_node(
            environ.get("SLURM_STEP_TASKS_PER_NODE", ""))
    except ValueError as error:
        raise bad(f"SLURM's step description: {error}") from None
    num_tasks = _slurm_int(environ, "SLURM_STEP_NUM_TASKS", mode)
    procid = _slurm_int(environ, "SLURM_PROCID", mode)
    node = _slurm_int(environ, "SLURM_NODEID", mode)
    local = _slurm_int(environ, "SLURM_LOCALID", mode)
    if len(nodes) != len(counts):
        raise bad(f"SLURM_STEP_NODELIST names {len(nodes)} node(s) but "
                  f"SLURM_STEP_TASKS_PER_NODE gives {len(counts)}")
    if sum(counts) != num_tasks:
        raise bad(f"SLURM_STEP_TASKS_PER_NODE gives {sum(counts)} tasks but "
                  f"SLURM_STEP_NUM_TASKS={num_tasks}")
    if procid >= num_tasks or node >= len(nodes) or local >= counts[node]:
        raise bad(f"task SLURM_PROCID={procid} (SLURM_NODEID={node}, "
                  f"SLURM_LOCALID={local}) is outside the step of "
                  f"{num_tasks} tasks on {len(nodes)} node(s)")
    reserved = environ.get("SLURM_STEP_RESV_PORTS", "")
    if reserved:  # srun --resv-ports: ports kept for this step on each node
        try:
            base = int(re.split(r"[-,]", reserved)[0])
        except ValueError:
            raise bad(f"SLURM_STEP_RESV_PORTS={reserved!r} is not a port "
                      "range") from None
    else:
        job = _slurm_int(environ, "SLURM_JOB_ID", mode)
        base = SLURM_BASE_PORT + (job % SLURM_JOB_SLOTS) * SLURM_PORTS_PER_JOB
    workers = tuple(f"{host}:{base + i}"
                    for host, count in zip(nodes, counts)
                    for i in range(count))
    gpus = environ.get("SLURM_GPUS_PER_TASK", "").split(":")[-1]
    return Cluster(
        source="slurm", workers=workers, index=sum(counts[:node]) + local,
        gpus_per_task=int(gpus) if gpus.isdigit() else None,
    )


def _slurm_step(environ):
    """Whether this process is one of several tasks of an srun step (the
    batch script itself has SLURM_NTASKS but no SLURM_STEP_NUM_TASKS: a
    train.py started there directly is one process)."""
    tasks = environ.get("SLURM_STEP_NUM_TASKS", "")
    return ("SLURM_PROCID" in environ and tasks.isdigit()
            and int(tasks) > 1)


def slurm_step_size(environ=None):
    """(nodes, tasks) of the srun step this process is one of several
    tasks of, or None."""
    environ = os.environ if environ is None else environ
    if not _slurm_step(environ):
        return None
    nodes = environ.get("SLURM_STEP_NUM_NODES", "1")
    return (int(nodes) if nodes.isdigit() else 1,
            int(environ["SLURM_STEP_NUM_TASKS"]))


def detect(mode="auto", environ=None):
    """The cluster this process belongs to.

    Args:
        mode: "auto" (TF_CONFIG if set, else the srun step if this process
            is one of its several tasks, else one process), "tf_config",
            "slurm" or "none" (one process, whatever the environment says).
        environ: the environment (default `os.environ`).

    Raises:
        ConfigError (setting "cluster"): the mode asks for an environment
            that is missing, or SLURM's variables contradict each other.
        ValueError: TF_CONFIG is not valid JSON.
    """
    environ = os.environ if environ is None else environ
    if mode not in CLUSTER_SOURCES:
        raise _cluster_error(mode, "is not a cluster source",
                             f"use one of {', '.join(CLUSTER_SOURCES)}")
    has_tf_config = bool(environ.get("TF_CONFIG", "").strip())
    if mode == "none":
        return Cluster("none")
    if mode == "auto":
        mode_used = ("tf_config" if has_tf_config
                     else "slurm" if _slurm_step(environ) else "none")
        if mode_used == "none":
            return Cluster("none")
    else:
        mode_used = mode
    if mode_used == "tf_config":
        if not has_tf_config:
            raise _cluster_error(
                mode, "TF_CONFIG is not set",
                "set TF_CONFIG on every worker (docs/clusters.md), or use "
                "--cluster=auto")
        config = _tf_config_of(environ)
        task = config.get("task", {})
        spec = config.get("cluster", {})
        # A "chief" task (TFJob's Chief replica) comes first: index 0 is
        # the chief, as `is_chief_task` decides.
        chiefs = list(spec.get("chief", []))
        index = int(task.get("index", 0))
        if task.get("type") != "chief":
            index += len(chiefs)
        return Cluster("tf_config",
                       tuple(chiefs + list(spec.get("worker", []))), index)
    if has_tf_config:
        raise _cluster_error(
            mode, "TF_CONFIG is set too, and the two could disagree",
            "unset TF_CONFIG to take the cluster from SLURM, or use "
            "--cluster=tf_config")
    if "SLURM_PROCID" not in environ:
        raise _cluster_error(
            mode, "no SLURM job step here (SLURM_PROCID is not set)",
            "start train.py with srun, or use --cluster=auto")
    return _slurm_cluster(environ, mode)


def use(cluster, environ=None):
    """Makes `cluster` the one TensorFlow and this package read: sets this
    process's TF_CONFIG for a SLURM step, removes it for "none"."""
    environ = os.environ if environ is None else environ
    if cluster.source == "slurm":
        environ["TF_CONFIG"] = cluster.tf_config() or ""
        if not environ["TF_CONFIG"]:
            del environ["TF_CONFIG"]
    elif cluster.source == "none":
        environ.pop("TF_CONFIG", None)
