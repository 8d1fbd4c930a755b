"""bench/gpu_check.sh, the one command for a GPU machine, runs here in its CPU fallback (toy sizes) so that
its commands, flags and table keep working between the rare runs on a GPU."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow]


def test_gpu_check_cpu_fallback_writes_one_table_of_passing_rows(repo_root, tmp_path):
    out = tmp_path / "gpu_check.md"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTEST_CURRENT_TEST")}
    env["PYTHON"] = sys.executable
    proc = subprocess.run(["bash", str(repo_root / "bench" / "gpu_check.sh"), "--cpu", "--out", str(out)],
                          cwd=repo_root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = out.read_text().splitlines()
    assert table[0].startswith("GPU check ") and "CPU fallback" in table[0]
    assert table[2] == "| check | command | result | s | status |"
    rows = [line for line in table[4:] if line.startswith("| ")]
    names = [row.split(" | ")[0][2:] for row in rows]
    assert [n.split(" ")[0] for n in names] == ["model", "assignment", "train", "eval"], names
    assert all(row.endswith("| ok |") for row in rows), rows
    assert "images/s end to end" in rows[-1]
    assert Path(repo_root / "bench" / "gpu_check.sh").stat().st_mode & 0o111  # runnable as ./bench/gpu_check.sh
