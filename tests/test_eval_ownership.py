"""Issue 41: an evaluation owns its output folder and writes its files as one set; a signal stops evaluation and the
non-loop phases of training in one line (real processes, real signals, tiny_random).

Each signal lands at a known point: the command runs under a small wrapper that slows one call (the first
generation, the reference precompute, the final evaluation) and touches a file when it is reached; the test sends
the signal then.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conftest import REPO_ROOT, fresh_cache, write_item_pairs
from lbdpo.errors import RunStateError
from lbdpo.eval.evaluate import evaluate_checkpoint
from lbdpo.eval.output import EVAL_FILES, commit, owned_eval_dir
from lbdpo.train.trainer import train

SLOW = '''import importlib, pathlib, runpy, sys, time
target, flag, script, *args = sys.argv[1:]
module_name, name = target.split(":")
module = importlib.import_module(module_name)
real = getattr(module, name)
def slow(*a, **k):
    pathlib.Path(flag).touch()
    time.sleep(120)
    return real(*a, **k)
setattr(module, name, slow)
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
'''
GEN = ("generation.num_prompts=6", "generation.max_new_tokens=8", "generation.batch_size=4")
TRAIN = ("model=tiny_random", "trainer=tiny", "logger=none", "data=jsonl", "data.max_length=48",
         "data.max_prompt_length=32", "data.eval_size=8", "data.eval_fraction=null", "trainer.max_steps=4",
         "trainer.save_every=2", "trainer.keep_last=0", "trainer.eval_every=0")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_item_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl")


@pytest.fixture(scope="module")
def ckpt(data, tmp_path_factory):
    """A finished 4-step run's final checkpoint (trained in this process)."""
    run_dir = tmp_path_factory.mktemp("run")
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*TRAIN, f"data.path={data}"])
    train(cfg, run_dir)
    return run_dir / "checkpoints" / "final"


def eval_cfg(checkpoint: Path, out_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        return compose("evaluate", overrides=[f"checkpoint={checkpoint}", f"output_dir={out_dir}", *GEN, *overrides])


def slowed(tmp_path: Path, target: str, script: str, *args: str, env: dict | None = None):
    """Start ``script args`` with ``target`` (module:function) slowed; returns (process, the flag file its call
    touches)."""
    wrapper, flag = tmp_path / "slow.py", tmp_path / f"reached-{target.replace(':', '-')}"
    wrapper.write_text(SLOW)
    proc = subprocess.Popen([sys.executable, str(wrapper), target, str(flag), str(REPO_ROOT / script), *args],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    return proc, flag


def wait_for(flag: Path, proc: subprocess.Popen) -> None:
    deadline = time.time() + 120
    while not flag.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the slowed call was never reached"
        time.sleep(0.05)


def checksums(folder: Path) -> dict[str, str]:
    """The checksum of each file of the folder (the lock file, whose content is its holder, left out)."""
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()
            if p.is_file() and p.name != ".eval.lock"}


def lines(text: str) -> list[str]:
    """The output's lines, tqdm's carriage-return frames split off."""
    return [line for line in text.replace("\r", "\n").splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------- evaluation


def test_a_second_evaluation_into_the_folder_stops_at_once_naming_the_first(ckpt, tmp_path):
    out = tmp_path / "eval"
    first, flag = slowed(tmp_path, "lbdpo.eval.evaluate:generate", "evaluate.py", f"checkpoint={ckpt}",
                         f"output_dir={out}", f"hydra.run.dir={tmp_path / 'logs1'}", *GEN)
    try:
        wait_for(flag, first)  # the first holds the folder and is generating
        start = time.time()
        second = subprocess.run([sys.executable, str(REPO_ROOT / "evaluate.py"), f"checkpoint={ckpt}",
                                 f"output_dir={out}", "generation.enabled=false", f"hydra.run.dir={tmp_path / 'l2'}"],
                                cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
        assert lines(second.stderr)[-1] == (f"error: {out} is in use by another evaluation (pid {first.pid} on "
                                            f"{os.uname().nodename}); give this one its own output_dir=... or wait "
                                            "for that one to finish")
        assert time.time() - start < 60  # refused before loading anything heavy
        assert not [p for p in out.iterdir() if p.name in EVAL_FILES]  # the first's files are still staged
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)
    assert not list(out.glob(".eval-*"))  # the interrupted first left no staging folder


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_re_evaluation_keeps_the_previous_complete_results(ckpt, tmp_path, sig):
    out = tmp_path / "eval"
    evaluate_checkpoint(eval_cfg(ckpt, out))  # a complete evaluation: preference, generation, report, figures
    before = checksums(out)
    assert {"eval.json", "samples.jsonl", "eval_report.md", "beta_hist_by_domain.png"} <= set(before)
    proc, flag = slowed(tmp_path, "lbdpo.eval.evaluate:generate", "evaluate.py", f"checkpoint={ckpt}",
                        f"output_dir={out}", f"hydra.run.dir={tmp_path / 'logs'}", "seed=7", *GEN)
    wait_for(flag, proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    name = signal.Signals(sig).name
    assert proc.returncode == 128 + sig and "Traceback" not in stdout + stderr, stderr[-2000:]
    assert lines(stderr)[-1] == f"{name}: evaluation stopped; {out} keeps the previous complete results"
    assert checksums(out) == before  # eval.json, samples, report, figures: all the earlier run's, unchanged
    assert not list(out.glob(".eval-*"))


def test_each_evaluation_replaces_the_whole_set_and_records_its_seed(ckpt, tmp_path):
    out = tmp_path / "eval"
    first = evaluate_checkpoint(eval_cfg(ckpt, out, "seed=3"))
    assert first["eval_seed"] == 3 and json.loads((out / "eval.json").read_text())["eval_seed"] == 3
    assert (out / "samples.jsonl").is_file() and first["figures"]
    assert all(Path(p).parent == out and Path(p).is_file() for p in first["figures"].values())
    second = evaluate_checkpoint(eval_cfg(ckpt, out, "generation.enabled=false", "plots=false"))
    assert second["eval_id"] != first["eval_id"]
    present = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert present == ["eval.json", "eval_pairs.jsonl", "eval_report.md"]  # no samples or figures of the first
    assert json.loads((out / "eval.json").read_text())["eval_id"] == second["eval_id"]


def test_a_kill_during_the_commit_is_repaired_to_the_previous_set(tmp_path):
    """Killed after the old set was moved aside and part of the new one renamed in (no eval.json yet): the next
    evaluation into the folder puts the old set back; killed after eval.json landed: the new set stays."""
    out = tmp_path / "eval"
    out.mkdir()
    for name in ("eval.json", "samples.jsonl", "eval_report.md"):
        (out / name).write_text(f"old {name}")
    (out / "runner.json").write_text("not an evaluation file")
    with owned_eval_dir(out) as staging:
        for name in ("eval.json", "eval_pairs.jsonl", "eval_report.md"):
            (staging / name).write_text(f"new {name}")
        aside = out / f".eval-old-{staging.name.removeprefix('.eval-tmp-')}"
        aside.mkdir()
        for name in ("eval.json", "samples.jsonl", "eval_report.md"):  # what commit does first ...
            os.replace(out / name, aside / name)
        os.replace(staging / "eval_pairs.jsonl", out / "eval_pairs.jsonl")  # ... then cut by a kill
    with owned_eval_dir(out) as staging:  # the next evaluation repairs the folder before anything else
        assert {p.name: p.read_text() for p in out.iterdir() if p.is_file() and not p.name.startswith(".")} == {
            "eval.json": "old eval.json", "samples.jsonl": "old samples.jsonl", "eval_report.md": "old eval_report.md",
            "runner.json": "not an evaluation file"}
        (staging / "eval.json").write_text("newer")
        assert commit(staging, out) == ["eval.json"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["eval.json", "runner.json"]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".eval.lock"]
    with pytest.raises(RunStateError, match=r"is in use by another evaluation \(pid"):
        with owned_eval_dir(out):
            with owned_eval_dir(out):  # a second holder, even in the same process (flock per open file)
                pass


def test_a_signal_while_results_are_put_in_place_waits_for_them():
    """Before hold(): a real SIGINT raises Interrupted at once. After: it is kept and the body completes."""
    from lbdpo.errors import Interrupted
    from lbdpo.train.signals import RaiseOnSignal

    done, before = [], (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    with pytest.raises(Interrupted) as err:
        with RaiseOnSignal():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("unreached")
    assert err.value.exit_code == 130 and str(err.value) == "SIGINT" and not done
    with RaiseOnSignal() as signals:
        signals.hold()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        done.append("rest of the body")
    assert done == ["rest of the body"] and signals.pending == signal.SIGTERM
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # restored


# ---------------------------------------------------------------------------------------------- training


def test_a_signal_in_the_reference_precompute_is_one_line(data, tmp_path):
    run_dir = tmp_path / "run"
    proc, flag = slowed(tmp_path, "lbdpo.train.reference:compute_reference_logps", "train.py", *TRAIN,
                        f"data.path={data}", "trainer.reference=precompute", f"hydra.run.dir={run_dir}",
                        env={"LBDPO_CACHE": fresh_cache(tmp_path / "cache")})  # no reference log-probs stored
    wait_for(flag, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stdout + stderr, stderr[-2000:]
    assert lines(stderr)[-1] == (f"SIGINT: training stopped during set-up; no checkpoint was saved yet: start it "
                                 f"again (in this folder: resume with trainer.resume_from=auto hydra.run.dir="
                                 f"{run_dir}, which starts from step 0)")


def test_a_signal_in_the_final_evaluation_is_one_line_and_resume_finishes(data, tmp_path):
    run_dir = tmp_path / "run"
    proc, flag = slowed(tmp_path, "lbdpo.train.trainer:evaluate_pairs", "train.py", *TRAIN, f"data.path={data}",
                        f"hydra.run.dir={run_dir}")
    wait_for(flag, proc)  # all 4 steps done, step-2 saved; the final evaluation started
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in stdout + stderr, stderr[-2000:]
    assert lines(stderr)[-1] == (f"SIGTERM: training stopped during the final evaluation and save at step 4; "
                                 f"{run_dir / 'checkpoints' / 'step-2'} is the newest checkpoint: resume with "
                                 f"trainer.resume_from=auto hydra.run.dir={run_dir}")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-2"]
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*TRAIN, f"data.path={data}", "trainer.resume_from=auto"])
    train(cfg, run_dir)  # what the line says to do: steps 3, 4 again, then the final evaluation and checkpoint
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open() if '"loss"' in line]
    assert steps == [1, 2, 3, 4] and (run_dir / "checkpoints" / "final" / "trainer_state.pt").is_file()
