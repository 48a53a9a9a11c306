"""benchmarks/gpu_run.sh, the one command a lent GPU runs: rehearsed on the CPU at toy sizes (REHEARSE=1)
so that a step broken between GPU loans fails here, and loud about what was not carried."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_run.sh"


def test_the_rehearsal_runs_every_step_and_checks_the_answers(tmp_path: Path) -> None:
    env = {**os.environ, "REHEARSE": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    check = json.loads((tmp_path / "gpu_check.json").read_text())
    assert check["identical"] == check["requests"] == 6  # every answer == its solo reference
    for name in ("decode_graphs_gpu", "decode_graphs_gpu_256", "compare_gpu", "compare_gpu_256"):
        assert json.loads((tmp_path / f"{name}.json").read_text())["results"], name
    assert "time to first token" in (tmp_path / "prefix_gpu_ttft.txt").read_text()


def test_without_the_carried_folders_it_stops_at_once_saying_what_to_carry(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    done = subprocess.run(
        ["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert ".devmodel/ is missing" in done.stderr and "gpu_prep.sh" in done.stderr and "carry" in done.stderr
