"""The on-paper GPU table of bench/worker_input.py, computed by hand.

At 2.5 ms per image per core, 8 GPUs of 600 images/s make 4,800 images/s
per machine: 12 cores now at any machine count W; before, every machine
decoded the whole global batch, W x 4,800 images/s and 12·W cores.
"""

import pytest

from tests import bench_scripts


@pytest.fixture(scope="module")
def worker_input():
    return bench_scripts.load("worker_input")


def test_paper_table_matches_a_hand_computation(worker_input):
    rows = worker_input.paper_table(2.5, 600, 8, (1, 2, 4, 8))
    assert [(r["machines"], r["gpus"]) for r in rows] == [
        (1, 8), (2, 16), (4, 32), (8, 64)
    ]
    assert [r["images_per_s_now"] for r in rows] == [4800] * 4
    assert [r["images_per_s_before"] for r in rows] == [
        4800, 9600, 19200, 38400
    ]
    assert [r["cores_now"] for r in rows] == pytest.approx([12.0] * 4)
    assert [r["cores_before"] for r in rows] == pytest.approx(
        [12.0, 24.0, 48.0, 96.0]
    )
    # Another GPU count and rate: 4 GPUs x 1,000 images/s at 0.5 ms.
    (row,) = worker_input.paper_table(0.5, 1000, 4, (3,))
    assert (row["images_per_s_now"], row["images_per_s_before"]) == (
        4000, 12000
    )
    assert (row["cores_now"], row["cores_before"]) == pytest.approx((2, 6))


def test_paper_markdown_prints_the_rows(worker_input):
    rows = worker_input.paper_table(2.5, 600, 8, (1, 8))
    text = worker_input.paper_markdown(rows, 2.5, 600, 8)
    assert "| 1 (8) | 4,800 | 4,800 | 12.0 | 12.0 |" in text
    assert "| 8 (64) | 4,800 | 38,400 | 12.0 | 96.0 |" in text
    assert "at the measured 2.50 ms per image per core" in text
