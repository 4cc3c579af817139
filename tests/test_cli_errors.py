"""Override mistakes on train.py's and evaluate.py's command lines (src/lbdpo/cli.py, check_overrides) end in one line and exit code 2,
as every deliberate error does: a typo'd key names the closest valid keys, a missing group option the closest
options, an unquoted non-ASCII value how to quote it. Valid overrides, Hydra's own flags and HYDRA_FULL_ERROR=1 are
left to Hydra. Real subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from lbdpo.cli import flat_keys, override_problem

CONF = REPO_ROOT / "conf"


def train(*overrides: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), *overrides], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=300, env={**os.environ, **env})


def test_typo_key_is_one_line_exit_2_with_the_closest_keys():
    out = train("trainer.max_step=3", "model=tiny_random", "logger=none")
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and out.stdout == ""
    assert out.stderr.startswith("error: no such config key: trainer.max_step (closest valid: trainer.max_steps")
    assert "add a new key on purpose with +trainer.max_step=3" in out.stderr


def test_evaluate_typo_key_is_one_line_exit_2_and_valid_keys_get_through(tmp_path):
    """evaluate.py checks its own config (conf/evaluate.yaml): a typo'd key is refused before anything loads; the
    same command with the key spelled right gets through to the evaluation (which then names the missing checkpoint)."""
    def evaluate(*overrides: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO_ROOT / "evaluate.py"), *overrides], capture_output=True,
                              text=True, cwd=REPO_ROOT, timeout=300)

    missing = tmp_path / "no-run" / "checkpoints" / "final"
    out = evaluate(f"checkpoint={missing}", "max_pair=5", f"hydra.run.dir={tmp_path / 'logs'}")
    assert out.returncode == 2 and out.stdout == "" and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr == ("error: no such config key: max_pair (closest valid: max_pairs); fix the spelling, or add "
                          "a new key on purpose with +max_pair=5\n")
    assert not (tmp_path / "logs").exists()  # refused before Hydra ran
    out = evaluate(f"checkpoint={missing}", "generation.num_prompt=3")
    assert out.returncode == 2 and out.stderr.startswith(
        "error: no such config key: generation.num_prompt (closest valid: generation.num_prompts"), out.stderr
    assert override_problem(["checkpoint=X", "trainer.max_steps=3"], CONF, "evaluate").startswith(
        "no such config key: trainer.max_steps")  # a training key is no evaluation key
    valid = evaluate(f"checkpoint={missing}", "max_pairs=5", f"hydra.run.dir={tmp_path / 'logs'}")
    assert valid.returncode == 2 and "Traceback" not in valid.stderr, valid.stderr[-2000:]
    assert valid.stderr.splitlines()[-1].startswith(f"error: {missing / 'config.yaml'} is missing")


def test_unquoted_non_ascii_path_says_how_to_quote_and_quoting_works(tmp_path):
    path = tmp_path / "数据.jsonl"
    out = train("model=tiny_random", "logger=none", "data=jsonl", f"data.path={path}")
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith(f"error: cannot parse the override 'data.path={path}'")
    assert """'data.path="数据/偏好.jsonl"'""" in out.stderr
    quoted = train("model=tiny_random", "trainer=tiny", "logger=none", "data=jsonl", f'data.path="{path}"',
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert quoted.returncode == 2 and f"{path} does not exist" in quoted.stderr, quoted.stderr[-2000:]  # it got through


def test_valid_overrides_and_hydra_flags_pass_and_full_error_is_hydras():
    shown = train("--cfg", "job", "model=tiny_random", "trainer.max_steps=2", "+trainer.extra=1")
    assert shown.returncode == 0 and "max_steps: 2" in shown.stdout, shown.stderr  # + adds a key: Hydra's business
    assert train("--help").returncode == 0
    full = train("trainer.max_step=3", HYDRA_FULL_ERROR="1")
    assert full.returncode == 1 and "Traceback" in full.stderr and "ConfigCompositionException" in full.stderr


@pytest.mark.parametrize("argv,expected", [
    (["traner.max_steps=2"], "no such config key: traner.max_steps (closest valid: trainer.max_steps"),
    (["modle=tiny_random"], "no such config key: modle (closest valid: model)"),
    (["model=tiny_randm"], "model=tiny_randm: config group 'model' has no option 'tiny_randm'; closest: tiny_random"),
    (["+sweep=cpu_smal"], "sweep=cpu_smal: config group 'sweep' has no option 'cpu_smal'; closest: cpu_small"),
    (["-m", "seed=0,1", "trainer.max_stepz=1,2"], "no such config key: trainer.max_stepz (closest valid: "
                                                  "trainer.max_steps"),
    (["trainer.max_step=3", "data.max_lenght=9"], "no such config key: trainer.max_step (closest valid: "
                                                  "trainer.max_steps"),
])
def test_override_problems(argv, expected):
    message = override_problem(argv, CONF, "config")
    assert message is not None and message.startswith(expected), message
    if argv[-1] == "data.max_lenght=9":  # every unknown key is named
        assert "data.max_lenght (closest valid: data.max_length" in message


@pytest.mark.parametrize("argv", [
    [], ["model=tiny_random", "trainer=tiny", "data=jsonl", "data.path=x.jsonl", "hydra.run.dir=/tmp/x"],
    ["-m", "+arm=fixed_b01,learn_eps01", "seed=0,1"], ["+trainer.new_key=1"], ["~logger"], ["--info"],
])
def test_valid_overrides_have_no_problem(argv):
    assert override_problem(argv, CONF, "config") is None


def test_flat_keys_lists_every_dotted_key():
    assert flat_keys({"a": {"b": 1, "c": {"d": [1, {"e": 2}]}}, "f": None}) == ["a", "a.b", "a.c", "a.c.d", "f"]
