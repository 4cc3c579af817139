"""A real 2-arm × 2-seed sweep through hydra-submitit's local executor (``hydra/launcher=submitit_local``; the SLURM
config differs only in the launcher) on tiny_random: sweep → submitit jobs → one run folder each → W&B offline runs
grouped by sweep with job_type = arm and a seed tag (read back from W&B's own run files) → ``lbdpo.eval.compare``
groups the seeds of each arm."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARMS, SEEDS = ("fixed_b01", "learn_eps01"), (0, 1)


def wandb_run_record(path: Path):
    """The ``Run`` record (name, group, job_type, tags) of a W&B offline transaction log ``run-<id>.wandb``.

    The file is a 7-byte header (":W&B", magic, version) then LevelDB-log records (32 KiB blocks; each record:
    crc32, little-endian length, type FULL/FIRST/MIDDLE/LAST, data) holding ``wandb_internal_pb2.Record``s.
    wandb ≥ 0.19 writes it from its Go core and ships no Python reader, hence these lines.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, pending = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the rest of a block too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "run":
                return record.run
    raise AssertionError(f"no run record in {path}")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("sweep")
    pairs = tmp / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": f"Yes {i}.", "rejected": "No."}) + "\n"
                             for i in range(48)))
    sweep_dir = tmp / "multirun"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp), OMP_NUM_THREADS="1")  # no W&B credentials: logger.mode=auto must pick offline
    cmd = [sys.executable, str(REPO / "train.py"), "-m", "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep_dir}",
           "hydra.launcher.cpus_per_task=1", "model=tiny_random", "trainer=tiny", "logger=wandb", "data=jsonl",
           f"data.path={pairs}", "data.max_length=48", "data.max_prompt_length=32", "data.eval_size=8",
           "data.eval_fraction=null", "trainer.max_steps=2", f"+arm={','.join(ARMS)}",
           f"seed={','.join(map(str, SEEDS))}"]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-3000:]
    return sweep_dir


def run_dirs(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())


def test_each_job_writes_one_run_folder(sweep):
    runs = run_dirs(sweep)
    assert len(runs) == len(ARMS) * len(SEEDS)  # one folder per job, directly under the sweep (no "/" in names)
    for run in runs:
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
                 if '"loss"' in line]
        assert steps == [1, 2]
        assert (run / "checkpoints" / "final" / "model.safetensors").is_file()
    assert list((sweep / ".submitit").glob("*/*_log.out"))  # really ran as submitit jobs


def test_wandb_groups_the_sweep_by_arm_and_seed(sweep):
    seen = set()
    for run in run_dirs(sweep):
        (log,) = run.glob("wandb/offline-run-*/run-*.wandb")
        record = wandb_run_record(log)
        assert record.run_group == f"lbdpo/{sweep.name}"
        assert record.job_type in ARMS
        (tag,) = record.tags
        seen.add((record.job_type, tag))
    assert seen == {(arm, f"seed={s}") for arm in ARMS for s in SEEDS}


def test_compare_groups_seeds_into_arms(sweep):
    from lbdpo.eval.compare import collect_runs, group_arms

    arms = group_arms(collect_runs(sweep))
    assert len(arms) == len(ARMS) and all(a["n_seeds"] == len(SEEDS) for a in arms)
    assert sorted(a["arm"].split("+arm=")[1].split()[0] for a in arms) == sorted(ARMS)
