"""A run owns its folder: one run at a time (a lock), repaired after a kill, and never silently appended to.
(:func:`folder_lock` is also how an evaluation owns its output folder: :mod:`lbdpo.eval.output`.)

``outputs/<experiment>/<time>/`` holds a run's ``metrics.jsonl`` and ``checkpoints/``. Two runs writing there
would interleave metrics and mix checkpoints that ``resume_from=auto`` and ``evaluate.py`` then read; a run
started again into a used folder without ``resume_from`` would append a second step 1, 2, … to the first's.
:func:`owned_run_dir` prevents both before any model or data loads.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
from pathlib import Path
from typing import Iterator

from .checkpoint import list_step_checkpoints, newest_intact_checkpoint, repair_checkpoint_dir
from ..errors import LbdpoError, RunStateError

log = logging.getLogger(__name__)
LOCK_FILE = ".lock"


def is_main_process() -> bool:
    """Rank 0 (``torchrun`` / ``accelerate launch`` set ``RANK``; a single process has none)."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def folder_lock(folder: Path, lock_name: str, refusal: str) -> Iterator[None]:
    """Hold ``folder/lock_name`` (an exclusive ``flock``, released when the body ends or the process dies, so a
    killed holder never leaves a stale lock; the file keeps the holder's pid and host) for the body.

    Raises:
        RunStateError: another live process holds it: ``<folder> is in use by <holder> (pid … on …); <refusal>``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / lock_name, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunStateError(f"{folder} is in use by {refusal.format(holder=holder)}") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


@contextlib.contextmanager
def owned_run_dir(run_dir: Path, resume_from: str | None) -> Iterator[None]:
    """Hold ``run_dir/.lock`` (:func:`folder_lock`) for the body; repair ``checkpoints/`` after a kill during a
    save; refuse a used folder unless resuming.

    Raises:
        RuntimeError: another live run holds the folder.
        ValueError: the folder already holds a run and ``trainer.resume_from`` is not set, or it holds a finished
            run and ``resume_from=auto`` (nothing to resume).
    """
    if not is_main_process():
        yield
        return
    with folder_lock(run_dir, LOCK_FILE, "another run ({holder}); give this run its own folder (hydra.run.dir=...) "
                                         "or wait for that one to finish"):
        for done in repair_checkpoint_dir(run_dir / "checkpoints"):
            log.warning("%s: %s", run_dir / "checkpoints", done)
        check_fresh_or_resumable(run_dir, resume_from)
        yield


def check_fresh_or_resumable(run_dir: Path, resume_from: str | None) -> None:
    """A used folder (metrics logged or a checkpoint saved) needs ``resume_from``; ``auto`` with no complete and
    intact step checkpoint starts over from step 0 and clears the earlier attempt's ``metrics.jsonl`` and
    ``pairs.jsonl`` (said in the log)."""
    metrics = run_dir / "metrics.jsonl"
    steps = list_step_checkpoints(run_dir / "checkpoints")
    final = (run_dir / "checkpoints" / "final" / "trainer_state.pt").is_file()
    used = (metrics.is_file() and metrics.stat().st_size > 0) or bool(steps) or final
    if not used or (resume_from and resume_from != "auto"):
        return  # an explicit checkpoint path: resume truncates metrics.jsonl to its step
    if not resume_from:
        raise LbdpoError(f"{run_dir} already holds a run (metrics.jsonl / checkpoints/); continue it with "
                         "trainer.resume_from=auto, or start this one in another folder (hydra.run.dir=...)")
    if final:
        raise LbdpoError(f"{run_dir} holds a finished run (checkpoints/final): nothing to resume; evaluate it "
                         "with `python evaluate.py checkpoint=.../checkpoints/final` or start a new run elsewhere")
    if not steps or newest_intact_checkpoint(run_dir / "checkpoints")[0] is None:
        found = f"only damaged checkpoints ({', '.join(p.name for _, p in steps)})" if steps else \
            "no complete checkpoint"
        log.warning("%s: resume_from=auto found %s; starting from step 0 (clearing the earlier attempt's "
                    "metrics.jsonl and pairs.jsonl)", run_dir, found)
        metrics.unlink(missing_ok=True)
        (run_dir / "pairs.jsonl").unlink(missing_ok=True)
