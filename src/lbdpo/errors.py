"""lbdpo's deliberate errors: bad input, a bad option, a refused launch — each message names the file, row or config
key and what to do. The command lines print these as one line (:func:`lbdpo.cli.one_line_errors`); any other
exception is a bug or an unforeseen input and keeps its traceback.

Every class subclasses :class:`LbdpoError` (itself a ``ValueError``, so ``except ValueError`` keeps working) and, where
a builtin kind says more, that kind too: a missing file is also a ``FileNotFoundError``, an unreachable hub also a
``ConnectionError``, a model that cannot be loaded also an ``OSError``, a refused run state also a ``RuntimeError``.
The one exception is :class:`Interrupted` (a signal stopped the command), a ``KeyboardInterrupt``.
"""

from __future__ import annotations


class LbdpoError(ValueError):
    """A deliberate lbdpo error: the message says what is wrong and what to do."""


class MissingFileError(LbdpoError, FileNotFoundError):
    """A file or folder the run needs is missing (data, checkpoint, model folder)."""


class HubUnreachableError(LbdpoError, ConnectionError):
    """The Hugging Face Hub was asked for and cannot be reached (no network or no access)."""


class ModelLoadError(LbdpoError, OSError):
    """``model.name_or_path`` names nothing that can be loaded."""


class RunStateError(LbdpoError, RuntimeError):
    """The run cannot go on as configured: its folder is in use, the launch or a checkpoint does not match, the
    updates keep coming out non-finite, a decoder cannot run the forward that was asked for."""


class DamagedCheckpointError(LbdpoError, OSError):
    """A checkpoint file is there but cannot be read whole (truncated, corrupted): the message names the file and
    what to do (another checkpoint; ``trainer.resume_from=auto`` skips a damaged newest ``step-N`` by itself)."""


class SaveError(LbdpoError, OSError):
    """A checkpoint or result could not be written (disk full, no permission, read-only file system): the message
    names the path, the free space needed and what was kept (the previous checkpoint or results stay intact)."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a command; the message says what was kept. Not an :class:`LbdpoError` on purpose:
    a ``KeyboardInterrupt`` passes through ``except Exception`` (an optional section's error handler must not
    swallow it). The command lines print the message as one line and exit with ``exit_code`` (128 + the signal)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum, self.exit_code = signum, 128 + signum
