"""FSDP with the shipped Accelerate config (conf/accelerate/fsdp.yaml) on 2 CPU processes over gloo, on tiny_random:
the same losses as 1 process with the same global batch, checkpoints that plain ``from_pretrained`` loads, exact
resume; and a launch that asks for FSDP where Accelerate cannot give it fails with one clear line.

Accelerate 1.15 enables FSDP only on accelerators, so the 2-process runs go through
``tests/launchers/fsdp_on_cpu.py``, which changes only that decision (see its docstring); the environment is the
one ``accelerate launch --config_file conf/accelerate/fsdp.yaml`` sets, computed by Accelerate's own launcher code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_item_pairs

REPO = Path(__file__).resolve().parents[1]
FSDP_CONFIG = REPO / "conf" / "accelerate" / "fsdp.yaml"
STEPS = 4


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_item_pairs(tmp_path_factory.mktemp("fsdp_data") / "pairs.jsonl")


def overrides(pairs: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["model=tiny_random", "trainer=tiny", "logger=none", "data=jsonl", f"data.path={pairs}",
            "data.max_length=48", "data.max_prompt_length=32", "data.eval_size=8", "data.eval_fraction=null",
            f"trainer.max_steps={STEPS}", f"trainer.eval_every={STEPS}", "trainer.save_every=2", "trainer.keep_last=0",
            "beta_head.w_init=0.1", f"hydra.run.dir={run_dir}", *extra]


def fsdp_env() -> dict[str, str]:
    """The environment ``accelerate launch --config_file conf/accelerate/fsdp.yaml`` gives its processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(FSDP_CONFIG), "train.py"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    keys = [k for k in env if k.startswith(("FSDP_", "ACCELERATE_"))]
    return {**os.environ, **{k: env[k] for k in keys}, "OMP_NUM_THREADS": "1"}


def run_fsdp(pairs: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           str(REPO / "tests" / "launchers" / "fsdp_on_cpu.py"), *overrides(pairs, run_dir, "trainer.batch_size=2", *extra)]
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=fsdp_env(), cwd=REPO,
                          timeout=600)


def logged(run_dir: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r], [r for r in rows if "eval/loss" in r]


@pytest.fixture(scope="module")
def runs(pairs, tmp_path_factory):
    """(1 process, batch 4) and (FSDP, 2 processes × batch 2) run dirs."""
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("fsdp")
    out = subprocess.run([sys.executable, str(REPO / "train.py"), *overrides(pairs, one, "trainer.batch_size=4")],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:]
    out = run_fsdp(pairs, two)
    assert out.returncode == 0, out.stdout[-3000:]
    assert "2 process(es), FSDP, parameters DTensor" in out.stdout  # really sharded, not DDP
    return one, two


def test_fsdp_gives_the_losses_of_one_process(runs):
    (s1, e1), (s2, e2) = logged(runs[0]), logged(runs[1])
    assert [s["step"] for s in s2] == list(range(1, STEPS + 1))
    for a, b in zip(s1, s2, strict=True):
        for key in ("loss", "rewards/margins", "beta/mean", "beta/std", "beta_head/w", "grad_norm/total"):
            assert b[key] == pytest.approx(a[key], abs=1e-4), (a["step"], key)
    assert e2[-1]["eval/loss"] == pytest.approx(e1[-1]["eval/loss"], abs=1e-4)


def test_fsdp_checkpoint_loads_with_plain_from_pretrained(runs):
    from transformers import AutoModelForCausalLM

    from lbdpo import AutoModelForCausalLMWithBetaHead

    ids = torch.tensor([[5, 6, 7, 8, 9]])
    one, two = (AutoModelForCausalLM.from_pretrained(r / "checkpoints" / "final") for r in runs)
    torch.testing.assert_close(two(input_ids=ids).logits, one(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    heads = [AutoModelForCausalLMWithBetaHead.from_pretrained(r / "checkpoints" / "final").beta_head for r in runs]
    for (name, a), (_, b) in zip(heads[0].state_dict().items(), heads[1].state_dict().items(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=name)


def test_fsdp_resume_is_exact(runs, pairs, tmp_path):
    out = run_fsdp(pairs, tmp_path, f"trainer.resume_from={runs[1] / 'checkpoints' / 'step-2'}")
    assert out.returncode == 0, out.stdout[-3000:]
    resumed, full = logged(tmp_path)[0], logged(runs[1])[0]
    assert [s["step"] for s in resumed] == [3, 4]
    assert [s["loss"] for s in resumed] == pytest.approx([s["loss"] for s in full[2:]], abs=1e-6)


def test_fsdp_rejects_auto_w_init(pairs, tmp_path):
    out = run_fsdp(pairs, tmp_path, "beta_head.w_init=auto")
    assert out.returncode != 0 and "beta_head.w_init=auto is not supported under FSDP" in out.stdout


def test_accelerate_fsdp_launch_on_cpu_fails_clearly(pairs, tmp_path):
    """Accelerate itself resolves an FSDP launch on CPU to plain DDP: the run must refuse, not train unsharded."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
           str(REPO / "train.py"), *overrides(pairs, tmp_path, "trainer.batch_size=2")]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode != 0
    assert "the launch asks for FSDP (ACCELERATE_USE_FSDP=true) but Accelerate resolved it to" in out.stdout
    assert not (tmp_path / "metrics.jsonl").exists()
