"""A named, resumable experiment: arms × seeds on one task, trained, evaluated and compared, across sessions.

    python -m lbdpo.experiment run experiments/sentiment.yaml [--stop-after-minutes 150] [--only ARM|ARM__seed-N ...] [--jobs 2]
    python -m lbdpo.experiment status experiments/sentiment.yaml      # what is done, partial, pending; time estimate
    python -m lbdpo.experiment compare experiments/sentiment.yaml     # rebuild compare.md and the figures
    python -m lbdpo.experiment reevaluate experiments/sentiment.yaml --only fixed_b01   # evaluate again, train nothing

The experiment file (YAML) names the runs; each run is ``train.py <common> <arm overrides> seed=S`` in its own
folder ``<out>/<name>/<arm>__seed-<S>/``, then ``evaluate.py`` on its final checkpoint (both of the file's checkout)::

    name: sentiment_v1                       # folder under out (default outputs/experiments, under the checkout)
    common: [data=sentiment, trainer.save_every=20, logger=none]   # every run's overrides
    arms: {fixed_b01: [+arm=fixed_b01], beta_dpo: [+arm=beta_dpo]} # arm name → its overrides
    seeds: [0, 1, 2]
    extra_seeds: {fixed_b01: [3, 4]}         # more seeds for some arms, run after every arm has all of ``seeds``
    evaluate: [max_pairs=1000]               # evaluate.py's overrides (one evaluation), or several by name:
    # evaluate: {heldout: [max_pairs=1000], online: [data=hh_local]}   the first writes into the run folder,
    #                                        each other one into <run>/eval_<name>/ (compare.md: "Other evaluation sets")
    keep: final                              # after evaluation keep the final model only (default) | all
    oracle: [fixed_b01, noisy_b03]           # an arm family whose best, chosen out of sample, meets the best fixed β
    contrasts: [[learn_design, schedule_design]]   # arm pairs A − B compared seed by seed (compare.md)

Run folders hold checkpoints (hundreds of MB each) and stay out of git. Once a run is evaluated, ``keep: final``
deletes its ``step-N`` checkpoints and the optimizer state of ``checkpoints/final`` (for SmolLM2-135M a run folder
goes from 3.1 GB to 0.5 GB): the final model, β head and step stay, enough to evaluate or export it again, not to
train it further. What a result needs — ``metrics.jsonl``, ``pairs.jsonl``, ``eval_pairs.jsonl``,
``eval.json``, ``eval_report.md``, ``samples.jsonl``, ``runner.json`` and ``.hydra/`` — is copied into
``results/<name>/<arm>__seed-<S>/`` (small, meant to be committed) when the run is evaluated. A run whose results
are there counts as done even on a machine without its run folder, and the comparison is built from them.

``run`` goes through the runs in order (seed-major, so every arm gets seed 0 before any gets seed 1) and for each:
skips it when ``eval.json`` is there; evaluates it when only the evaluation is missing; otherwise trains it with
``trainer.resume_from=auto`` (a run interrupted in an earlier session continues from its last ``step-N``, so at
most one ``trainer.save_every`` interval is lost), then evaluates it. Training is a child process; Ctrl-C or SIGTERM
(or ``--stop-after-minutes``) is passed on as SIGINT, which makes it finish its step and save. ``--jobs N`` runs N
runs side by side, each with cores / N threads (on 2 cores, 1.2× the throughput of one two-thread run:
``benchmarks/parallel_runs.py``), and ``runner.json`` records ``jobs``. Each run's wall times go to its
``runner.json``; ``status`` turns them into the time the pending runs need. After every run the comparison
(``compare.md``, figures) and the β dynamics (``dynamics.md``) are rebuilt into ``results/<name>/compare/``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from .errors import LbdpoError
from .experiment_runs import evaluated, read_runner_json, record, state_of, status, update_runner_json
from .paths import project

KEYS = {"name", "common", "arms", "seeds", "extra_seeds", "evaluate", "out", "results", "keep", "oracle", "contrasts"}
ARCHIVED = ("metrics.jsonl", "pairs.jsonl", "eval.json", "eval_pairs.jsonl", "eval_report.md", "samples.jsonl",
            "runner.json", ".hydra/overrides.yaml", ".hydra/config.yaml")


@dataclass
class Experiment:
    name: str
    common: list[str]
    arms: dict[str, list[str]]
    seeds: list[int]
    evaluate: dict[str, list[str]]  # evaluation name → evaluate.py overrides; the first writes into the run folder
    folder: Path  # run folders (checkpoints; not in git)
    results: Path  # archived results (small; committed)
    keep: str = "final"  # what of an evaluated run folder stays: final (model, head, step) | all
    extra_seeds: dict[str, list[int]] | None = None  # arm → seeds beyond ``seeds`` (power for the arms that matter)
    home: Path = Path(".")  # the checkout (lbdpo.paths): its train.py / evaluate.py make the runs, started in it
    oracle: list[str] | None = None  # arms whose out-of-sample best is compared with the best fixed β (eval/oracle.py)
    contrasts: list[list[str]] | None = None  # arm pairs [A, B] compared seed by seed (eval/contrasts.py)

    @classmethod
    def load(cls, path: Path) -> Experiment:
        spec = yaml.safe_load(Path(path).read_text()) or {}
        unknown = set(spec) - KEYS
        if unknown or not spec.get("name") or not spec.get("arms"):
            raise LbdpoError(f"{path}: needs name and arms (optional common, seeds, extra_seeds, evaluate, out, "
                             f"results, keep, oracle, contrasts); unknown keys {sorted(unknown)}")
        if spec.get("keep", "final") not in ("final", "all"):
            raise LbdpoError(f"{path}: keep={spec['keep']!r} must be final or all")
        arms = {str(k): [str(o) for o in (v or [])] for k, v in spec["arms"].items()}
        evaluate = spec.get("evaluate") or []
        if not isinstance(evaluate, (list, dict)) or (isinstance(evaluate, dict) and not all(
                isinstance(v, list) and re.fullmatch(r"[A-Za-z0-9_.-]+", str(k)) for k, v in evaluate.items())):
            raise LbdpoError(f"{path}: evaluate must be a list of evaluate.py overrides or a mapping "
                             "name → list (names of letters, digits, _ . -)")
        evaluate = {"main": evaluate} if isinstance(evaluate, list) else evaluate
        seeds, extra = [int(s) for s in spec.get("seeds") or [0]], spec.get("extra_seeds") or {}
        if not isinstance(extra, dict) or not all(isinstance(v, list) for v in extra.values()):
            raise LbdpoError(f"{path}: extra_seeds must map an arm to a list of seeds, e.g. {{fixed_b01: [3, 4]}}")
        extra = {str(arm): [int(s) for s in v] for arm, v in extra.items()}  # then each must be new, of a known arm
        for arm, more in extra.items():
            if arm not in arms or set(more) & set(seeds) or len(set(more)) != len(more):
                raise LbdpoError(f"{path}: extra_seeds of {arm!r}: {more} must be new seeds (not in {seeds}, each "
                                 f"once) of an arm in arms {sorted(arms)}")
        oracle = [str(a) for a in spec.get("oracle") or []]
        if set(oracle) - set(arms) or len(oracle) == 1:
            raise LbdpoError(f"{path}: oracle {oracle} must list two or more arms of {sorted(arms)}")
        contrasts = spec.get("contrasts") or []
        if not isinstance(contrasts, list) or not all(
                isinstance(c, list) and len(c) == 2 and set(map(str, c)) <= set(arms) and c[0] != c[1] for c in contrasts):
            raise LbdpoError(f"{path}: contrasts {contrasts} must be a list of [A, B] pairs of two different arms of "
                             f"{sorted(arms)}, e.g. [[learn_design, schedule_design]]")
        home = project(Path(path).resolve().parent, needed_for=f"the experiment {path}")  # the file's checkout
        out, results = home / (spec.get("out") or "outputs/experiments"), home / (spec.get("results") or "results")
        return cls(name=str(spec["name"]), common=[str(o) for o in spec.get("common") or []], arms=arms,
                   seeds=seeds, evaluate={str(k): [str(o) for o in v] for k, v in evaluate.items()},
                   folder=out / str(spec["name"]), results=results / str(spec["name"]),
                   keep=str(spec.get("keep", "final")), extra_seeds=extra, home=home, oracle=oracle or None,
                   contrasts=[[str(a), str(b)] for a, b in contrasts] or None)

    def archived(self) -> tuple[str, ...]:
        """The files of a run folder that its results folder keeps: ``ARCHIVED`` and each extra evaluation's."""
        extra = [f"eval_{name}/{f}" for name in list(self.evaluate)[1:]
                 for f in ("eval.json", "eval_pairs.jsonl", "eval_report.md")]
        return (*ARCHIVED, *extra)

    def runs(self, only: list[str] | None = None) -> list[tuple[str, int, Path]]:
        """(arm, seed, run folder), seed-major: every arm's ``seeds``, then the ``extra_seeds`` in seed order;
        ``only`` keeps the runs named by arm (``fixed_b01``) or by run (``fixed_b01__seed-4``)."""
        extra = self.extra_seeds or {}
        grid = [(arm, seed) for seed in self.seeds for arm in self.arms]
        grid += [(arm, seed) for seed in sorted({s for v in extra.values() for s in v}) for arm in self.arms
                 if seed in extra.get(arm, ())]
        return [(arm, seed, self.folder / f"{arm}__seed-{seed}") for arm, seed in grid
                if not only or arm in only or f"{arm}__seed-{seed}" in only]






class Stop:
    """Ctrl-C / SIGTERM / the deadline: pass SIGINT to each running child once, and start nothing new."""

    def __init__(self, deadline: float | None, env: dict[str, str] | None = None, cwd: Path | None = None):
        self.deadline, self.requested, self.env, self.cwd = deadline, False, env, cwd  # cwd: the children's
        self.children: list[subprocess.Popen] = []
        self._lock = threading.Lock()  # a child is either signalled by request() or by run(), never by both
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if not self.requested:
            print(f"[experiment] {signal.Signals(signum).name}: the current runs save a checkpoint and stop",
                  flush=True)
        self.request()

    def request(self) -> None:
        with self._lock:
            if not self.requested:
                for child in self.children:
                    if child.poll() is None:
                        child.send_signal(signal.SIGINT)
            self.requested = True

    def run(self, cmd: list[str], log_path: Path) -> int:
        with open(log_path, "a") as log:
            # its own session: a terminal's Ctrl-C reaches only this runner, which passes on exactly one SIGINT
            # (a second one would make the run abort without saving)
            with self._lock:
                child = subprocess.Popen(cmd, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=self.env)
                self.children.append(child)
                if self.requested:  # asked to stop while this child was being started
                    child.send_signal(signal.SIGINT)
            while child.poll() is None:
                if self.deadline is not None and time.time() > self.deadline:
                    self.request()
                time.sleep(1.0)
            with self._lock:
                self.children.remove(child)
        return child.returncode


def archive_run(run_dir: Path, target: Path, names: tuple[str, ...] = ARCHIVED) -> None:
    """Copy the files a result needs (``names``: :meth:`Experiment.archived`) from a run folder into its results
    folder."""
    for name in names:
        if (run_dir / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(run_dir / name, target / name)


def slim_run_folder(run_dir: Path) -> None:
    """``keep: final``: delete an evaluated run's ``step-N`` checkpoints and the optimizer state of its final
    checkpoint (rewritten atomically without it; the model, β head, step and schedule stay)."""
    import torch

    checkpoints = run_dir / "checkpoints"
    for step_dir in checkpoints.glob("step-*"):
        shutil.rmtree(step_dir)
    state_path = checkpoints / "final" / "trainer_state.pt"
    if state_path.is_file():
        blob = torch.load(state_path, map_location="cpu", weights_only=False)
        if "optimizer" in blob:
            del blob["optimizer"]
            torch.save(blob, state_path.with_name("trainer_state.pt.tmp"))
            os.replace(state_path.with_name("trainer_state.pt.tmp"), state_path)


def evaluate_run(exp: Experiment, run_dir: Path, stop: Stop) -> bool:
    """Run each of the experiment's evaluations not yet recorded in ``runner.json``; True when all are done
    (then ``evaluated`` is recorded). The first writes into the run folder, the others into ``eval_<name>/``."""
    for i, (name, overrides) in enumerate(exp.evaluate.items()):
        if name in read_runner_json(run_dir).get("evaluations", []):
            continue
        start = time.time()
        out = [f"output_dir={run_dir / f'eval_{name}'}"] if i else []
        rc = stop.run([sys.executable, str(exp.home / "evaluate.py"), f"checkpoint={run_dir / 'checkpoints' / 'final'}",
                       *overrides, *out], run_dir / "runner.log")
        record(run_dir, "eval_s", time.time() - start)
        if rc != 0 or stop.requested:
            print(f"[experiment] {run_dir.name}: evaluation {name} stopped (exit {rc}); see runner.log", flush=True)
            return False
        update_runner_json(run_dir, evaluations=[*read_runner_json(run_dir).get("evaluations", []), name])
    update_runner_json(run_dir, evaluated=True)
    return True








def train_and_evaluate(exp: Experiment, arm: str, seed: int, run_dir: Path, stop: Stop, train: bool,
                       lock: threading.Lock, jobs: int) -> None:
    """One run: train it (resuming) unless trained, evaluate it, archive its results, slim its folder, and
    rebuild the comparison (under ``lock``: several runs may finish at once)."""
    state = state_of(run_dir, exp.results / run_dir.name)
    if stop.requested or state == "done" or (not train and state != "trained"):
        if state == "done" and exp.keep == "final" and (run_dir / "checkpoints").is_dir():
            slim_run_folder(run_dir)  # done before slimming existed
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"[experiment] {run_dir.name}: {state}", flush=True)
    if state in ("pending", "partial"):
        start = time.time()
        rc = stop.run([sys.executable, str(exp.home / "train.py"), *exp.common, *exp.arms[arm], f"seed={seed}",
                       "trainer.resume_from=auto", f"hydra.run.dir={run_dir}"], run_dir / "runner.log")
        record(run_dir, "train_s", time.time() - start)
        # jobs: the most runs that shared the machine while it trained (its minutes are wall minutes then)
        update_runner_json(run_dir, jobs=max(jobs, read_runner_json(run_dir).get("jobs", 1)))
        if rc != 0 or stop.requested:
            print(f"[experiment] {run_dir.name}: training stopped (exit {rc}); see {run_dir / 'runner.log'}",
                  flush=True)
            return
    if not evaluate_run(exp, run_dir, stop):
        return
    archive_run(run_dir, exp.results / run_dir.name, exp.archived())
    if exp.keep == "final":
        slim_run_folder(run_dir)
    with lock:
        compare(exp)


def run_experiment(exp: Experiment, only: list[str] | None, stop_after_minutes: float | None,
                   train: bool = True, jobs: int = 1) -> int:
    """Train and evaluate every run that is not done (``train=False``: only evaluate the trained ones), ``jobs``
    runs at a time (each child then gets cores / jobs threads); returns the number of runs left unfinished (that
    this call would have finished)."""
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    env = None if jobs == 1 else {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,  # a cold
                                  "LBDPO_REFERENCE_THREADS": str(os.cpu_count() or 1)}  # cache: one run scores it
    stop = Stop(time.time() + 60 * stop_after_minutes if stop_after_minutes else None, env, cwd=exp.home)
    lock = threading.Lock()
    exp.folder.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=jobs) as pool:  # runs start in order (seed-major); workers take the next
        futures = [pool.submit(train_and_evaluate, exp, *run, stop, train, lock, jobs) for run in exp.runs(only)]
        pending = futures
        while pending:  # the main thread stays free to receive SIGINT / SIGTERM
            done, pending = wait(pending, timeout=1.0, return_when=FIRST_EXCEPTION)
            if any(f.exception() for f in done):
                stop.request()  # a bug in the runner: let the other runs save, then raise it
        for f in futures:
            f.result()
    left = [r for r in exp.runs(only) if state_of(r[2], exp.results / r[2].name) not in ("done", *(
        () if train else ("pending", "partial")))]
    print(f"[experiment] {exp.name}: {len(exp.runs(only)) - len(left)} of {len(exp.runs(only))} runs done", flush=True)
    return len(left)


def mark_for_reevaluation(exp: Experiment, only: list[str] | None) -> int:
    """Done runs whose final checkpoint is still on this machine lose their evaluation record (and archived
    eval.json), so ``run`` evaluates them again, e.g. after evaluate.py learned to record more. Returns how many."""
    marked = 0
    for _, _, run_dir in exp.runs(only):
        if state_of(run_dir, exp.results / run_dir.name) == "done" and \
                (run_dir / "checkpoints" / "final" / "trainer_state.pt").is_file():
            update_runner_json(run_dir, evaluated=False, evaluations=[], eval_s=0.0)
            (exp.results / run_dir.name / "eval.json").unlink(missing_ok=True)
            marked += 1
    return marked


def compare(exp: Experiment) -> None:
    """Archive every evaluated run not (fully) archived yet, then rebuild ``results/<name>/compare/`` from the archive."""
    from .eval.compare import write_comparison
    from .eval.dynamics import write_dynamics

    for _, _, run_dir in exp.runs():
        target = exp.results / run_dir.name
        names = exp.archived()
        if evaluated(run_dir) and not all((target / n).is_file() for n in names if (run_dir / n).is_file()):
            archive_run(run_dir, target, names)  # not archived yet, or archived before a file was added to ARCHIVED

    if exp.results.is_dir() and any(p.is_dir() for p in exp.results.iterdir()):
        table, _ = write_comparison(exp.results, exp.results / "compare", arm_order=list(exp.arms), oracle=exp.oracle,
                                    contrasts=exp.contrasts)
        write_dynamics(exp.results, exp.results / "compare", arm_order=list(exp.arms))
        print(table, flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lbdpo.experiment", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "status", "compare", "reevaluate"])
    parser.add_argument("experiment", type=Path, help="the experiment's YAML file (see above)")
    parser.add_argument("--only", nargs="*", default=None,
                        help="run only these arms (ARM) or runs (ARM__seed-N)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time, each with cores/jobs threads (2 on a 2-core CPU: 1.2x the throughput, "
                             "benchmarks/RESULTS.md)")
    parser.add_argument("--stop-after-minutes", type=float, default=None,
                        help="after this long, let the current run save and stop, and start nothing new")
    args = parser.parse_args(argv)
    if not args.experiment.is_file():
        parser.error(f"{args.experiment}: no such experiment file")
    try:
        exp = Experiment.load(args.experiment)
    except (ValueError, yaml.YAMLError) as err:
        parser.error(str(err))
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: must be 1 or more")
    unknown = set(args.only or []) - set(exp.arms) - {run_dir.name for _, _, run_dir in exp.runs()}
    if unknown:
        parser.error(f"--only {sorted(unknown)}: not arms of {exp.name} ({sorted(exp.arms)}) nor runs of its seeds "
                     f"(ARM__seed-N)")
    if args.command == "reevaluate":
        print(f"[experiment] {mark_for_reevaluation(exp, args.only)} runs to evaluate again", flush=True)
    if args.command in ("run", "reevaluate"):  # reevaluate trains nothing (pending seeds of an arm stay pending)
        sys.exit(1 if run_experiment(exp, args.only, args.stop_after_minutes, train=args.command == "run",
                                    jobs=args.jobs) else 0)
    if args.command == "status":
        print(status(exp))
    else:
        compare(exp)


if __name__ == "__main__":
    main()
