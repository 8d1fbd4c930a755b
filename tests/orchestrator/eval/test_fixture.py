"""The committed evaluation fixture is exactly what its generator writes (no hand edits, no drift)."""
from __future__ import annotations

import subprocess
import sys


def test_fixture_regenerates_identically(eval_fixture, tmp_path):
    subprocess.run([sys.executable, str(eval_fixture / "make_eval_fixture.py"), str(tmp_path)], check=True)
    for name in ("lvis_val.json", "coco_val.json", "results.json"):
        assert (tmp_path / name).read_bytes() == (eval_fixture / name).read_bytes(), name
