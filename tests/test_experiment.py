"""The experiment runner (``python -m lbdpo.experiment``) on tiny_random: a run interrupted mid-training (SIGINT to
the runner, as at a session's end) continues from its checkpoint on the next ``run``, every step logged once;
each run is evaluated and its results archived; runs with archived results are skipped even when their run
folders are gone; the comparison is rebuilt from the archive; ``status`` reports."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lbdpo.experiment import Experiment, state_of

REPO = Path(__file__).resolve().parents[1]


def write_experiment(tmp: Path) -> Path:
    pairs = tmp / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": f"Yes {i}.", "rejected": "No."}) + "\n"
                             for i in range(48)))
    spec = {
        "name": "tiny", "out": str(tmp / "out"), "results": str(tmp / "results"), "seeds": [0],
        "common": ["model=tiny_random", "trainer=tiny", "logger=none", "data=jsonl", f"data.path={pairs}",
                   "data.max_length=48", "data.max_prompt_length=32", "data.eval_size=8", "data.eval_fraction=null",
                   "trainer.max_steps=12", "trainer.save_every=2", "trainer.eval_every=0"],
        "arms": {"fixed": ["beta_head=fixed"], "beta_dpo": ["beta_head=beta_dpo"]},
        "evaluate": {"main": ["generation.enabled=false", "plots=false"],
                     "second": ["generation.enabled=false", "plots=false", "max_pairs=4"]},
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def runner(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lbdpo.experiment", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def steps_of(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


def test_interrupted_experiment_resumes_skips_and_compares(tmp_path):
    path = write_experiment(tmp_path)
    exp = Experiment.load(path)
    first = exp.runs()[0][2]
    assert [r[2].name for r in exp.runs()] == ["fixed__seed-0", "beta_dpo__seed-0"]
    assert [r[2].name for r in Experiment(**{**exp.__dict__, "seeds": [0, 1]}).runs()] == [
        "fixed__seed-0", "beta_dpo__seed-0", "fixed__seed-1", "beta_dpo__seed-1"]  # seed-major

    proc = runner("run", str(path))
    deadline = time.time() + 300
    while state_of(first) != "partial" and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # as a session ending: the run saves a step checkpoint and stops
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out  # runs left
    assert state_of(first) == "partial" and all(state_of(r[2]) == "pending" for r in exp.runs()[1:])
    interrupted_at = max(steps_of(first))
    assert 1 <= interrupted_at < 12

    done = runner("run", str(path))
    out, _ = done.communicate(timeout=900)
    assert done.returncode == 0, out
    assert all(state_of(r[2]) == "done" for r in exp.runs())
    assert steps_of(first) == list(range(1, 13))  # resumed, every step once
    assert "2 of 2 runs done" in out
    for name in ("metrics.jsonl", "pairs.jsonl", "eval.json", "runner.json", ".hydra/overrides.yaml"):  # committed
        assert all((exp.results / r[2].name / name).is_file() for r in exp.runs())
    # keep: final (the default): step checkpoints and the optimizer state are gone, the final model and step stay
    import torch

    for _, _, run_dir in exp.runs():
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["final"]
        blob = torch.load(run_dir / "checkpoints" / "final" / "trainer_state.pt", weights_only=False)
        assert "optimizer" not in blob and blob["state"]["step"] == 12
        assert (run_dir / "checkpoints" / "final" / "model.safetensors").is_file()
    for _, _, run_dir in exp.runs():  # the second evaluation set: its own folder, archived, in the comparison
        assert json.loads((run_dir / "runner.json").read_text())["evaluations"] == ["main", "second"]
        second = json.loads((exp.results / run_dir.name / "eval_second" / "eval.json").read_text())
        assert second["preference"]["num_pairs"] == 4
    table = (exp.results / "compare" / "compare.md").read_text()
    assert table.split("## ")[0].count("| 1 |") == 2  # two arms (seeds are grouped as in tests/test_sweep.py)
    assert "## Other evaluation sets" in table and "second acc" in table

    # reevaluate: the chosen arm's done runs are evaluated again (all sets), nothing is trained, not even the
    # arm's seeds that are still pending
    (exp.results / first.name / "eval.json").write_text("{}")  # stale: must be replaced
    spec = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**spec, "seeds": [0, 1]}, sort_keys=False))
    again = runner("reevaluate", str(path), "--only", "fixed")
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0 and "1 runs to evaluate again" in out and "pending" not in out, out
    assert state_of(exp.folder / "fixed__seed-1") == "pending" and not (exp.folder / "fixed__seed-1").exists()
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert json.loads((exp.results / first.name / "eval.json").read_text())["preference"]["num_pairs"] == 8
    assert json.loads((first / "runner.json").read_text())["evaluations"] == ["main", "second"]
    assert steps_of(first) == list(range(1, 13))

    import shutil

    shutil.rmtree(exp.folder)  # a fresh machine: only the archived results are left
    again = runner("run", str(path))
    out, _ = again.communicate(timeout=120)
    assert again.returncode == 0 and "training" not in out and "2 of 2 runs done" in out  # nothing re-run

    status = runner("status", str(path))
    out, _ = status.communicate(timeout=60)
    assert "2 done, 0 left" in out and out.count("| done |") == 2
    assert "| jobs | pairs/s (median) |" in out and all(  # the archived metrics.jsonl gives each run's throughput
        re.search(r"\| done \| [\d.]+ \| [\d.]+ \| 1 \| [\d.]+ \|", line) for line in out.splitlines() if "| done |" in line)


def test_a_slimmed_checkpoint_cannot_be_resumed_and_says_why(tmp_path):
    import torch

    from lbdpo.experiment import slim_run_folder
    from lbdpo.train.checkpoint import load_trainer_state

    final, step = tmp_path / "checkpoints" / "final", tmp_path / "checkpoints" / "step-4"
    for folder in (final, step):
        folder.mkdir(parents=True)
        torch.save({"state": {"step": 4}, "optimizer": {"state": {}}, "scheduler": {}, "rng": {}},
                   folder / "trainer_state.pt")
    slim_run_folder(tmp_path)
    assert not step.exists() and set(torch.load(final / "trainer_state.pt", weights_only=False)) == {
        "state", "scheduler", "rng"}
    with pytest.raises(ValueError, match="optimizer state was removed"):
        load_trainer_state(final, policy=None, beta_head=None, optimizer=None, scheduler=None)


def test_an_interrupted_evaluation_continues_with_the_sets_not_done(tmp_path, monkeypatch):
    import lbdpo.experiment as experiment

    exp = Experiment.load(write_experiment(tmp_path))
    run_dir = exp.runs()[0][2]
    run_dir.mkdir(parents=True)
    (run_dir / "runner.json").write_text(json.dumps({"train_s": 1.0, "evaluations": ["main"]}))
    commands = []
    monkeypatch.setattr(experiment.Stop, "run", lambda self, cmd, log: commands.append(cmd) or 0)
    monkeypatch.setattr(experiment.signal, "signal", lambda *args: None)  # keep pytest's own SIGINT handler
    assert experiment.evaluate_run(exp, run_dir, experiment.Stop(None))
    assert len(commands) == 1 and "max_pairs=4" in commands[0]  # only the second set ran, into its own folder
    assert f"output_dir={run_dir / 'eval_second'}" in commands[0]
    assert experiment.evaluated(run_dir)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "arms": {"a": []}, "evaluate": {"a b": []}}))
    with pytest.raises(ValueError, match="evaluate must be"):
        Experiment.load(bad)


def test_a_run_done_before_slimming_existed_is_slimmed(tmp_path, monkeypatch):
    """A run done by its archived results (no `evaluated` record, as before the runner wrote one) keeps only its
    final model once `run` passes over it; nothing is trained or evaluated."""
    import torch

    import lbdpo.experiment as experiment

    exp = Experiment.load(write_experiment(tmp_path))
    for _, _, run_dir in exp.runs():
        for name in ("step-10", "final"):
            (run_dir / "checkpoints" / name).mkdir(parents=True)
            torch.save({"state": {"step": 12}, "optimizer": {"state": {}}, "scheduler": {}, "rng": {}},
                       run_dir / "checkpoints" / name / "trainer_state.pt")
        (exp.results / run_dir.name).mkdir(parents=True)
        (exp.results / run_dir.name / "eval.json").write_text("{}")
    monkeypatch.setattr(experiment.signal, "signal", lambda *args: None)
    monkeypatch.setattr(experiment.Stop, "run", lambda *args: pytest.fail("nothing should run"))
    assert experiment.run_experiment(exp, None, None) == 0
    for _, _, run_dir in exp.runs():
        assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["final"]
        assert "optimizer" not in torch.load(run_dir / "checkpoints" / "final" / "trainer_state.pt", weights_only=False)


def test_jobs_run_side_by_side_in_order_with_their_share_of_the_cores(tmp_path, monkeypatch):
    """``--jobs 2``: two runs at a time, started in the seed-major order, each child with cores / 2 threads; every
    run trained and evaluated once; runner.json records jobs (``status`` divides the run's minutes by it)."""
    import threading

    import lbdpo.experiment as experiment

    exp = Experiment(**{**Experiment.load(write_experiment(tmp_path)).__dict__, "seeds": [0, 1]})
    lock, live, most, started, threads = threading.Lock(), [0], [0], [], set()

    def fake_run(self, cmd, log):
        run_dir = Path(next(a for a in cmd if a.startswith(("hydra.run.dir=", "checkpoint="))).split("=", 1)[1])
        run_dir = run_dir if "train.py" in cmd[1] else run_dir.parents[1]
        with lock:
            live[0] += 1
            most[0] = max(most[0], live[0])
            started.append((run_dir.name, Path(cmd[1]).name))
            threads.add(self.env["OMP_NUM_THREADS"])
        waited = time.time()
        while most[0] < 2 and time.time() - waited < 10:  # give the other worker time to start (a loaded machine)
            time.sleep(0.01)
        time.sleep(0.05)
        if "train.py" in cmd[1]:
            (run_dir / "checkpoints" / "final").mkdir(parents=True)
            (run_dir / "checkpoints" / "final" / "trainer_state.pt").write_bytes(b"")
        with lock:
            live[0] -= 1
        return 0

    monkeypatch.setattr(experiment.Stop, "run", fake_run)
    monkeypatch.setattr(experiment.signal, "signal", lambda *args: None)
    monkeypatch.setattr(experiment, "slim_run_folder", lambda run_dir: None)
    monkeypatch.setattr(experiment, "compare", lambda exp: None)
    monkeypatch.setattr(experiment.os, "cpu_count", lambda: 4)
    assert experiment.run_experiment(exp, None, None, jobs=2) == 0
    assert most[0] == 2 and threads == {"2"}
    trained = [name for name, script in started if script == "train.py"]
    assert set(trained[:2]) == {"fixed__seed-0", "beta_dpo__seed-0"} and sorted(trained) == sorted(  # 2 at once
        r[2].name for r in exp.runs())
    for _, _, run_dir in exp.runs():
        record = json.loads((run_dir / "runner.json").read_text())
        assert record["jobs"] == 2 and record["evaluated"] and record["evaluations"] == ["main", "second"]
    assert sum(script == "evaluate.py" for _, script in started) == 4 * 2  # 4 runs × 2 evaluation sets


def test_a_stop_reaches_every_running_child(tmp_path, monkeypatch):
    """Two children at once (``--jobs 2``): one stop request sends SIGINT to both, and both end. The children set
    their own SIGINT handler, as train.py does (a shell's background job inherits SIGINT ignored)."""
    import threading

    import lbdpo.experiment as experiment

    monkeypatch.setattr(experiment.signal, "signal", lambda *args: None)
    stop, codes = experiment.Stop(None), []
    sleeper = [sys.executable, "-c", "import signal, sys, time\n"
               "signal.signal(signal.SIGINT, lambda *a: sys.exit(3))\nprint('ready', flush=True)\ntime.sleep(60)"]
    logs = [tmp_path / f"{i}.log" for i in range(2)]
    workers = [threading.Thread(target=lambda log=log: codes.append(stop.run(sleeper, log))) for log in logs]
    for w in workers:
        w.start()
    deadline = time.time() + 60
    while not all(log.is_file() and "ready" in log.read_text() for log in logs) and time.time() < deadline:
        time.sleep(0.05)
    assert len(stop.children) == 2
    started = time.time()
    stop.request()
    for w in workers:
        w.join(timeout=30)
    assert codes == [3, 3] and time.time() - started < 10  # both stopped by the one request, not by their sleep
    assert stop.children == []


def test_median_pairs_per_s_skips_the_first_steps(tmp_path):
    from lbdpo.experiment_runs import median_pairs_per_s

    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": i, "pairs_per_s": 100.0 if i <= 5 else float(i)} for i in range(1, 10)] + [{"step": 9, "eval": 1}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert median_pairs_per_s(metrics) == 8.0  # steps 6–9 → 6, 7, 8, 9: the upper median
    assert median_pairs_per_s(tmp_path / "missing.jsonl") is None


def test_extra_seeds_run_after_the_grid_for_their_arms_only(tmp_path):
    path = write_experiment(tmp_path)
    spec = yaml.safe_load(path.read_text())
    spec["arms"]["third"] = ["beta_head=linear"]
    path.write_text(yaml.safe_dump({**spec, "seeds": [0, 1], "extra_seeds": {"third": [3, 2], "fixed": [2]}}, sort_keys=False))
    exp = Experiment.load(path)
    assert [r[2].name for r in exp.runs()] == [
        "fixed__seed-0", "beta_dpo__seed-0", "third__seed-0", "fixed__seed-1", "beta_dpo__seed-1", "third__seed-1",
        "fixed__seed-2", "third__seed-2", "third__seed-3"]  # the grid, then the extra seeds seed-major
    assert [r[2].name for r in exp.runs(["third"])] == ["third__seed-0", "third__seed-1", "third__seed-2",
                                                        "third__seed-3"]
    assert [r[2].name for r in exp.runs(["third__seed-3", "fixed__seed-2", "fixed__seed-1"])] == [
        "fixed__seed-1", "fixed__seed-2", "third__seed-3"]  # runs named one by one keep the runner's order
    for extra, message in (({"nope": [3]}, "of 'nope'.* an arm in arms"), ({"fixed": [1]}, "must be new seeds"),
                           ({"fixed": 3}, "must map an arm to a list")):
        path.write_text(yaml.safe_dump({**spec, "seeds": [0, 1], "extra_seeds": extra}, sort_keys=False))
        with pytest.raises(ValueError, match=message):
            Experiment.load(path)


def test_only_names_arms_or_runs_and_refuses_anything_else(tmp_path):
    path = write_experiment(tmp_path)
    bad = subprocess.run([sys.executable, "-m", "lbdpo.experiment", "status", str(path), "--only", "fixed__seed-9"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "not arms of" in bad.stderr and "fixed__seed-9" in bad.stderr
    good = subprocess.run([sys.executable, "-m", "lbdpo.experiment", "status", str(path), "--only", "fixed__seed-0"],
                          capture_output=True, text=True)
    assert good.returncode == 0, good.stderr


def test_status_estimates_each_pending_run_at_its_arms_median(tmp_path):
    from lbdpo.experiment_runs import status

    path = write_experiment(tmp_path)
    spec = yaml.safe_load(path.read_text())
    spec["arms"]["third"] = ["beta_head=linear"]
    path.write_text(yaml.safe_dump({**spec, "seeds": [0, 1, 2]}, sort_keys=False))
    exp = Experiment.load(path)
    minutes = {"fixed__seed-0": (10, 1), "fixed__seed-1": (60, 2), "beta_dpo__seed-0": (60, 1)}  # (wall, jobs)
    for name, (wall, jobs) in minutes.items():  # archived: eval.json and runner.json (minutes of the machine =
        run = exp.results / name                   # wall / jobs: 10, 30, 60)
        run.mkdir(parents=True)
        (run / "eval.json").write_text("{}")
        (run / "runner.json").write_text(json.dumps({"train_s": wall * 60 - 60, "eval_s": 60, "jobs": jobs}))
    out = status(exp)
    # pending: fixed seed 2 at fixed's upper median (30), beta_dpo seeds 1, 2 at 60 each, third × 3 at the overall
    # upper median of 10, 30, 60 (30): 30 + 120 + 90
    assert "3 done, 6 left; median 30.0 min" in out and "about 240 min to go (third: no finished run yet" in out
