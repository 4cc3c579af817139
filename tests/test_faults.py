"""Faults on the real CLI (``python train.py`` in subprocesses, real signals) on tiny_random: SIGINT and SIGKILL at
random points then ``resume_from=auto`` reproduce the uninterrupted run; two runs cannot share a folder; a used
folder is never appended to; a kill during a save is repaired."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_item_pairs

REPO = Path(__file__).resolve().parents[1]
STEPS = 10


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_item_pairs(tmp_path_factory.mktemp("faults_data") / "pairs.jsonl")


def command(data_file: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), "model=tiny_random", "trainer=tiny", "logger=none", "data=jsonl",
            f"data.path={data_file}", "data.max_length=48", "data.max_prompt_length=32", "data.eval_size=8",
            "data.eval_fraction=null", f"trainer.max_steps={STEPS}", "trainer.save_every=3", "trainer.eval_every=5",
            "trainer.keep_last=0", f"hydra.run.dir={run_dir}", *overrides]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    """The command's result; ``.stdout`` holds stdout and stderr together (Hydra logs to stdout)."""
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, timeout=600)


def steps_logged(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip() and '"loss"' in line]


@pytest.fixture(scope="module")
def uninterrupted(data_file, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    out = run(command(data_file, run_dir))
    assert out.returncode == 0, out.stdout[-2000:]
    return steps_logged(run_dir)


def interrupt_then_resume(data_file: Path, run_dir: Path, sig: int, after_steps: int, delay: float) -> list[dict]:
    """Start a run, send ``sig`` ``delay`` s after it logged ``after_steps`` steps, then resume it to the end."""
    proc = subprocess.Popen(command(data_file, run_dir), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while len(steps_logged(run_dir)) < after_steps and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(delay)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 or len(steps_logged(run_dir)) == STEPS, err[-2000:]
    out = run(command(data_file, run_dir, "trainer.resume_from=auto"))
    if out.returncode != 0 and "finished run" in out.stdout:  # the signal came after the last step
        return steps_logged(run_dir)
    assert out.returncode == 0, out.stdout[-2000:]
    return steps_logged(run_dir)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_signal_at_a_random_point_then_resume_is_exact(data_file, uninterrupted, tmp_path, sig):
    rng = random.Random(int(sig))
    for attempt in range(2):  # two random points per signal: inside a step, an eval or a save
        run_dir = tmp_path / f"run{attempt}"
        resumed = interrupt_then_resume(data_file, run_dir, sig, after_steps=rng.randint(1, STEPS - 3),
                                        delay=rng.uniform(0.0, 0.3))
        assert [s["step"] for s in resumed] == list(range(1, STEPS + 1))  # every step logged once
        assert [s["loss"] for s in resumed] == pytest.approx([s["loss"] for s in uninterrupted], abs=1e-5)
        leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
        assert not leftovers


def test_two_runs_cannot_share_a_folder(data_file, tmp_path):
    first = subprocess.Popen(command(data_file, tmp_path, "trainer.max_steps=400"), cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not steps_logged(tmp_path) and time.time() < deadline:
            time.sleep(0.1)
        second = run(command(data_file, tmp_path, "trainer.resume_from=auto"))
        assert second.returncode != 0
        assert "is in use by another run (pid" in second.stdout
    finally:
        first.kill()
        first.wait()


def test_a_used_folder_is_not_appended_to(data_file, tmp_path):
    assert run(command(data_file, tmp_path, "trainer.max_steps=2")).returncode == 0
    again = run(command(data_file, tmp_path, "trainer.max_steps=2"))
    assert again.returncode != 0 and "already holds a run" in again.stdout and "resume_from=auto" in again.stdout
    assert [s["step"] for s in steps_logged(tmp_path)] == [1, 2]
    finished = run(command(data_file, tmp_path, "trainer.max_steps=2", "trainer.resume_from=auto"))
    assert finished.returncode != 0 and "finished run" in finished.stdout


def test_resume_with_no_complete_checkpoint_starts_over_once(data_file, tmp_path):
    """Killed before its first checkpoint: resume_from=auto starts from step 0 and logs each step once."""
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 0.5}) + "\n" for s in (1, 2)))
    (tmp_path / "checkpoints" / ".tmp-step-3-abc").mkdir(parents=True)  # a save cut by the kill
    out = run(command(data_file, tmp_path, "trainer.max_steps=4", "trainer.resume_from=auto"))
    assert out.returncode == 0, out.stdout[-2000:]
    assert "no complete checkpoint" in out.stdout and "removed .tmp-step-3-abc" in out.stdout
    assert [s["step"] for s in steps_logged(tmp_path)] == [1, 2, 3, 4]
    assert oct((tmp_path / "checkpoints" / "final").stat().st_mode & 0o777) == oct(0o777 & ~current_umask())


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
