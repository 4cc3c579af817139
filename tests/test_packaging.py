"""Packaging: every third-party module ``src/lbdpo`` imports is declared in pyproject.toml and pinned in
requirements.txt; the package runs from a non-editable install (``pip install .``), with the checkout — conf/,
train.py, data/, experiments/ — found from the run (``lbdpo.paths``), not from where the package's files lie."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "lbdpo"

# top-level module → the distribution that provides it (PEP 503 names), for every third-party import of src/lbdpo
DISTRIBUTION = {
    "accelerate": "accelerate", "datasets": "datasets", "huggingface_hub": "huggingface-hub", "hydra": "hydra-core",
    "matplotlib": "matplotlib", "numpy": "numpy", "omegaconf": "omegaconf", "peft": "peft", "rich": "rich",
    "safetensors": "safetensors", "scipy": "scipy", "tensorboard": "tensorboard", "torch": "torch", "tqdm": "tqdm",
    "transformers": "transformers", "vaderSentiment": "vadersentiment", "wandb": "wandb", "yaml": "pyyaml",
}


def normalized(requirement: str) -> str:
    """The PEP 503 name of a requirement line (``PyYAML==6.0.4`` → ``pyyaml``)."""
    return re.sub(r"[-_.]+", "-", re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1)).lower()


def third_party_imports() -> dict[str, dict[str, bool]]:
    """module → {importing file: imported at module level}, for every non-stdlib, non-lbdpo top-level module."""
    found: dict[str, dict[str, bool]] = {}
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text())
        top_level = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            for name in {n.split(".")[0] for n in names} - set(sys.stdlib_module_names) - {"lbdpo", "__future__"}:
                where, file = found.setdefault(name, {}), str(path.relative_to(SRC))
                where[file] = where.get(file, False) or id(node) in top_level
    return found


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_every_runtime_import_is_a_declared_dependency():
    imports = third_party_imports()
    unknown = sorted(set(imports) - set(DISTRIBUTION))
    assert not unknown, f"imported by src/lbdpo but not in DISTRIBUTION (and maybe not in pyproject.toml): {unknown}"
    required = {normalized(r) for r in project()["dependencies"]}
    extras = {normalized(r) for reqs in project().get("optional-dependencies", {}).values() for r in reqs}
    for module, files in imports.items():
        dist = DISTRIBUTION[module]
        assert dist in required | extras, f"{module} ({dist}, imported by {sorted(files)}) is not in pyproject.toml"
        if dist not in required:  # an optional extra: only imported where it is used, never on import of lbdpo
            assert not any(files.values()), f"{module} is an optional extra but imported at module level: {files}"
    assert set(DISTRIBUTION.values()) <= required | extras  # no stale entry


def test_every_declared_dependency_is_pinned_in_requirements():
    pinned = {normalized(line) for line in (REPO / "requirements.txt").read_text().splitlines()
              if "==" in line and not line.lstrip().startswith("#")}
    declared = [*project()["dependencies"], *(r for reqs in project().get("optional-dependencies", {}).values()
                                               for r in reqs)]
    assert not [r for r in declared if normalized(r) not in pinned], "declared in pyproject.toml, not pinned"


@pytest.fixture()
def elsewhere(tmp_path, monkeypatch):
    """The current directory outside the checkout, no LBDPO_HOME, no Hydra app running (restored afterwards)."""
    from hydra.core.hydra_config import HydraConfig

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LBDPO_HOME", raising=False)
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)
    return tmp_path


def test_an_experiment_file_finds_its_checkout_from_any_directory(elsewhere, monkeypatch):
    from lbdpo.errors import LbdpoError
    from lbdpo.experiment import Experiment

    exp = Experiment.load(REPO / "experiments" / "sentiment.yaml")
    assert exp.home == REPO and exp.folder.parent == REPO / "outputs" / "experiments"
    assert exp.results.parent == REPO / "results"

    stray = elsewhere / "sentiment.yaml"  # outside any checkout: refused, saying what to do
    shutil.copy(REPO / "experiments" / "sentiment.yaml", stray)
    with pytest.raises(LbdpoError, match="run from the checkout or set LBDPO_HOME"):
        Experiment.load(stray)
    monkeypatch.setenv("LBDPO_HOME", str(REPO))
    assert Experiment.load(stray).home == REPO
    monkeypatch.setenv("LBDPO_HOME", str(elsewhere))
    with pytest.raises(LbdpoError, match="no conf/ folder"):
        Experiment.load(stray)


def test_a_hydra_run_resolves_config_paths_against_the_folder_of_its_conf(elsewhere):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from lbdpo.build import resolve_path

    assert resolve_path("data/sentiment/train.jsonl") == Path("data/sentiment/train.jsonl")  # no checkout: as given
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):  # as train.py does (the fixture restores)
        HydraConfig.instance().set_config(compose("config", return_hydra_config=True))
    assert resolve_path("data/sentiment/train.jsonl") == REPO / "data" / "sentiment" / "train.jsonl"


@pytest.mark.slow
def test_a_non_editable_install_trains_and_runs_the_experiment_command(tmp_path):
    """``pip install --no-deps .`` into a fresh venv that borrows this environment's packages (a .pth file; the
    .pth files inside that folder, such as an editable lbdpo, are not processed), then train.py from outside the
    checkout and ``python -m lbdpo.experiment status`` from another folder. About 15 s on 2 idle cores."""
    pytest.importorskip("setuptools")
    venv, source, cwd = tmp_path / "venv", tmp_path / "source", tmp_path / "elsewhere"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LBDPO_HOME", "VIRTUAL_ENV")}
    env.update(WANDB_MODE="disabled", HF_HUB_OFFLINE="1")
    probe = [python, "-c", "import lbdpo; print(lbdpo.__file__)"]
    assert subprocess.run(probe, capture_output=True, env=env, cwd=REPO).returncode != 0  # not installed yet

    shutil.copytree(SRC, source / "src" / "lbdpo", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):  # a copy: building in the checkout would leave build/ there
        shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
                    "--no-build-isolation", "--ignore-installed", str(source)], check=True, env=env)
    installed = subprocess.run(probe, capture_output=True, text=True, env=env, cwd=REPO)
    assert installed.stdout.startswith(str(venv)), installed.stdout + installed.stderr  # not the checkout's src/

    cwd.mkdir()  # default data=sentiment: data/sentiment/*.jsonl are found under the checkout of train.py's conf/
    train = subprocess.run([python, str(REPO / "train.py"), "model=tiny_random", "trainer=tiny", "logger=none",
                            "data.max_train_pairs=8", "data.max_eval_pairs=4", "trainer.max_steps=1",
                            "trainer.eval_every=0", f"hydra.run.dir={tmp_path / 'run'}"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd, timeout=300)
    assert train.returncode == 0 and (tmp_path / "run" / "checkpoints" / "final").is_dir(), train.stdout[-3000:]

    status = subprocess.run([python, "-m", "lbdpo.experiment", "status", str(REPO / "experiments" / "sentiment.yaml")],
                            capture_output=True, text=True, env=env, cwd=cwd, timeout=120)
    assert status.returncode == 0 and "| run | state |" in status.stdout, status.stdout + status.stderr
