"""Worker processes of a loopback MultiWorkerMirroredStrategy cluster."""

import os
import pathlib
import subprocess
import sys

from ring_loss_tf import cluster

REPO = pathlib.Path(__file__).resolve().parents[1]


def start_workers(tmp_path, script_text, arguments):
    """One process per entry of `arguments` on loopback, as a TF_CONFIG
    cluster; returns their (return code, output)."""
    script = tmp_path / "worker.py"
    script.write_text(script_text)
    configs = cluster.loopback_tf_configs(len(arguments))
    processes = []
    for tf_config, extra in zip(configs, arguments):
        env = dict(os.environ)
        env["TF_CONFIG"] = tf_config
        env["TF_CPP_MIN_LOG_LEVEL"] = "2"
        env.pop("PYTHONPATH", None)
        processes.append(subprocess.Popen(
            [sys.executable, str(script), str(REPO), str(REPO / "tests"),
             *extra],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        ))
    results = []
    for process in processes:
        try:
            output = process.communicate(timeout=600)[0]
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            raise
        results.append((process.returncode, output))
    return results
