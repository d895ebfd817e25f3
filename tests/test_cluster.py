"""Tests of ring_loss_tf.cluster: reading TF_CONFIG and making one, and an
srun step read as a cluster (fake environments; tests/test_slurm.py runs a
real one)."""

import json
import os
import pathlib
import subprocess
import sys
import re

import pytest

from ring_loss_tf import cluster
from ring_loss_tf.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "tf_config, chief",
    [
        (None, True),
        ({"cluster": {"worker": ["a:1", "b:2"]},
          "task": {"type": "worker", "index": 0}}, True),
        ({"cluster": {"worker": ["a:1", "b:2"]},
          "task": {"type": "worker", "index": 1}}, False),
        # With a chief task, worker 0 is not the chief.
        ({"cluster": {"chief": ["c:0"], "worker": ["a:1"]},
          "task": {"type": "worker", "index": 0}}, False),
        ({"cluster": {"chief": ["c:0"], "worker": ["a:1"]},
          "task": {"type": "chief", "index": 0}}, True),
    ],
)
def test_is_chief_task(monkeypatch, tf_config, chief):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", json.dumps(tf_config))
    assert cluster.is_chief_task() is chief


def test_bad_tf_config_is_one_error(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", "{cluster: ")
    with pytest.raises(ValueError, match="TF_CONFIG is not valid JSON"):
        cluster.is_chief_task()
    with pytest.raises(ValueError, match="TF_CONFIG is not valid JSON"):
        cluster.tf_config_workers()


def test_loopback_tf_configs_name_one_cluster_and_each_task(monkeypatch):
    configs = [json.loads(c) for c in cluster.loopback_tf_configs(3)]
    workers = configs[0]["cluster"]["worker"]
    assert len(set(workers)) == 3
    assert all(w.startswith("127.0.0.1:") for w in workers)
    assert [c["cluster"]["worker"] for c in configs] == [workers] * 3
    assert [c["task"] for c in configs] == [
        {"type": "worker", "index": i} for i in range(3)
    ]
    chiefs = []
    for config in configs:
        monkeypatch.setenv("TF_CONFIG", json.dumps(config))
        chiefs.append(cluster.is_chief_task())
        assert cluster.tf_config_workers() == workers
    assert chiefs == [True, False, False]


# --------------------------------------------------------------------------
# SLURM: an srun step's variables as the workers of a TF_CONFIG


@pytest.mark.parametrize(
    "text, names",
    [
        ("vm", ["vm"]),
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        ("gpu5,node[9-11]", ["gpu5", "node9", "node10", "node11"]),
        ("r[1-2]-n[08-09]", ["r1-n08", "r1-n09", "r2-n08", "r2-n09"]),
        ("a[7],b", ["a7", "b"]),
    ],
)
def test_expand_hostlist(text, names):
    assert cluster.expand_hostlist(text) == names


@pytest.mark.parametrize(
    "text, message",
    [
        ("node[a-b]", "'a-b' in 'node\\[a-b\\]' is not a number"),
        ("node[3-1]", "the range '3-1' in 'node\\[3-1\\]' runs backwards"),
        ("node[01", "'node\\[01' is not a SLURM host list"),
        ("", "'' is not a SLURM host list"),
    ],
)
def test_bad_hostlist_is_named(text, message):
    with pytest.raises(ValueError, match=message):
        cluster.expand_hostlist(text)


def test_expand_tasks_per_node():
    assert cluster.expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert cluster.expand_tasks_per_node("4") == [4]
    with pytest.raises(ValueError, match="'x2' is not a SLURM tasks-per-node"):
        cluster.expand_tasks_per_node("x2")


def _step(procid, nodeid, localid, nodes="n[1-2]", per_node="2(x2)",
          tasks="4", job="7", **extra):
    """The variables srun gives task `procid` of a step."""
    return dict(SLURM_PROCID=str(procid), SLURM_NODEID=str(nodeid),
                SLURM_LOCALID=str(localid), SLURM_STEP_NODELIST=nodes,
                SLURM_STEP_TASKS_PER_NODE=per_node,
                SLURM_STEP_NUM_TASKS=tasks, SLURM_STEP_NUM_NODES="2",
                SLURM_JOB_ID=job, **extra)


# Job 7: ports from 20000 + 7 * 16 = 20112, one per task of a node.
WORKERS = ("n1:20112", "n1:20113", "n2:20112", "n2:20113")


@pytest.mark.parametrize(
    "procid, nodeid, localid, index",
    [
        (0, 0, 0, 0), (1, 0, 1, 1), (2, 1, 0, 2), (3, 1, 1, 3),
        # --distribution=cyclic puts task 1 on the second node: the index
        # follows (node, local task), and task 0 stays the chief.
        (1, 1, 0, 2), (2, 0, 1, 1),
    ],
)
def test_slurm_step_is_a_tf_config_cluster(procid, nodeid, localid, index):
    found = cluster.detect("auto", _step(procid, nodeid, localid))
    assert (found.source, found.workers, found.index) == (
        "slurm", WORKERS, index)
    assert json.loads(found.tf_config()) == {
        "cluster": {"worker": list(WORKERS)},
        "task": {"type": "worker", "index": index},
    }
    assert found.describe() == f"slurm, worker {index} of 4"


def test_slurm_reserved_ports_and_gpus_per_task():
    found = cluster.detect("slurm", _step(
        0, 0, 0, nodes="gpu[07-08]", SLURM_STEP_RESV_PORTS="31000-31001",
        SLURM_GPUS_PER_TASK="a100:1"))
    assert found.workers == ("gpu07:31000", "gpu07:31001", "gpu08:31000",
                             "gpu08:31001")
    assert found.describe() == "slurm, worker 0 of 4, 1 GPU(s) per task"


@pytest.mark.parametrize(
    "environ, source",
    [
        ({}, "none"),
        # The batch script itself: SLURM_NTASKS without a step; a train.py
        # started there is one process.
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "3"},
         "none"),
        (_step(0, 0, 0, nodes="n1", per_node="1", tasks="1"), "none"),
        ({"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1", "b:2"]},
                                   "task": {"type": "worker",
                                            "index": 1}})}, "tf_config"),
        # TF_CONFIG wins over the step under auto.
        (dict(_step(0, 0, 0), TF_CONFIG='{"cluster": {"worker": ["a:1"]}}'),
         "tf_config"),
    ],
)
def test_auto_detection(environ, source):
    assert cluster.detect("auto", environ).source == source
    assert cluster.detect("none", environ) == cluster.Cluster("none")


@pytest.mark.parametrize(
    "spec, task, index",
    [
        ({"worker": ["a:1", "b:2"]}, {"type": "worker", "index": 1}, 1),
        ({"worker": ["a:1", "b:2"]}, {"type": "worker", "index": 0}, 0),
        # With a chief task (TFJob's Chief replica), it is index 0.
        ({"chief": ["c:0"], "worker": ["a:1", "b:2"]},
         {"type": "worker", "index": 0}, 1),
        ({"chief": ["c:0"], "worker": ["a:1", "b:2"]},
         {"type": "chief", "index": 0}, 0),
    ],
)
def test_tf_config_index_zero_is_the_chief(monkeypatch, spec, task, index):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": spec,
                                                "task": task}))
    found = cluster.detect("tf_config")
    assert found.index == index
    assert found.workers == tuple(spec.get("chief", []) + spec["worker"])
    assert cluster.is_chief_task() is (index == 0)


@pytest.mark.parametrize(
    "mode, environ, message",
    [
        ("slurm", {}, "cluster='slurm': no SLURM job step here "
         "\\(SLURM_PROCID is not set\\); start train.py with srun, or use "
         "--cluster=auto"),
        ("slurm", dict(_step(0, 0, 0), TF_CONFIG="{}"),
         "TF_CONFIG is set too, and the two could disagree; unset TF_CONFIG"),
        ("tf_config", _step(0, 0, 0), "TF_CONFIG is not set; set TF_CONFIG "
         "on every worker"),
        ("auto", _step(0, 0, 0, per_node="4"), "SLURM_STEP_NODELIST names 2 "
         "node\\(s\\) but SLURM_STEP_TASKS_PER_NODE gives 1; run train.py as "
         "the tasks of one srun step"),
        ("auto", _step(0, 0, 0, tasks="3"), "SLURM_STEP_TASKS_PER_NODE gives "
         "4 tasks but SLURM_STEP_NUM_TASKS=3"),
        ("auto", _step(1, 0, 2), "task SLURM_PROCID=1 \\(SLURM_NODEID=0, "
         "SLURM_LOCALID=2\\) is outside the step of 4 tasks on 2 node"),
        ("auto", _step(0, 0, 0, nodes="n[2-1]"), "SLURM's step description: "
         "the range '2-1' in 'n\\[2-1\\]' runs backwards"),
        ("auto", {k: v for k, v in _step(0, 0, 0).items()
                  if k != "SLURM_LOCALID"},
         "SLURM_LOCALID=None is not a task count or index"),
        ("mpi", {}, "cluster='mpi': is not a cluster source; use one of "
         "auto, tf_config, slurm, none"),
    ],
)
def test_bad_cluster_environment_is_one_config_error(mode, environ, message):
    with pytest.raises(ConfigError, match=message) as raised:
        cluster.detect(mode, environ)
    assert raised.value.setting == "cluster"
    assert "\n" not in str(raised.value)


def test_use_sets_or_removes_tf_config():
    environ = {"TF_CONFIG": "{}"}
    cluster.use(cluster.Cluster("none"), environ)
    assert environ == {}
    step = cluster.detect("auto", _step(2, 1, 0))
    cluster.use(step, environ)
    assert json.loads(environ["TF_CONFIG"])["task"]["index"] == 2
    # A TF_CONFIG the user set stays as it is.
    environ = {"TF_CONFIG": '{"cluster": {"worker": ["a:1"]}}'}
    cluster.use(cluster.detect("auto", environ), environ)
    assert environ == {"TF_CONFIG": '{"cluster": {"worker": ["a:1"]}}'}


def test_train_py_names_a_missing_slurm_step_in_one_line(tmp_path):
    """Before TensorFlow loads: exit 2 and one line naming the flag."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TF_CONFIG"))}
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--cluster=slurm",
         f"--model_dir={tmp_path}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "train.py: error: --cluster=slurm: no SLURM job step here "
        "(SLURM_PROCID is not set); start train.py with srun, or use "
        "--cluster=auto")


def test_docs_carry_the_sbatch_script_the_slurm_test_submits():
    """docs/clusters.md shows docs/train.sbatch (tests/test_slurm.py
    submits that file) character for character."""
    page = (REPO / "docs" / "clusters.md").read_text()
    script = (REPO / "docs" / "train.sbatch").read_text()
    assert f"```bash\n{script}```" in page


@pytest.mark.parametrize("procid", range(4))
def test_slurm_cluster_matches_tensorflows_slurm_resolver(monkeypatch,
                                                          procid):
    """The independent reference: TensorFlow's SlurmClusterResolver on the
    same step (block distribution, sorted host names), told the GPU counts
    so that it runs no nvidia-smi."""
    import tensorflow as tf

    environ = _step(procid, procid // 2, procid % 2, nodes="n[08-09]")
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    resolver = tf.distribute.cluster_resolver.SlurmClusterResolver(
        port_base=20000 + 7 * 16, gpus_per_node=2, gpus_per_task=1,
        auto_set_gpu=False)
    found = cluster.detect("slurm", environ)
    assert resolver.cluster_spec().as_dict() == {"worker": list(found.workers)}
    assert (resolver.task_type, resolver.task_id) == ("worker", found.index)


@pytest.mark.parametrize(
    "tf_config, peers, own",
    [
        (None, [], None),
        # One worker: no multi-worker strategy, nobody to wait for.
        ({"cluster": {"worker": ["a:1"]},
          "task": {"type": "worker", "index": 0}}, [], None),
        ({"cluster": {"worker": ["a:1", "b:2", "c:3"]},
          "task": {"type": "worker", "index": 1}},
         [("worker 0", "a:1"), ("worker 2", "c:3")], "b:2"),
        ({"cluster": {"chief": ["c:0"], "worker": ["a:1", "b:2"]},
          "task": {"type": "worker", "index": 0}},
         [("chief 0", "c:0"), ("worker 1", "b:2")], "a:1"),
    ],
)
def test_peer_tasks_are_the_other_tasks_by_name(
    monkeypatch, tf_config, peers, own
):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", json.dumps(tf_config))
    assert cluster.peer_tasks() == (peers, own)


def test_a_task_outside_the_cluster_is_one_error(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps(
        {"cluster": {"worker": ["a:1", "b:2"]},
         "task": {"type": "worker", "index": 2}}
    ))
    with pytest.raises(ValueError, match=(
        r"^TF_CONFIG's task worker 2 is not in its cluster \(worker 0, "
        r"worker 1\); give each process its own task of the same cluster\.$"
    )):
        cluster.peer_tasks()


@pytest.mark.parametrize("address, expected", [
    ("127.0.0.1:2222", ("127.0.0.1", 2222)),
    ("host.example:80", ("host.example", 80)),
    ("[::1]:2223", ("::1", 2223)),
])
def test_split_address(address, expected):
    assert cluster.split_address(address) == expected


@pytest.mark.parametrize("address", ["host", "host:", ":2222", "host:x",
                                     "host:70000"])
def test_an_address_without_a_port_is_one_error(address):
    with pytest.raises(ValueError, match=(
        rf"^TF_CONFIG address '{re.escape(address)}' is not host:port; "
        r"write each task's address as host:port, e\.g\. 10\.0\.0\.2:2222\.$"
    )):
        cluster.split_address(address)
