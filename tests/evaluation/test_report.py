"""Tests of ring_loss_tf.evaluation.report: the tables and results.json.

Results are built here from hand-made numbers and scores (no model), and
the text is compared with what the numbers give by hand.
"""

import json

import numpy as np
import pytest

from ring_loss_tf.evaluation import protocols
from ring_loss_tf.evaluation import report as report_lib
from ring_loss_tf.evaluation import metrics


def _result(**fields):
    base = metrics.verify(np.array([0.9, 0.1, 0.8, 0.2]),
                          np.array([True, False, True, False]), num_folds=2)
    return metrics.VerificationResult(**{**base.__dict__, **fields})


def test_format_verification_is_train_pys_table():
    result = _result(
        accuracy_mean=0.97983, accuracy_std=0.0030, num_genuine=3000,
        num_impostor=3000, tar_at_far={1e-3: 0.76983, 1e-4: None},
    )
    assert report_lib.format_verification(result, "Unseen") == (
        "Unseen: 3000 genuine, 3000 impostor pairs\n"
        "| 10-fold accuracy | TAR@FAR=1e-3 | TAR@FAR=1e-4 |\n"
        "|---|---|---|\n"
        "| 97.98% ± 0.30 | 76.98% | n/a |"
    )
    # A FAR that was not measured prints n/a too.
    text = report_lib.format_verification(
        _result(tar_at_far={}), "T"
    )
    assert text.endswith("| 100.00% ± 0.00 | n/a | n/a |")


def _report():
    rng = np.random.default_rng(0)
    issame = np.arange(40) % 2 == 0
    scores = rng.normal(size=40) + 2 * issame
    result = metrics.verify(scores, issame, fars=(0.1,))
    embeddings = rng.normal(size=(20, 4))
    return protocols.ModelReport(
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
    table = report_lib.format_table([report])
    assert table.startswith("Model m1: metric=cosine, flip=False")
    row = next(line for line in table.splitlines() if "tiny" in line
               and "20/20" in line)
    acc = (f"{100 * result.accuracy_mean:.2f} ± "
           f"{100 * result.accuracy_std:.2f}")
    assert acc in row and f"{100 * result.auc:.2f}" in row
    assert f"{100 * result.tar_at_far[0.1]:.2f}" in row
    written = report_lib.write_outputs(
        [report], tmp_path / "out", plots=False, extra={"command": "x"}
    )
    saved = json.loads(written[0].read_text())
    entry = saved["models"][0]["verification"]["tiny"]
    assert entry["auc"] == pytest.approx(result.auc)
    assert entry["tar_at_far"] == {"0.1": result.tar_at_far[0.1]}
    assert saved["command"] == "x"


def test_template_sets_print_insightface_rule_beside_ours(tmp_path):
    # Impostors 0.0 .. 0.9 and four genuine pairs between them: at FAR 0.04
    # ours is n/a (one impostor is 0.1) and insightface's nearest point
    # (FAR 0) has TAR 1/4; at 0.18 ours is 2/4 (FAR 0.1) and theirs 3/4
    # (FAR 0.2, the nearest point).
    scores = np.r_[np.arange(10) / 10, 0.95, 0.85, 0.75, 0.65]
    issame = np.r_[np.zeros(10, bool), np.ones(4, bool)]
    result = metrics.verify(scores, issame, num_folds=2, fars=(0.04, 0.18))
    report, _ = _report()
    report.settings["fars"] = [0.04, 0.18]
    report.verification = {"ijbx templates": {
        **report.verification["tiny"], "result": result,
        "num_templates": 8,
    }}
    lines = report_lib.format_table([report]).splitlines()
    ours = next(line for line in lines if "ijbx templates " in line
                and "4/10" in line)
    assert ours.split()[-4:-2] == ["n/a", "50.00"]
    theirs = next(line for line in lines
                  if "ijbx templates (insightface rule)" in line)
    assert theirs.split()[-2:] == ["25.00", "75.00"]
    assert any(line.startswith("  (insightface rule): TAR of the point of "
                               "sklearn's default ROC nearest each FAR")
               for line in lines)
    # A pair set (no templates) keeps its one row.
    report.verification = {"tiny": report.verification["ijbx templates"]}
    del report.verification["tiny"]["num_templates"]
    assert "insightface rule" not in report_lib.format_table([report])
    written = report_lib.write_outputs(
        [report], tmp_path / "out", plots=False)
    entry = json.loads(written[0].read_text())["models"][0]["verification"][
        "tiny"]
    assert entry["tar_at_far_nearest"] == {"0.04": 0.25, "0.18": 0.75}
    assert entry["tar_at_far"] == {"0.04": None, "0.18": 0.5}
