"""An evaluation's output folder: one evaluation at a time, and its files written as one unit.

``evaluate.py`` writes ``eval.json``, ``eval_pairs.jsonl``, ``samples.jsonl``, ``eval_report.md`` and figures into
its output folder (by default the training run's folder, which holds other files too). Two evaluations into one
folder used to mix their files, and an interrupted one left a partial ``eval.json`` beside the previous run's
samples and figures. Now:

    <out>/.eval.lock           an exclusive flock for the evaluation's lifetime
                               (:func:`lbdpo.train.run_dir.folder_lock`): a second evaluation into the folder stops
                               at once, naming the holder's pid
    <out>/.eval-tmp-<id>/      this evaluation's files while it runs (a folder unique to the process); deleted
                               when it fails or is interrupted, so the previous results stay as they were
    commit                     the previous evaluation's files are moved aside into ``.eval-old-<id>/``, the new
                               ones renamed in (``eval.json`` last: it marks a complete set), the old ones deleted

Every file of a committed set carries nothing of another evaluation: the names of :data:`EVAL_FILES` the new set
lacks (e.g. ``samples.jsonl`` after ``generation.enabled=false``) are removed with the old set. A kill during the
commit (a few renames) is repaired by the next evaluation into the folder (:func:`repair`): without ``eval.json``
the commit did not finish, and the old set is put back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ..train.run_dir import folder_lock

log = logging.getLogger(__name__)
LOCK_FILE = ".eval.lock"
RESULT = "eval.json"  # renamed in last: a folder with it holds one evaluation's complete set
EVAL_FILES = (RESULT, "eval_pairs.jsonl", "samples.jsonl", "eval_report.md", "beta_hist_by_domain.png",
              "beta_vs_log_ppl.png", "training_curves.png")


def repair(out_dir: Path) -> list[str]:
    """Undo what a kill can leave in ``out_dir``: ``.eval-tmp-*`` (an unfinished evaluation) is deleted; an
    ``.eval-old-*`` whose commit finished (``eval.json`` in place) is deleted, one whose commit was cut is put back
    (the new set's files removed first). Returns what it did. Call it holding the folder's lock."""
    done = []
    for old in sorted(out_dir.glob(".eval-old-*")):
        if not (out_dir / RESULT).is_file():
            for name in EVAL_FILES:
                (out_dir / name).unlink(missing_ok=True)
            for path in old.iterdir():
                os.replace(path, out_dir / path.name)
            done.append(f"restored the previous results from {old.name} (an evaluation was killed while writing)")
        shutil.rmtree(old, ignore_errors=True)
    for tmp in sorted(out_dir.glob(".eval-tmp-*")):
        shutil.rmtree(tmp, ignore_errors=True)
        done.append(f"removed {tmp.name} (left by an evaluation that did not finish)")
    return done


@contextlib.contextmanager
def owned_eval_dir(out_dir: Path) -> Iterator[Path]:
    """Hold ``out_dir/.eval.lock`` for the body, repair what a kill left, and yield a new staging folder
    ``out_dir/.eval-tmp-<id>/`` for this evaluation's files; it is deleted when the body ends (committed or not).

    Raises:
        RunStateError: another evaluation holds the folder (one line with its pid).
    """
    with folder_lock(out_dir, LOCK_FILE, "another evaluation ({holder}); give this one its own output_dir=... or "
                                        "wait for that one to finish"):
        for done in repair(out_dir):
            log.warning("%s: %s", out_dir, done)
        staging = Path(tempfile.mkdtemp(prefix=f".eval-tmp-{os.getpid()}-", dir=out_dir))
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def commit(staging: Path, out_dir: Path) -> list[str]:
    """Replace the evaluation files of ``out_dir`` by those of ``staging`` as one set (see the module doc);
    returns the names written. Hold signals back from here on (:meth:`lbdpo.train.signals.RaiseOnSignal.hold`)."""
    new = [name for name in EVAL_FILES if (staging / name).is_file()]
    if RESULT not in new:
        raise FileNotFoundError(f"{staging / RESULT}: an evaluation is committed with its eval.json")
    old = out_dir / f".eval-old-{staging.name.removeprefix('.eval-tmp-')}"
    old.mkdir()
    for name in EVAL_FILES:  # eval.json first: from here on the folder reads as "no complete evaluation"
        if (out_dir / name).is_file():
            os.replace(out_dir / name, old / name)
    for name in sorted(new, key=lambda n: n == RESULT):  # eval.json last: it marks the set complete
        os.replace(staging / name, out_dir / name)
    shutil.rmtree(old, ignore_errors=True)
    return new
