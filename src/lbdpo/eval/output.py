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
the commit did not finish, and the old set is put back. A commit that fails on a rename (an OS error) puts the old
set back itself.

A write that fails — disk full, no permission, a read-only file system — ends in one
:class:`~lbdpo.errors.SaveError` line naming the folder, the free space and what to do (:func:`write_failure`): the
staging folder is removed first, and the previous complete set stays as it was. An optional section (generation,
plots) that hits a full disk stops the evaluation rather than recording a skip (:func:`disk_full`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from ..errors import LbdpoError, SaveError
from ..train.checkpoint import NO_SPACE, folder_bytes, human
from ..train.run_dir import folder_lock

log = logging.getLogger(__name__)
LOCK_FILE = ".eval.lock"
RESULT = "eval.json"  # renamed in last: a folder with it holds one evaluation's complete set
EVAL_FILES = (RESULT, "eval_pairs.jsonl", "samples.jsonl", "eval_report.md", "beta_hist_by_domain.png",
              "beta_vs_log_ppl.png", "training_curves.png")


class Results:
    """eval.json (in the staging folder), rewritten atomically after every section."""

    def __init__(self, path: Path, initial: dict[str, Any]):
        self.path = path
        self.data = initial
        self.data.setdefault("skipped", {})
        self.save()

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.save()

    def skip(self, section: str, reason: str) -> None:
        log.warning("skipping %s: %s", section, reason)
        self.data["skipped"][section] = reason
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=float))
        tmp.replace(self.path)


def write_eval_pairs(per_pair: dict[str, list], path: Path) -> None:
    """``eval_pairs.jsonl``: one line per held-out pair (dataset order): its identity ``key``
    (:func:`lbdpo.eval.pair_sample.pair_key`; each seed shuffles the held-out pairs, so runs are aligned by it), domain,
    β, log PPL, f, margin Δ, and ``correct`` (Δ > 0, the preference accuracy at any β > 0): what paired tests between
    runs and the β analysis read. ``per_pair``: lists of one length N (``key`` optional)."""
    with open(path, "w") as f:
        for i, domain in enumerate(per_pair["domain"]):
            row = {**({"key": per_pair["key"][i]} if "key" in per_pair else {}), "domain": domain,
                   **{k: round(per_pair[k][i], 6) for k in ("beta", "log_ppl", "f", "margin")}}
            f.write(json.dumps({**row, "correct": per_pair["margin"][i] > 0}) + "\n")


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
        SaveError: writing into ``out_dir`` failed (disk full, no permission: :func:`write_failure`), in the body or
            here; raised once the staging folder is removed, the previous complete set untouched.
    """
    written = 0
    try:
        with folder_lock(out_dir, LOCK_FILE, "another evaluation ({holder}); give this one its own output_dir=... or "
                                            "wait for that one to finish"):
            for done in repair(out_dir):
                log.warning("%s: %s", out_dir, done)
            staging = Path(tempfile.mkdtemp(prefix=f".eval-tmp-{os.getpid()}-", dir=out_dir))
            try:
                yield staging
            finally:
                written = folder_bytes(staging)
                shutil.rmtree(staging, ignore_errors=True)  # before measuring the free space: the partial set freed
    except Exception as err:
        failure = write_failure(err, out_dir, written)
        if failure is None:
            raise
        raise failure from err


def commit(staging: Path, out_dir: Path) -> list[str]:
    """Replace the evaluation files of ``out_dir`` by those of ``staging`` as one set (see the module doc);
    returns the names written. Hold signals back from here on (:meth:`lbdpo.train.signals.RaiseOnSignal.hold`).
    A rename that fails puts the files moved so far back where they were (old set in ``out_dir``, new in
    ``staging``) and re-raises."""
    new = [name for name in EVAL_FILES if (staging / name).is_file()]
    if RESULT not in new:
        raise FileNotFoundError(f"{staging / RESULT}: an evaluation is committed with its eval.json")
    old = out_dir / f".eval-old-{staging.name.removeprefix('.eval-tmp-')}"
    old.mkdir()
    aside, placed = [], []
    try:
        for name in EVAL_FILES:  # eval.json first: from here on the folder reads as "no complete evaluation"
            if (out_dir / name).is_file():
                os.replace(out_dir / name, old / name)
                aside.append(name)
        for name in sorted(new, key=lambda n: n == RESULT):  # eval.json last: it marks the set complete
            os.replace(staging / name, out_dir / name)
            placed.append(name)
    except BaseException:  # eval.json is not in place (it comes last): the old set goes back as it was
        for name in placed:
            os.replace(out_dir / name, staging / name)
        for name in aside:
            os.replace(old / name, out_dir / name)
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)
    return new


def disk_full(err: BaseException) -> bool:
    """Whether ``err`` says the disk (or the quota) is full: ``ENOSPC`` / ``EDQUOT``, or a "No space left" message
    (a library that drops the errno)."""
    return (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)) or \
        any(m in str(err) for m in NO_SPACE)


def write_failure(err: BaseException, out_dir: Path, written: int = 0) -> SaveError | None:
    """The one-line :class:`SaveError` for a write of an evaluation that failed, or None when ``err`` is not one
    (an :class:`LbdpoError`; an ``OSError`` that is no full disk and names no file under ``out_dir``: its traceback
    stays). ``written``: the bytes this evaluation had staged when it failed."""
    out_dir = Path(out_dir)
    named = [Path(f) for f in (getattr(err, "filename", None), getattr(err, "filename2", None)) if f]
    inside = any(f.resolve().is_relative_to(out_dir.resolve()) for f in named)
    if isinstance(err, LbdpoError) or not (disk_full(err) or (isinstance(err, OSError) and inside)):
        return None
    target = out_dir if inside or not named else named[0]  # a full disk elsewhere (the reference store): name it
    where = next((p for p in (target, *target.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(where).free
    needed = max(written, sum((out_dir / n).stat().st_size for n in EVAL_FILES if (out_dir / n).is_file()))
    kept = f"{out_dir} keeps the previous complete results" + \
        ("" if (out_dir / RESULT).is_file() else " (none: it holds no eval.json)")
    what = f"the evaluation results into {out_dir}" if target == out_dir else str(target)
    size = f"; an evaluation's files take about {human(needed)}" if needed else ""
    if disk_full(err):
        return SaveError(f"could not write {what}: no space left on the device ({human(free)} free on {where}{size}); "
                         f"free some space or give output_dir= a folder on a larger disk, then evaluate again; {kept}")
    reason = f"{err.strerror}: {err.filename}" if getattr(err, "strerror", None) else f"{type(err).__name__}: {err}"
    return SaveError(f"could not write {what} ({reason}); check that {where} is writable ({human(free)} free{size}) "
                     f"or give output_dir= another folder, then evaluate again; {kept}")
