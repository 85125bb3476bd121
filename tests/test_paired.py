"""The paired comparison of zero-shot results (benchmarks/quality_paired.py) against direct computations."""
import numpy as np
import pytest

from benchmarks.quality_paired import TASKS, paired_gap


def _result(bits_per_task):
    return {"metric": {t: "acc" for t in TASKS},
            "tasks": {t: {"rows": {"acc": "".join(map(str, b))}} for t, b in bits_per_task.items()}}


def test_paired_gap_equals_the_difference_of_averages_and_its_interval_covers_it():
    rng = np.random.default_rng(1)
    a = {t: rng.integers(0, 2, 400) for t in TASKS}
    b = {t: np.where(rng.random(400) < 0.8, a[t], 1 - a[t]) for t in TASKS}  # mostly the same rows right
    g = paired_gap(_result(a), _result(b), TASKS, iters=2000)
    direct = 100 * np.mean([a[t].mean() - b[t].mean() for t in TASKS])
    assert g["gap"] == pytest.approx(direct)
    assert g["lo"] <= direct <= g["hi"]
    unpaired_se = 100 * np.sqrt(sum(a[t].var() / 400 + b[t].var() / 400 for t in TASKS)) / len(TASKS)
    assert g["se"] < unpaired_se  # pairing removes the shared row difficulty


def test_identical_models_have_a_zero_gap_and_a_zero_width_interval():
    a = {t: np.random.default_rng(2).integers(0, 2, 50) for t in TASKS}
    g = paired_gap(_result(a), _result(a), TASKS, iters=200)
    assert g["gap"] == g["lo"] == g["hi"] == 0.0
