"""Tests of ring_loss_tf.evaluation_report: the tables and results.json.

Results are built here from hand-made numbers and scores (no model), and
the text is compared with what the numbers give by hand.
"""

import json

import numpy as np
import pytest

from ring_loss_tf import evaluation
from ring_loss_tf import evaluation_report
from ring_loss_tf import metrics


def _result(**fields):
    base = metrics.verify(np.array([0.9, 0.1, 0.8, 0.2]),
                          np.array([True, False, True, False]), num_folds=2)
    return metrics.VerificationResult(**{**base.__dict__, **fields})


def test_format_verification_is_train_pys_table():
    result = _result(
        accuracy_mean=0.97983, accuracy_std=0.0030, num_genuine=3000,
        num_impostor=3000, tar_at_far={1e-3: 0.76983, 1e-4: None},
    )
    assert evaluation_report.format_verification(result, "Unseen") == (
        "Unseen: 3000 genuine, 3000 impostor pairs\n"
        "| 10-fold accuracy | TAR@FAR=1e-3 | TAR@FAR=1e-4 |\n"
        "|---|---|---|\n"
        "| 97.98% ± 0.30 | 76.98% | n/a |"
    )
    # A FAR that was not measured prints n/a too.
    text = evaluation_report.format_verification(
        _result(tar_at_far={}), "T"
    )
    assert text.endswith("| 100.00% ± 0.00 | n/a | n/a |")


def _report():
    rng = np.random.default_rng(0)
    issame = np.arange(40) % 2 == 0
    scores = rng.normal(size=40) + 2 * issame
    result = metrics.verify(scores, issame, fars=(0.1,))
    embeddings = rng.normal(size=(20, 4))
    return evaluation.ModelReport(
        model={"name": "m1"},
        settings={"metric": "cosine", "flip": False, "low_res": [],
                  "low_res_side": "probe", "fars": [0.1]},
        verification={"tiny": {
            "result": result,
            "norms": metrics.norm_statistics(embeddings),
            "embed_seconds": 0.5,
            "num_images": 20,
            "low_res": {},
        }},
        identification=None,
    ), result


def test_format_table_and_results_json(tmp_path):
    report, result = _report()
    table = evaluation_report.format_table([report])
    assert table.startswith("Model m1: metric=cosine, flip=False")
    row = next(line for line in table.splitlines() if "tiny" in line
               and "20/20" in line)
    acc = (f"{100 * result.accuracy_mean:.2f} ± "
           f"{100 * result.accuracy_std:.2f}")
    assert acc in row and f"{100 * result.auc:.2f}" in row
    assert f"{100 * result.tar_at_far[0.1]:.2f}" in row
    written = evaluation_report.write_outputs(
        [report], tmp_path / "out", plots=False, extra={"command": "x"}
    )
    saved = json.loads(written[0].read_text())
    entry = saved["models"][0]["verification"]["tiny"]
    assert entry["auc"] == pytest.approx(result.auc)
    assert entry["tar_at_far"] == {"0.1": result.tar_at_far[0.1]}
    assert saved["command"] == "x"
