"""Bad input ends in one line that names the key, file or row and what to do, before anything loads where it can:
every option through :func:`lbdpo.train.checks.check_config`, every data problem through the loader, and the real
CLI (exit code 2, ``error: …`` on stderr, no traceback, nothing trained)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from conftest import REPO_ROOT
from lbdpo.cli import one_line_errors
from lbdpo.errors import LbdpoError
from lbdpo.data.loading import load_mixture, train_eval_split
from lbdpo.train.checks import check_config, number

CONF = REPO_ROOT / "conf"


def compose_with(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=False)


BAD_OPTIONS = [
    (["trainer.max_steps=-1"], r"trainer\.max_steps=-1 must be ≥ 1"),
    (["trainer.max_steps=null", "trainer.num_epochs=0.5"], r"trainer\.num_epochs=0\.5 must be an integer"),
    (["trainer.num_epochs=abc", "trainer.max_steps=null"], r"trainer\.num_epochs='abc' must be an integer"),
    (["trainer.policy_lr=abc"], r"trainer\.policy_lr='abc' must be a number"),
    (["beta_head.epsilon=abc"], r"beta_head\.epsilon"),
    (["seed=abc"], r"seed='abc' must be an integer"),
    (["trainer.mixed_precision=fp16"], r"fp16 has no CPU implementation"),
    (["trainer.lora.enabled=true", "trainer.lora.r=0"], r"trainer\.lora\.r=0 must be ≥ 1"),
    (["model.reference_dtype=bogus"], r"model\.reference_dtype='bogus'"),
    (["model.source=bogus"], r"model\.source='bogus'"),
    (["logger.backend=bogus"], r"logger\.backend='bogus'"),
    (["logger=wandb", "logger.mode=bogus"], r"logger\.mode='bogus'"),
    (["data.max_prompt_length=512"], r"data\.max_prompt_length"),
    (["data.max_length=abc"], r"data\.max_length='abc' must be an integer"),
    (["data.eval_fraction=-0.1"], r"data\.eval_fraction=-0\.1 must be in \[0, 1\)"),
    (["data.max_train_pairs=-5"], r"data\.max_train_pairs=-5 must be ≥ 0"),
    (["data=jsonl"], r"data=jsonl needs data\.path=FILE"),
    (["data=jsonl", "data.path=/nonexistent/pairs.jsonl"], r"data\.train: /nonexistent/pairs\.jsonl does not exist"),
    (["+trainer.max_step=5"], r"trainer\.max_step is not an option of the trainer group"),
    (["+data.format=parquet"], r"data\.format is not an option of the data group"),
    (["trainer.label_smoothing=0.5"], r"trainer\.label_smoothing=0\.5 must be in \[0, 0\.5\)"),
    (["trainer.malloc_mmap_threshold=0"], r"trainer\.malloc_mmap_threshold=0 must be in 1\.\.33554432 bytes"),
    (["trainer.malloc_mmap_threshold=1e9"], r"trainer\.malloc_mmap_threshold=1000000000\.0 must be"),
    (["trainer.packed_attention=flash"], r"trainer\.packed_attention='flash' must be auto, segments, block_mask or flex"),
    (["trainer.packed_attention=segments", "trainer.compile=true"],
     r"trainer\.packed_attention=segments with trainer\.compile=true.*set trainer\.packed_attention=block_mask"),
]


@pytest.mark.parametrize("overrides,message", BAD_OPTIONS, ids=[" ".join(o) for o, _ in BAD_OPTIONS])
def test_bad_option_names_its_key(overrides, message):
    cfg = compose_with(*overrides)
    with pytest.raises(ValueError, match=message):
        check_config(cfg, overrides)


def test_compile_without_a_cpu_compiler_names_the_key(monkeypatch):
    monkeypatch.setattr("lbdpo.train.checks.shutil.which", lambda name: None)
    with pytest.raises(ValueError, match=r"trainer\.compile=true on CPU needs a C\+\+ compiler"):
        check_config(compose_with("trainer.compile=true"), ["trainer.compile=true"])


def test_good_options_pass():
    check_config(compose_with("beta_head=mlp", "beta_head.epsilon=0.1"), ["beta_head=mlp", "beta_head.epsilon=0.1"])


@pytest.fixture
def files(tmp_path):
    good = {"prompt": "Q?", "chosen": "yes", "rejected": "no"}
    out = {"empty": tmp_path / "empty.jsonl", "equal": tmp_path / "equal.jsonl", "latin1": tmp_path / "latin1.jsonl",
           "parquet": tmp_path / "broken.parquet", "scalars": tmp_path / "scalars.jsonl",
           "good": tmp_path / "good.jsonl"}
    out["empty"].write_text("")
    out["equal"].write_text(json.dumps({"prompt": "Q?", "chosen": "same", "rejected": "same"}) + "\n")
    out["latin1"].write_bytes(json.dumps({**good, "chosen": "café"}, ensure_ascii=False).encode("latin-1") + b"\n")
    out["parquet"].write_bytes(b"not a parquet file")
    out["scalars"].write_text("1\n2\n")
    out["good"].write_text("".join(json.dumps({**good, "prompt": f"Q{i}?"}) + "\n" for i in range(4)))
    return out


@pytest.mark.parametrize("name,message", [
    ("empty", r"empty\.jsonl: no usable preference pairs \(0 rows read"),
    ("equal", r"equal\.jsonl: no usable preference pairs \(1 rows read; skipped: chosen_equals_rejected=1\)"),
    ("latin1", r"latin1\.jsonl: not UTF-8 text"),
    ("parquet", r"broken\.parquet: cannot be read as a \.parquet file"),
    ("scalars", r"scalars\.jsonl: rows are not JSON objects"),
])
def test_bad_data_file_names_the_file(files, name, message):
    with pytest.raises(ValueError, match=message):
        load_mixture([{"path": str(files[name])}])


def test_column_mapping_to_a_missing_column_is_an_error(files):
    with pytest.raises(ValueError, match=r"data\.columns maps \{'chosen': 'good'\}"):
        load_mixture([{"path": str(files["good"]), "columns": {"chosen": "good"}}])


def test_eval_split_that_leaves_nothing_names_the_keys(files):
    ds, _ = load_mixture([{"path": str(files["good"])}])
    with pytest.raises(ValueError, match=r"data\.eval_size/eval_fraction: an eval split of 4 rows"):
        train_eval_split(ds, eval_size=4)


def test_only_lbdpo_errors_are_one_line(capsys):
    """A deliberate error (LbdpoError) ends in one line and exit 2; a bug inside lbdpo — a shape mismatch raised by a
    torch op called from lbdpo code, or a ValueError from a tuple unpacking — keeps its exception and traceback."""
    with pytest.raises(LbdpoError) as ours:
        number("trainer.batch_size", "x", int)
    with pytest.raises(SystemExit) as exit_:
        with one_line_errors():
            raise ours.value
    assert exit_.value.code == 2 and capsys.readouterr().err.startswith("error: trainer.batch_size")

    import torch

    from lbdpo.losses import dpo_loss

    with pytest.raises(RuntimeError, match="size of tensor"):  # (3,) against (2,): torch's own error, not ours
        with one_line_errors():
            dpo_loss(torch.zeros(3), torch.zeros(2), torch.zeros(3), torch.zeros(3), 0.1)
    with pytest.raises(ValueError, match="too many values to unpack") as bug:
        with one_line_errors():
            a, b = (1, 2, 3)  # noqa: F841
    assert not isinstance(bug.value, LbdpoError)


def test_cli_bug_keeps_its_traceback(tmp_path):
    """Through the real command line: a bug raised inside lbdpo prints its traceback and does not exit 2."""
    script = tmp_path / "bug.py"
    script.write_text("import torch\nfrom lbdpo.cli import one_line_errors\nfrom lbdpo.logprobs import token_logps\n"
                      "with one_line_errors():\n    token_logps(torch.zeros(2, 5, 7), torch.zeros(3, 5, dtype=torch.long))\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode not in (0, 2) and "Traceback" in out.stderr and "lbdpo/logprobs.py" in out.stderr


def cli(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / script), *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=300)


def assert_one_line(out: subprocess.CompletedProcess, message: str) -> None:
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr + out.stdout
    assert out.stderr.strip().splitlines()[-1].startswith("error: ") and message in out.stderr


def test_cli_bad_option_is_one_line_before_loading(tmp_path):
    out = cli("train.py", "model=tiny_random", "trainer=tiny", "logger=none", "trainer.max_steps=-1",
              f"hydra.run.dir={tmp_path}")
    assert_one_line(out, "trainer.max_steps=-1 must be ≥ 1")
    assert not (tmp_path / "metrics.jsonl").exists()


def test_cli_bad_data_file_is_one_line(files, tmp_path):
    out = cli("train.py", "model=tiny_random", "trainer=tiny", "logger=none", "data=jsonl",
              f"data.path={files['equal']}", f"hydra.run.dir={tmp_path}")
    assert_one_line(out, "no usable preference pairs")


def test_cli_evaluate_bad_option_is_one_line(tmp_path):
    out = cli("evaluate.py", f"checkpoint={tmp_path}", "max_pairs=0")
    assert_one_line(out, "max_pairs=0 must be ≥ 1")


def test_resume_into_other_options_lists_what_differs(tmp_path):
    from omegaconf import OmegaConf

    from lbdpo.train.checks import check_resume_matches

    saved = compose_with("model=tiny_random", "beta_head=mlp")
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    check_resume_matches(tmp_path, compose_with("model=tiny_random", "beta_head=mlp", "trainer.policy_lr=1e-3"))
    with pytest.raises(ValueError, match=r"beta_head\.context_net_type: checkpoint 'mlp', this run 'linear'"):
        check_resume_matches(tmp_path, compose_with("model=tiny_random"))
