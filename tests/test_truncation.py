"""Truncation is counted (src/lbdpo/data/tokenize.py): each kept pair's cuts (prompt to data.max_prompt_length, a
response to fit data.max_length) checked against a brute-force recount from the untruncated ids; the counts reach the
data report and the training banner; more than half the pairs cut is a warning naming the keys to raise."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter

import pytest
from datasets import Dataset
from hydra import compose, initialize_config_dir

from conftest import REPO_ROOT, write_item_pairs
from lbdpo.build import build_datasets
from lbdpo.data.tokenize import (
    CUT_COLUMN,
    TOKENIZED_COLUMNS,
    PairEncoder,
    TokenizeConfig,
    describe_truncation,
    encode_pairs,
    tokenize_pairs,
    truncation_warning,
)

WORDS = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "iota", "kappa"]


def random_rows(n: int, seed: int) -> list[dict]:
    """Pairs with prompts and responses from 1 to 40 words, some responses unfinished (no end-of-turn token)."""
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    rows = []
    for i in range(n):
        rows.append({"prompt": f"Q{i}: " + text(1, 40), "chosen": "yes " + text(0, 40), "rejected": "no " + text(0, 40),
                     "chosen_finished": rng.random() < 0.8, "rejected_finished": rng.random() < 0.8})
    return rows


def expected_cuts(encoder: PairEncoder, row: dict, kept: dict) -> set[str]:
    """What was cut, recounted: the untruncated ids against what the pair kept."""
    full_prompt = encoder.prompt_ids(row)
    cuts = set()
    if kept["prompt_input_ids"] != full_prompt:
        assert kept["prompt_input_ids"] == full_prompt[-len(kept["prompt_input_ids"]):]  # the end kept
        cuts.add("prompt_cut")
    for key in ("chosen", "rejected"):
        full = encoder.response_ids([row], key)[0]
        if kept[f"{key}_input_ids"] != full:
            assert kept[f"{key}_input_ids"] == full[:len(kept[f"{key}_input_ids"])]  # the start kept
            cuts.add(f"{key}_cut")
    return cuts


@pytest.mark.parametrize("seed,max_length,max_prompt_length", [(0, 24, 12), (1, 40, 30), (2, 64, 8), (3, 200, 150)])
def test_cuts_match_a_brute_force_recount(tiny_model_and_tokenizer, seed, max_length, max_prompt_length):
    tok = tiny_model_and_tokenizer[1]
    cfg = TokenizeConfig(prompt_format="chat", max_length=max_length, max_prompt_length=max_prompt_length)
    rows = random_rows(60, seed)
    encoder = PairEncoder(tok, cfg)
    encoded = encode_pairs(Dataset.from_list(rows), tok, cfg)
    assert len(encoded) == len(rows)
    expected, per_pair = Counter(), []
    for row, enc in zip(rows, encoded):
        if enc["skip_reason"]:
            assert enc[CUT_COLUMN] == ""  # a skipped pair is counted as skipped, not as cut
            continue
        cuts = expected_cuts(encoder, row, enc)
        assert set(filter(None, enc[CUT_COLUMN].split(","))) == cuts, row
        expected.update(cuts)
        expected["pairs_cut"] += bool(cuts)
        per_pair.append(cuts)
    truncated = Counter()
    ds, skips = tokenize_pairs(Dataset.from_list(rows), tok, cfg, truncated=truncated)
    assert +truncated == +expected
    assert len(ds) == len(per_pair) and CUT_COLUMN not in ds.column_names and "skip_reason" not in ds.column_names
    assert sum(skips.values()) + len(ds) == len(rows)
    if max_length == 200:
        assert not truncated  # nothing this short is cut
    else:
        assert truncated["pairs_cut"] > 0


def test_a_truncated_counter_is_optional_and_accumulates(tiny_model_and_tokenizer):
    tok = tiny_model_and_tokenizer[1]
    cfg = TokenizeConfig(prompt_format="chat", max_length=24, max_prompt_length=12)
    rows = random_rows(20, 5)
    plain, plain_skips = tokenize_pairs(Dataset.from_list(rows), tok, cfg)
    counted = Counter()
    for _ in range(2):
        ds, skips = tokenize_pairs(Dataset.from_list(rows), tok, cfg, truncated=counted)
        assert ds.to_list() == plain.to_list() and skips == plain_skips
    once = Counter()
    tokenize_pairs(Dataset.from_list(rows), tok, cfg, truncated=once)
    assert counted == once + once


def test_an_empty_dataset_tokenizes_to_an_empty_one(tiny_model_and_tokenizer):
    """The data checker's old crash (`Column 'skip_reason' doesn't exist`): no rows left after the loader."""
    tok = tiny_model_and_tokenizer[1]
    empty = Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})
    truncated = Counter()
    ds, skips = tokenize_pairs(empty, tok, TokenizeConfig(), truncated=truncated)
    assert len(ds) == 0 and not skips and not truncated
    assert set(TOKENIZED_COLUMNS) <= set(ds.column_names)


@pytest.mark.parametrize("counts,pairs,warn,keys", [
    ({"pairs_cut": 5, "prompt_cut": 5}, 10, False, []),  # exactly half: no warning
    ({"pairs_cut": 6, "prompt_cut": 6}, 10, True, ["data.max_prompt_length"]),
    ({"pairs_cut": 6, "chosen_cut": 2, "rejected_cut": 6}, 10, True, ["data.max_length"]),
    ({"pairs_cut": 10, "prompt_cut": 3, "chosen_cut": 9}, 10, True, ["data.max_prompt_length", "data.max_length"]),
    ({}, 10, False, []),
    ({}, 0, False, []),
])
def test_warning_past_half_names_the_keys_to_raise(counts, pairs, warn, keys):
    cfg = TokenizeConfig(max_length=64, max_prompt_length=32)
    message = truncation_warning(counts, pairs, "train", cfg)
    assert (message is not None) == warn
    if warn:
        for key in ("data.max_prompt_length", "data.max_length"):
            assert (key in message) == (key in keys), message
        assert message.startswith("all " if counts["pairs_cut"] == pairs else "most ")
        assert "(now 32)" in message if "data.max_prompt_length" in keys else "(now 64)" in message
    if not counts:
        assert describe_truncation(counts, pairs) == "none"
    else:
        reasons = ", ".join(f"{k}={counts[k]}" for k in ("prompt_cut", "chosen_cut", "rejected_cut") if k in counts)
        percent = round(100 * counts["pairs_cut"] / pairs)
        assert describe_truncation(counts, pairs) == f"{counts['pairs_cut']} of {pairs} pairs ({percent}%): {reasons}"


def data_cfg(pairs_file, *overrides):
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["model=tiny_random", "data=jsonl", f"data.path={pairs_file}",
                                            "data.eval_size=8", "data.eval_fraction=null", *overrides])


def test_data_report_carries_the_counts_and_warnings(tmp_path, tiny_model_and_tokenizer):
    tok = tiny_model_and_tokenizer[1]
    pairs_file = write_item_pairs(tmp_path / "pairs.jsonl", n=40)
    _, _, roomy = build_datasets(data_cfg(pairs_file).data, tok, seed=0)
    assert roomy["train_truncated"] == {} and roomy["eval_truncated"] == {} and roomy["truncation_warnings"] == []
    train, evals, tight = build_datasets(data_cfg(pairs_file, "data.max_length=8", "data.max_prompt_length=4").data,
                                         tok, seed=0)
    assert tight["train_truncated"]["pairs_cut"] == len(train) == tight["train_pairs"]  # every prompt is > 4 tokens
    assert tight["train_truncated"]["prompt_cut"] == len(train)
    assert tight["eval_truncated"]["pairs_cut"] == len(evals)
    assert [w.split(" pairs")[0] for w in tight["truncation_warnings"]] == ["all train", "all eval"]
    json.dumps(tight)  # eval.json stores this report


def test_banner_shows_truncation_and_the_warning(tmp_path):
    """The probe of issue 41 on the real command line: every pair cut to a few tokens is no longer 'skipped none'."""
    pairs_file = write_item_pairs(tmp_path / "pairs.jsonl", n=24)
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"), "model=tiny_random", "trainer=tiny", "logger=none", "data=jsonl",
         f"data.path={pairs_file}", "data.eval_size=4", "data.eval_fraction=null", "data.max_length=8",
         "data.max_prompt_length=4", "trainer.max_steps=1", "trainer.eval_every=0", f"hydra.run.dir={tmp_path / 'run'}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT, timeout=600,
        env={**__import__("os").environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stdout[-3000:]
    assert "truncated (train) │ 20 of 20 pairs (100%): prompt_cut=20" in out.stdout, out.stdout[-3000:]
    assert "truncated (eval)  │ 4 of 4 pairs (100%)" in out.stdout
    assert "!!! truncation" in out.stdout
    assert "WARNING] - all train pairs were cut by truncation" in out.stdout
    assert "raise data.max_prompt_length (now 4) / data.max_length (now 8)" in out.stdout
