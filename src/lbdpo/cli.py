"""How the command lines (``train.py``, ``evaluate.py``) end on an error.

An error that lbdpo raised on purpose — a bad option, file, row, path or launch, each message naming it and what to
do — ends in that one line (``error: …``, exit code 2) instead of Hydra's traceback. Any other exception (raised
inside a library, or not one of the kinds below) keeps its full traceback: it is a bug or an unforeseen input, to be
reported. ``HYDRA_FULL_ERROR=1`` shows the traceback of every error.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from pathlib import Path

DELIBERATE = (ValueError, OSError, RuntimeError)  # the kinds lbdpo raises for bad input (and ConnectionError ⊂ OSError)
PACKAGE_DIR = Path(__file__).resolve().parent


def raised_by_lbdpo(err: BaseException) -> bool:
    """True when the innermost frame of ``err``'s traceback is lbdpo's own code (a ``raise`` of ours)."""
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(PACKAGE_DIR)


@contextlib.contextmanager
def one_line_errors():
    """Turn a deliberate lbdpo error into ``error: <message>`` on stderr and exit code 2 (see the module doc)."""
    try:
        yield
    except DELIBERATE as err:
        if not raised_by_lbdpo(err) or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
