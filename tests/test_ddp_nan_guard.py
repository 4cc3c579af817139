"""The NaN guard with several processes: a non-finite loss on ONE process must skip the update on every process,
with the same collectives on all of them (no collective mismatch, no hang), and leave the replicas equal.

Two CPU processes over gloo, launched with torchrun: plain DDP, and FSDP2 (through ``tests/launchers/fsdp_on_cpu.py``,
see tests/test_fsdp.py) with gradient accumulation. A launcher written into the test's folder wraps
``DynamicBetaDPOModel.forward`` so that rank 1's third training forward returns a NaN loss, and wraps the trainer's
``run_steps`` to write, per rank, the skips it counted and a digest of the full weights before and after training.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_item_pairs
from test_fsdp import fsdp_env

REPO = Path(__file__).resolve().parents[1]
STEPS = 5
BAD_FORWARD = 3  # rank 1's third training forward gives a NaN loss

LAUNCHER = '''
import dataclasses, hashlib, json, os, runpy, sys

from lbdpo.dpo_model import DynamicBetaDPOModel
import lbdpo.train.trainer as trainer
from lbdpo.train.sharded import full

OUT, TARGET, BAD = sys.argv[1], sys.argv[2], int(sys.argv[3])
RANK = int(os.environ["RANK"])
forward, calls = DynamicBetaDPOModel.forward, {"n": 0}


def nan_forward(self, batch):
    out = forward(self, batch)
    if self.training and RANK == 1:
        calls["n"] += 1
        if calls["n"] == BAD:
            out = dataclasses.replace(out, loss=out.loss * float("nan"), losses=out.losses * float("nan"))
    return out


def digest(run):
    """sha256 of every full parameter (a collective under FSDP: all ranks, same order) and whether all are finite."""
    h, finite = hashlib.sha256(), True
    for name, p in run.model.named_parameters():
        value = full(p.detach()).cpu().float()
        finite = finite and bool(value.isfinite().all())
        h.update(name.encode() + value.numpy().tobytes())
    return h.hexdigest(), finite


run_steps = trainer.run_steps


def recording_run_steps(run, stop):
    before = digest(run)
    run_steps(run, stop)
    after = digest(run)
    record = {"skips": run.state.nonfinite_skips, "steps": run.state.step, "bad_calls": calls["n"],
              "before": before[0], "after": after[0], "finite": after[1]}
    with open(os.path.join(OUT, f"rank{RANK}.json"), "w") as f:
        json.dump(record, f)


DynamicBetaDPOModel.forward = nan_forward
trainer.run_steps = recording_run_steps
sys.argv = [TARGET, *sys.argv[4:]]
runpy.run_path(TARGET, run_name="__main__")
'''


def run_or_kill(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run the launch; a hang (a collective that never completes) fails the test and kills torchrun and its
    workers (they run in sessions of their own, so killing torchrun alone would leave them waiting forever)."""
    import psutil  # an Accelerate dependency

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        launcher = psutil.Process(proc.pid)
        for p in [*launcher.children(recursive=True), launcher]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        stdout, _ = proc.communicate()
        pytest.fail(f"the 2-process run hung for {timeout} s (a collective mismatch?):\n{stdout[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout)


@pytest.mark.parametrize("kind", ["ddp", "fsdp_accumulate"])
def test_nonfinite_loss_on_one_rank_skips_the_step_on_all(kind, tmp_path):
    pairs = write_item_pairs(tmp_path / "pairs.jsonl")
    run_dir = tmp_path / "run"
    launcher = tmp_path / "nan_on_rank1.py"
    launcher.write_text(LAUNCHER)
    if kind == "ddp":
        target, env, extra = REPO / "train.py", {**os.environ, "OMP_NUM_THREADS": "1"}, []
    else:  # FSDP2; the third forward is step 2's first micro-batch, accumulated without synchronisation
        target, env = REPO / "tests" / "launchers" / "fsdp_on_cpu.py", fsdp_env()
        extra = ["trainer.gradient_accumulation_steps=2", "trainer.batch_size=1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(launcher), str(tmp_path),
           str(target), str(BAD_FORWARD),
           "model=tiny_random", "trainer=tiny", "logger=none", "data=jsonl", f"data.path={pairs}",
           "data.max_length=48", "data.max_prompt_length=32", "data.eval_size=null", f"trainer.max_steps={STEPS}",
           "trainer.eval_every=0", "trainer.save_every=0", "beta_head.w_init=0.1", f"hydra.run.dir={run_dir}", *extra]
    out = run_or_kill(cmd, env, timeout=150)
    assert out.returncode == 0, out.stdout[-4000:]
    if kind != "ddp":
        assert "2 process(es), FSDP, parameters DTensor" in out.stdout  # really sharded, not DDP

    bad_step = 3 if kind == "ddp" else 2
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r]
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    assert [s["train/nonfinite_skips"] for s in steps] == [0] * (bad_step - 1) + [1] * (STEPS - bad_step + 1)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[1]["bad_calls"] >= BAD_FORWARD  # the NaN was injected on rank 1 ...
    for rank in ranks:  # ... and both ranks counted the one skipped step and trained the others
        assert (rank["skips"], rank["steps"]) == (1, STEPS)
        assert rank["finite"] and rank["after"] != rank["before"]
    assert ranks[0]["after"] == ranks[1]["after"]  # the replicas stayed equal
    assert out.stdout.count("update skipped") == 2  # each rank logged it
