"""``benchmarks/gpu_bench.sh`` is ready for its one GPU call: its default stage (``table``: TRL against ``rows`` and
every packed layout, ``flex`` included, at the three shapes) dry-runs on the CPU with tiny models and prints one row
per shape and arm with numbers — no arm failed or was skipped. Slow (≈ 1 minute on 2 cores: 15 short training runs)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, SHARED_PREFERENCE_DIR


@pytest.mark.slow
def test_the_table_stage_dry_runs_on_the_cpu(tmp_path):
    if not (SHARED_PREFERENCE_DIR / "hh_helpful-base_train_sample.jsonl").is_file():
        pytest.skip("the HH sample of ../shared is not here")
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        from gpu_table import ARMS, SHAPES
    finally:
        sys.path.remove(str(REPO_ROOT / "benchmarks"))
    assert "flex" in ARMS
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("LBDPO_SHARED_DATA", None)
    # trl is a benchmark-only dependency (benchmarks/requirements.txt), not in `make test`'s venv: without it the
    # table runs lbdpo's arms only, and their speed ratio to TRL is "–"
    with_trl = importlib.util.find_spec("trl") is not None
    arms, ratio = (["trl", *ARMS], r"[\d.]+×") if with_trl else (list(ARMS), "–")
    env["TABLE_ARMS"] = ",".join(arms)
    run = subprocess.run(["bash", "benchmarks/gpu_bench.sh", str(tmp_path), "cpu", "tiny", "table"], cwd=REPO_ROOT,
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and "rc=0" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
    table = (tmp_path / "table.md").read_text()
    number = r"\d+\.\d{3}"
    for shape in SHAPES:
        for arm in arms:
            row = rf"^\| {shape} \| {arm} \| {number} \| {number}–{number} \| [\d.]+ \| [\d,]+ \| – \| {ratio} \|$"
            assert re.search(row, table, re.MULTILINE), f"{shape}/{arm} missing or failed:\n{table[-3000:]}"
    assert "failed" not in table and "not run" not in table
