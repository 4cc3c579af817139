"""The built-in ``sentiment`` dataset: reward, prompt generator, sampler helpers and (if built) the files.

All fast: the only model is a tiny randomly initialised Qwen2 built in memory (no download, no tokenizer).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from lbdpo.data.sentiment_prompts import DOMAINS, SUBJECTS, TEMPLATES, build_prompts, split_subjects, templates_of
from lbdpo.rewards import sentiment_reward

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "sentiment"
ROW_KEYS = {"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward", "chosen_finished", "rejected_finished",
            "domain", "subject", "template_id"}


# --------------------------------------------------------------------------------------------------
# reward
# --------------------------------------------------------------------------------------------------


def test_reward_ranks_positive_above_negative():
    pos, neg, neutral = sentiment_reward(
        [
            "I absolutely love this coffee machine, it is wonderful and makes great coffee!",
            "Terrible product. It broke after a day, awful quality, a total waste of money.",
            "The box is on the table.",
        ]
    )
    assert pos > neutral > neg
    assert pos > 0.5 and neg < -0.5
    assert all(-1.0 <= r <= 1.0 for r in (pos, neg, neutral))


def test_reward_shape_and_empty():
    assert sentiment_reward([]) == []
    out = sentiment_reward(["", "ok", "bad"])
    assert len(out) == 3 and all(isinstance(r, float) for r in out)
    assert out[0] == 0.0


# --------------------------------------------------------------------------------------------------
# prompt generator
# --------------------------------------------------------------------------------------------------


def test_subjects_and_templates_are_well_formed():
    assert len(SUBJECTS) >= 200
    assert len({s.key for s in SUBJECTS}) == len(SUBJECTS)
    assert len({s.zh for s in SUBJECTS}) == len(SUBJECTS) and len({s.fr for s in SUBJECTS}) == len(SUBJECTS)
    assert len({t.id for t in TEMPLATES}) == len(TEMPLATES)
    for domain in DOMAINS:
        assert 8 <= len(templates_of(domain)) <= 12
    for t in TEMPLATES:  # every template renders and mentions its subject
        text = t.render(SUBJECTS[0])
        assert "{" not in text and text.strip()


def test_prompts_sizes_disjoint_and_balanced():
    prompts = build_prompts(seed=0, num_train=2000, num_test=300)
    train, test = prompts["train"], prompts["test"]
    assert len(train) >= 2000 and len(test) >= 300
    train_pairs = {(p.template_id, p.subject) for p in train}
    test_pairs = {(p.template_id, p.subject) for p in test}
    assert len(train_pairs) == len(train) and len(test_pairs) == len(test)  # no duplicate prompt
    assert not train_pairs & test_pairs
    assert not {p.subject for p in train} & {p.subject for p in test}
    for split in (train, test):
        counts = Counter(p.domain for p in split)
        assert set(counts) == set(DOMAINS)
        assert max(counts.values()) - min(counts.values()) <= 1
        for p in split:
            assert p.template_id.startswith(p.domain)
    # all templates are used in both splits
    assert {p.template_id for p in train} == {t.id for t in TEMPLATES} == {p.template_id for p in test}


def test_prompts_deterministic_and_seed_dependent():
    a = build_prompts(seed=0, num_train=400, num_test=80)
    b = build_prompts(seed=0, num_train=400, num_test=80)
    c = build_prompts(seed=1, num_train=400, num_test=80)
    assert a == b
    assert a != c
    train0, test0 = split_subjects(0)
    assert not {s.key for s in train0} & {s.key for s in test0}
    assert len(train0) + len(test0) == len(SUBJECTS)


def test_prompt_selection_grows_by_prefix():
    """A larger --num-train keeps the smaller run's prompts (so cached samples are reused)."""
    small = build_prompts(seed=0, num_train=400, num_test=80)["train"]
    big = build_prompts(seed=0, num_train=800, num_test=80)["train"]
    key = lambda p: (p.template_id, p.subject)  # noqa: E731
    assert {key(p) for p in small} <= {key(p) for p in big}


def test_too_many_prompts_is_an_error():
    with pytest.raises(ValueError):
        build_prompts(seed=0, num_train=10, num_test=100_000)


# --------------------------------------------------------------------------------------------------
# generation helpers (no real model)
# --------------------------------------------------------------------------------------------------


def test_select_pair_and_skips():
    from lbdpo.data.make_sentiment import select_pair

    assert select_pair(["a", "b", "c"], [0.1, 0.9, -0.5]) == (1, 2)
    assert select_pair(["a", "b"], [0.0, 0.0]) == "tie"
    assert select_pair(["", "b", " "], [0.9, 0.1, -0.9]) == "too_few_nonempty"
    assert select_pair(["", "b", "c"], [0.9, 0.1, -0.9]) == (1, 2)  # empty samples never win


def test_json_line_escapes_unicode_line_breaks(tmp_path):
    from lbdpo.data.make_sentiment import json_line, read_jsonl_lines, write_jsonl

    rows = [{"chosen": "a\u2028b\x85c\u2029d 中文 é", "n": 1}, {"chosen": "x\ny"}]
    assert all(len(json_line(r).splitlines()) == 1 for r in rows)
    assert "中文" in json_line(rows[0])  # non-ASCII stays readable
    write_jsonl(tmp_path / "x.jsonl", rows)
    assert [json.loads(line) for line in read_jsonl_lines(tmp_path / "x.jsonl")] == rows


def test_generation_order_and_prefix():
    from lbdpo.data.make_sentiment import common_prefix_length, generation_order

    assert common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    lengths = [5, 1, 4, 2, 3, 9]
    order = generation_order(lengths, [0, 1, 2, 3, 4, 5], batch_size=1, window_batches=3)
    assert order == [1, 2, 0, 3, 4, 5]


def test_sample_from_logits_matches_softmax():
    from lbdpo.data.make_sentiment import sample_from_logits

    torch.manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, 2.0, -30.0]]).repeat(20000, 1)
    draws = sample_from_logits(logits, temperature=1.0)
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    assert torch.allclose(freq, torch.softmax(logits[0], -1), atol=0.015)
    assert sample_from_logits(torch.tensor([[0.0, 50.0, 0.0]]), temperature=0.5).item() == 1


def _tiny_model():
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def test_prefix_sharing_sampler_is_exact():
    """First-step logits of the prefix-shared, middle-padded batch equal a plain forward of each prompt,
    and the preallocated KV cache gives the same samples as the growing one."""
    from lbdpo.data.make_sentiment import PrefixSharingSampler

    model = _tiny_model()
    prefix = [3, 4, 5, 6]
    suffixes = [[7, 8, 9], [10], [11, 12, 13, 14, 15]]
    captured = []
    real_forward = model.forward

    def spy(*a, **kw):
        out = real_forward(*a, **kw)
        captured.append(out.logits[:, -1].clone())
        return out

    model.forward = spy
    sampler = PrefixSharingSampler(model, prefix, stop_ids=[2], pad_id=0)
    captured.clear()
    sampler.sample(suffixes, k=1, max_new_tokens=1, temperature=1.0)
    model.forward = real_forward
    with torch.inference_mode():
        for row, suffix in enumerate(suffixes):
            ref = model(input_ids=torch.tensor([prefix + suffix])).logits[0, -1]
            torch.testing.assert_close(captured[0][row], ref, atol=1e-4, rtol=1e-4)

    outs = []
    for pre in (False, True):
        sampler = PrefixSharingSampler(model, prefix, stop_ids=[2], pad_id=0, preallocate=pre)
        torch.manual_seed(1)
        outs.append(sampler.sample(suffixes, k=3, max_new_tokens=12, temperature=1.0))
    assert outs[0] == outs[1]
    for per_prompt in outs[0]:
        assert len(per_prompt) == 3
        for tokens, finished in per_prompt:
            assert 2 not in tokens and len(tokens) <= 12
            assert finished or len(tokens) == 12


# --------------------------------------------------------------------------------------------------
# the built dataset (only when present)
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not (DATA / "train.jsonl").is_file(), reason="data/sentiment not built")
@pytest.mark.parametrize("split", ["train", "test"])
def test_built_dataset_rows(split):
    path = DATA / f"{split}.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} missing")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    # JSONL readers that split on every Unicode line break (str.splitlines) see the same rows
    assert len([line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]) == len(rows)
    assert rows
    for r in rows:
        assert set(r) == ROW_KEYS
        assert r["chosen_reward"] > r["rejected_reward"]
        assert r["chosen"] != r["rejected"]
        assert r["chosen"].strip() and r["rejected"].strip()
        assert -1.0 <= r["rejected_reward"] < r["chosen_reward"] <= 1.0
        assert r["domain"] in DOMAINS and r["template_id"].startswith(r["domain"])
        assert "<|im_start|>" not in r["prompt"]  # plain user text, not chat-templated
        assert isinstance(r["chosen_finished"], bool) and isinstance(r["rejected_finished"], bool)
    assert {r["domain"] for r in rows} == set(DOMAINS)
    # the stored rewards are the ground-truth reward of the stored texts
    recomputed = sentiment_reward([r["chosen"] for r in rows] + [r["rejected"] for r in rows])
    stored = [r["chosen_reward"] for r in rows] + [r["rejected_reward"] for r in rows]
    assert recomputed == pytest.approx(stored, abs=1e-6)


@pytest.mark.skipif(not (DATA / "test.jsonl").is_file(), reason="data/sentiment not built")
def test_built_dataset_splits_disjoint():
    subjects = {
        split: {
            json.loads(line)["subject"]
            for line in (DATA / f"{split}.jsonl").read_text(encoding="utf-8").split("\n")
            if line.strip()
        }
        for split in ("train", "test")
    }
    assert not subjects["train"] & subjects["test"]
