"""Shared fixtures: a tiny random Qwen2 model (fast) and random preference pairs."""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_PREFERENCE_DIR = REPO_ROOT.parent / "shared" / "data" / "preference"

TINY_CFG = {
    "source": "tiny_random",
    "dtype": "float32",
    "seed": 0,
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "initializer_range": 0.2},
}


@pytest.fixture(scope="session")
def tiny_model_and_tokenizer():
    from lbdpo.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(TINY_CFG)
    return model, tokenizer


@pytest.fixture()
def tiny_model(tiny_model_and_tokenizer):
    """A fresh copy per test, so tests that train it do not leak into others."""
    return copy.deepcopy(tiny_model_and_tokenizer[0])


def fresh_cache(path: Path) -> str:
    """An lbdpo cache folder at ``path`` with no reference log-probs or generations in it, for LBDPO_CACHE, that shares
    the embedded SmolLM2 already converted in the session's cache (a link): a test that needs a cold reference cache
    does not convert the GGUF again (≈ 15 s a time). Returns the path as a string."""
    from lbdpo.models import SMOLLM2_CACHE_NAME, smollm2_local_dir

    path.mkdir(parents=True, exist_ok=True)
    (path / SMOLLM2_CACHE_NAME).symlink_to(smollm2_local_dir(), target_is_directory=True)  # converts it once if needed
    return str(path)


def random_pairs(n: int, vocab: int, seed: int = 0, prompt_range=(2, 9), response_range=(1, 7)):
    """n tokenized preference triples of unequal lengths (no special meaning; ids in [3, vocab))."""
    rng = random.Random(seed)

    def ids(lo, hi):
        return [rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))]

    return [
        {"prompt_input_ids": ids(*prompt_range), "chosen_input_ids": ids(*response_range),
         "rejected_input_ids": ids(*response_range)}
        for _ in range(n)
    ]


def write_item_pairs(path, n: int = 64):
    """A small JSONL of text preference pairs ("Item i: …?" → "It is …." / "No ….") for CLI tests; returns path."""
    words = ["good", "bad", "fine", "poor", "great", "awful", "nice", "dull"]
    rows = [{"prompt": f"Item {i}: {words[i % 8]} {words[(i * 3) % 8]}?", "chosen": f"It is {words[(i * 5) % 8]}.",
             "rejected": f"No {words[(i * 7) % 8]}."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_two_processes(pairs_file, options: list[str], run_dir: Path, batch_size: int = 2) -> None:
    """train.py under torchrun (2 CPU processes, gloo) on ``pairs_file`` with tiny_random, the data settings of
    test_train.make_cfg and ``options``, ``batch_size`` pairs per process, into ``run_dir``; asserts it exits 0."""
    common = ["model=tiny_random", "trainer=tiny", "logger=none", "data=jsonl", f"data.path={pairs_file}",
              "data.max_length=48", "data.max_prompt_length=32", "data.eval_size=8", "data.eval_fraction=null"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          str(REPO_ROOT / "train.py"), *common, *options, f"trainer.batch_size={batch_size}",
                          f"hydra.run.dir={run_dir}"], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
