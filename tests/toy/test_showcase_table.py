"""scripts/mopd_showcase_table.py: per-domain numbers come from the runs' evaluations, and a missing run is "—"."""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.unit


def _write_run(path, evals):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for step, by_domain in evals:
            row = {"step": step, "eval/reward/mean": sum(by_domain.values()) / len(by_domain)}
            row.update({f"eval/reward/by_source/toy/{d}": v for d, v in by_domain.items()})
            f.write(json.dumps(row) + "\n")
            f.write(json.dumps({"step": step + 1, "reward/mean": 0.5}) + "\n")   # a training row between evals


def test_table_reads_each_column_from_its_run(tmp_path):
    runs = tmp_path / "runs"
    _write_run(runs / "teachers" / "add", [(0, {"add": 0.5}), (30, {"add": 0.9})])
    _write_run(runs / "mopd-13", [(0, {"add": 0.5, "box": 0.2}), (60, {"add": 0.8, "box": 0.3})])
    _write_run(runs / "baselines" / "mixed-13", [(0, {"add": 0.5, "box": 0.2}), (390, {"add": 0.7, "box": 0.25})])
    out = subprocess.run([sys.executable, "scripts/mopd_showcase_table.py", "--runs", str(runs), "--plot", ""],
                         cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 0, out.stderr
    add = next(line for line in out.stdout.splitlines() if line.startswith("| add |"))
    cells = [c.strip() for c in add.strip("|").split("|")]
    # domain, reward, base, teacher, student, sequential, mixed, kept
    assert cells[2:7] == ["0.500", "0.900", "0.800", "—", "0.700"]
    assert cells[7] == "75% / — / 50%"                      # (0.8 − 0.5) / (0.9 − 0.5), (0.7 − 0.5) / 0.4
    box = next(line for line in out.stdout.splitlines() if line.startswith("| box |"))
    assert "| 0.200 | — | 0.300 | — | 0.250 |" in box        # no teacher run: no teacher number, no "kept"
    mean = next(line for line in out.stdout.splitlines() if line.startswith("| **mean**"))
    assert "**—**" in mean                                    # a mean over missing domains is not made up
