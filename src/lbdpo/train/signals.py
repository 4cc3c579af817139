"""What Ctrl-C (SIGINT) and SIGTERM (e.g. SLURM pre-emption) do to training and evaluation.

Two behaviours, each a context manager that sets the handlers of both signals for its body (from the main thread;
elsewhere it does nothing) and restores the previous ones after:

    StopOnSignal    the training loop: finish the current step, save ``checkpoints/step-N``, then stop; a second
                    signal aborts at once (the last checkpoint stays valid: saves are atomic)
    RaiseOnSignal   everything else (set-up and the reference precompute, the final evaluation, ``evaluate.py``):
                    stop at once by raising :class:`lbdpo.errors.Interrupted`, which the caller turns into one line
                    saying what was kept; after :meth:`RaiseOnSignal.hold` a signal is held back to the end
                    of the body (results being put in place)

Both set the handlers even where the signal was ignored at start (a shell's background job inherits SIGINT
ignored), so a run started that way can still be stopped by it.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import torch
from accelerate import Accelerator

from ..errors import Interrupted

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Handlers:
    """Install ``self._handle`` for :data:`SIGNALS` on enter (main thread only), restore the previous on exit."""

    def __init__(self):
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


class StopOnSignal(_Handlers):
    """Ctrl-C (SIGINT) or SIGTERM (e.g. SLURM pre-emption) asks the loop to stop at the next step boundary:
    the current step finishes (update, log, eval, save), ``checkpoints/step-N`` is written, then the run exits.
    A second signal aborts at once without saving (:class:`Interrupted`; the last checkpoint stays valid: saves are
    atomic). So a checkpoint always holds a whole step, never a half-updated model, and resuming from it is exact.
    ``signum``: the first signal received (None before one).
    """

    SIGNALS = SIGNALS

    def __init__(self):
        super().__init__()
        self.requested, self.signum = False, None

    def _handle(self, signum, frame) -> None:
        if self.requested:  # second signal: abort without saving
            raise Interrupted(signum, f"{signal.Signals(signum).name}: aborted without saving")
        self.requested, self.signum = True, signum
        log.warning("%s: finishing this step, then saving a checkpoint and stopping (again to abort without saving)",
                    signal.Signals(signum).name)

    def agreed(self, accelerator: Accelerator) -> bool:
        """Whether any process was asked to stop (all processes then stop at the same step)."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor(float(self.requested), device=accelerator.device)
        return accelerator.reduce(flag, reduction="sum").item() > 0


class RaiseOnSignal(_Handlers):
    """SIGINT / SIGTERM raise :class:`Interrupted` (message: the signal's name) wherever the body is; after
    :meth:`hold` a signal is only recorded (``pending``) and the body runs to its end."""

    def __init__(self):
        super().__init__()
        self.holding, self.pending = False, None

    def _handle(self, signum, frame) -> None:
        if self.holding:
            self.pending = signum
            log.warning("%s: received while the results are put in place; they are written whole first",
                        signal.Signals(signum).name)
            return
        raise Interrupted(signum, signal.Signals(signum).name)

    def hold(self) -> None:
        """From here to the end of the ``with`` body, hold SIGINT / SIGTERM back (results being put in place: never
        cut halfway, and never reported as stopped once they are); one that arrives is kept in ``pending``."""
        self.holding = True

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self.holding = False


def signal_name(err: BaseException) -> str:
    """``SIGINT`` / ``SIGTERM`` for an :class:`Interrupted`, ``SIGINT`` for a plain ``KeyboardInterrupt``."""
    return signal.Signals(err.signum).name if isinstance(err, Interrupted) else "SIGINT"


def training_stopped(err: BaseException, run_dir: Path, phase: str, step: int | None) -> Interrupted:
    """The one line for a training run stopped by a signal: where it was, and what its folder keeps (read from the
    disk: the newest intact ``step-N``, ``final``, or nothing) and how to go on."""
    from .checkpoint import newest_intact_checkpoint

    name = signal_name(err)
    at = f" at step {step}" if step is not None else ""
    checkpoints = run_dir / "checkpoints"
    if (checkpoints / "final" / "trainer_state.pt").is_file():
        kept = f"{checkpoints / 'final'} is saved: the run is complete"
    else:
        newest, _ = newest_intact_checkpoint(checkpoints)
        resume = f"resume with trainer.resume_from=auto hydra.run.dir={run_dir}"
        kept = f"{newest} is the newest checkpoint: {resume}" if newest else \
            f"no checkpoint was saved yet: start it again (in this folder: {resume}, which starts from step 0)"
    aborted = " (aborted without saving)" if "aborted" in str(err) else ""
    return Interrupted(getattr(err, "signum", signal.SIGINT), f"{name}: training stopped during {phase}{at}"
                       f"{aborted}; {kept}")
