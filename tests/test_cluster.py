"""Tests of ring_loss_tf.cluster: reading TF_CONFIG and making one."""

import json
import re

import pytest

from ring_loss_tf import cluster


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
