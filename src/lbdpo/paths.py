"""The project folder: the lbdpo checkout, with ``conf/`` (the Hydra configs), ``train.py`` and ``evaluate.py``.

Relative paths in configs (``data/sentiment/train.jsonl``), an experiment's default folders (``outputs/experiments``,
``results/``) and the experiment runner's ``train.py`` / ``evaluate.py`` children are resolved against it. The package
may be installed anywhere (``pip install .``, editable or not), so the folder is found from the run, never from where
the package's own files lie. In this order:

1. ``LBDPO_HOME``, when set (it must hold ``conf/``);
2. the folder above the ``conf/`` that Hydra composed the running command's config from (``python train.py`` /
   ``python evaluate.py``, from any directory);
3. the first folder at or above each starting point (the experiment file's folder), then at or above the current
   directory, that holds ``conf/`` and ``train.py``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import LbdpoError


def is_project(folder: Path) -> bool:
    return (folder / "conf").is_dir() and (folder / "train.py").is_file()


def _hydra_project() -> Path | None:
    """The folder above the ``conf/`` of the running Hydra app (None outside one: Hydra is then not even imported)."""
    hydra_config = sys.modules.get("hydra.core.hydra_config")
    if hydra_config is None or not hydra_config.HydraConfig.initialized():
        return None
    for source in hydra_config.HydraConfig.get().runtime.config_sources:
        if source.provider == "main" and source.schema == "file":
            return Path(source.path).resolve().parent
    return None


def find_project(*starts: Path) -> Path | None:
    """The project folder (see the module docstring), or None when there is none."""
    home = os.environ.get("LBDPO_HOME")
    if home:
        folder = Path(home).expanduser().resolve()
        if not (folder / "conf").is_dir():
            raise LbdpoError(f"LBDPO_HOME={home}: no conf/ folder there; point it at the lbdpo checkout (the folder "
                             "with conf/, train.py and evaluate.py) or unset it")
        return folder
    found = _hydra_project()
    if found is not None:
        return found
    for start in (*starts, Path.cwd()):
        start = Path(start).expanduser().resolve()
        for folder in (start, *start.parents):
            if is_project(folder):
                return folder
    return None


def project(*starts: Path, needed_for: str) -> Path:
    """:func:`find_project`, or an :class:`LbdpoError` that says what to do when there is none."""
    folder = find_project(*starts)
    if folder is None:
        where = ", ".join(dict.fromkeys(str(Path(s).expanduser().resolve()) for s in (*starts, Path.cwd())))
        raise LbdpoError(f"{needed_for} needs the lbdpo checkout (the folder with conf/, train.py and evaluate.py) "
                         f"and there is none at or above {where}: run from the checkout or set "
                         "LBDPO_HOME=/path/to/checkout")
    return folder
