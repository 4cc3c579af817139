"""The built-in ``sentiment`` data set: the reward, the generator script (``scripts/make_sentiment.py``: prompts,
pair selection, cache, sampling with a tiny random model) and the shipped files.

All fast: no test loads SmolLM2's weights (the sampling test uses the tiny random Qwen2 of conftest.py).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import types
from collections import Counter
from pathlib import Path

import pytest
import torch

from lbdpo.eval.rewards import sentiment_reward

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "sentiment"
SCRIPT = REPO / "scripts" / "make_sentiment.py"
DOMAINS = ("en_plain", "en_garbled", "zh", "fr")
ROW_KEYS = {"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward", "chosen_finished", "rejected_finished",
            "domain", "subject", "template_id"}
SHIPPED = ["--seed", "0", "--num-train", "2000", "--num-test", "300", "--max-new-tokens", "20", "--batch-size", "64"]
shipped_data = pytest.mark.skipif(not (DATA / "samples" / "train.jsonl").is_file(), reason="data/sentiment not built")


@pytest.fixture(scope="module")
def ms():
    """The generator script, imported from its path."""
    spec = importlib.util.spec_from_file_location("make_sentiment", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def key(p) -> tuple[str, str]:
    return (p.template_id, p.subject)


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
# prompts
# --------------------------------------------------------------------------------------------------


def test_subjects_and_templates_are_well_formed(ms):
    subjects, templates = ms.load_tables()
    assert len(subjects) == 240
    for lang in ("en", "fr", "zh"):
        assert len({getattr(s, lang) for s in subjects}) == len(subjects)
    assert len({t.id for t in templates}) == len(templates) == 48
    assert Counter(t.domain for t in templates) == {d: 12 for d in DOMAINS}
    for t in templates:  # every template renders every subject, and names it
        for s in subjects:
            text = ms.render(t, s)
            assert "{" not in text and text.strip()
            assert any(name in text for name in (s.en, s.en.upper(), s.en.split(" ", 1)[-1], s.fr, s.zh))
    assert ms.render(templates[0], subjects[0]) == "Write a short review of a pair of wireless earbuds."


def test_prompts_sizes_disjoint_and_balanced(ms):
    prompts = ms.build_prompts(seed=0, num_train=2000, num_test=300)
    train, test = prompts["train"], prompts["test"]
    assert len(train) == 2000 and len(test) == 300
    assert len({key(p) for p in train}) == len(train) and len({key(p) for p in test}) == len(test)
    assert not {p.subject for p in train} & {p.subject for p in test}  # hence no shared (template, subject)
    for split in (train, test):
        assert Counter(p.domain for p in split) == {d: len(split) // 4 for d in DOMAINS}
        assert all(p.template_id.startswith(p.domain) for p in split)
    assert {p.template_id for p in train} == {p.template_id for p in test} and len({p.template_id for p in test}) == 48
    assert Counter(p.domain for p in ms.build_prompts(0, 10, 6)["train"]) == {"en_plain": 3, "en_garbled": 3, "zh": 2,
                                                                             "fr": 2}


def test_prompts_deterministic_seed_dependent_and_growing(ms):
    a = ms.build_prompts(seed=0, num_train=400, num_test=80)
    assert a == ms.build_prompts(seed=0, num_train=400, num_test=80)
    assert a != ms.build_prompts(seed=1, num_train=400, num_test=80)
    # a larger --num-train keeps the smaller run's prompts (so cached samples are reused)
    big = ms.build_prompts(seed=0, num_train=800, num_test=80)
    assert {key(p) for p in a["train"]} <= {key(p) for p in big["train"]} and a["test"] == big["test"]


def test_too_many_prompts_is_an_error(ms):
    with pytest.raises(ValueError, match="pairs"):
        ms.build_prompts(seed=0, num_train=10, num_test=100_000)


@shipped_data
@pytest.mark.parametrize("split", ["train", "test"])
def test_build_prompts_reproduces_shipped_data(ms, split):
    """The shipped samples are exactly the prompts of seed 0 / 2000 / 300, and the shipped pairs are those
    prompts minus the skipped ones, in the same order."""
    prompts = ms.build_prompts(seed=0, num_train=2000, num_test=300)[split]
    samples = read_rows(DATA / "samples" / f"{split}.jsonl")[1:]
    fields = ("prompt", "domain", "subject", "template_id")
    assert sorted(tuple(r[f] for f in fields) for r in samples) == sorted(tuple(p) for p in prompts)
    rows = [tuple(r[f] for f in fields) for r in read_rows(DATA / f"{split}.jsonl")]
    it = iter(tuple(p) for p in prompts)
    assert all(row in it for row in rows)  # an ordered subsequence
    assert len(rows) == {"train": 1749, "test": 259}[split]


# --------------------------------------------------------------------------------------------------
# pairs, files, cache
# --------------------------------------------------------------------------------------------------


def test_select_pair_and_skips(ms):
    assert ms.select_pair(["a", "b", "c"], [0.1, 0.9, -0.5]) == (1, 2)
    assert ms.select_pair(["a", "b"], [0.0, 0.0]) == "tie"
    assert ms.select_pair(["", "b", " "], [0.9, 0.1, -0.9]) == "too_few_nonempty"
    assert ms.select_pair(["", "b", "c"], [0.9, 0.1, -0.9]) == (1, 2)  # empty samples never win


def test_json_line_escapes_unicode_line_breaks(ms, tmp_path):
    rows = [{"chosen": "a\u2028b\x85c\u2029d 中文 é", "n": 1}, {"chosen": "x\ny"}]
    assert all(len(ms.json_line(r).splitlines()) == 1 for r in rows)
    assert "中文" in ms.json_line(rows[0])  # non-ASCII stays readable
    ms.write_jsonl(tmp_path / "x.jsonl", rows)
    assert [json.loads(line) for line in ms.read_jsonl_lines(tmp_path / "x.jsonl")] == rows
    assert not list(tmp_path.glob("*.tmp"))


def test_generation_order(ms):
    lengths = [5, 1, 4, 2, 3, 9]
    assert ms.generation_order(lengths, [0, 1, 2, 3, 4, 5], batch_size=1, window_batches=3) == [1, 2, 0, 3, 4, 5]


def test_load_cache_drops_cut_line_and_rejects_other_settings(ms, tmp_path):
    path, header = tmp_path / "c.jsonl", {"seed": 0}
    rec = {"template_id": "t", "subject": "s", "samples": []}
    path.write_text(ms.json_line(header) + ms.json_line(rec) + '{"template_id": "u", "sub', encoding="utf-8")
    assert ms.load_cache(path, header) == {("t", "s"): rec}
    assert ms.load_cache(tmp_path / "missing.jsonl", header) == {}
    with pytest.raises(SystemExit, match="other settings"):
        ms.load_cache(path, {"seed": 1})


def _no_model(monkeypatch, load):
    """Replace lbdpo.models (imported inside the script's main) by a stub with ``load``."""
    stub = types.ModuleType("lbdpo.models")
    stub.load_model_and_tokenizer = load
    monkeypatch.setitem(sys.modules, "lbdpo.models", stub)


@shipped_data
def test_cached_rerun_is_byte_identical_without_a_model(ms, tmp_path, monkeypatch):
    out = tmp_path / "sentiment"
    shutil.copytree(DATA, out)
    _no_model(monkeypatch, lambda cfg: pytest.fail("a fully cached rerun must not load a model"))
    ms.main([*SHIPPED, "--out", str(out)])
    for rel in ["train.jsonl", "test.jsonl", "README.md", "samples/train.jsonl", "samples/test.jsonl"]:
        assert (out / rel).read_bytes() == (DATA / rel).read_bytes(), rel


@shipped_data
def test_rerun_samples_only_the_missing_prompts(ms, tmp_path, monkeypatch):
    """Samples cut from the cache (e.g. by a kill) are drawn again, and only they; the others are reused."""
    out = tmp_path / "sentiment"
    shutil.copytree(DATA, out)
    (out / "train.jsonl").unlink()
    lines = (out / "samples" / "test.jsonl").read_text(encoding="utf-8").split("\n")
    missing = [json.loads(line)["prompt"] for line in lines[-6:-1]]
    (out / "samples" / "test.jsonl").write_text("\n".join(lines[:-6]) + "\n" + lines[-6][:30], encoding="utf-8")
    asked = []

    def fake_sample(model, tokenizer, prompts, k, max_new_tokens, temperature):
        asked.extend(prompts)
        return [[("I love it, wonderful!", True), ("awful, terrible", False)] + [("ok", True)] * (k - 2)] * len(prompts)

    _no_model(monkeypatch, lambda cfg: ("model", "tokenizer"))
    monkeypatch.setattr(ms, "sample", fake_sample)
    monkeypatch.setattr(ms, "chat_ids", lambda tokenizer, prompt: list(range(len(prompt))))
    ms.main([*SHIPPED, "--out", str(out), "--batch-size", "2"])
    assert sorted(asked) == sorted(missing)
    assert (out / "train.jsonl").read_bytes() == (DATA / "train.jsonl").read_bytes()
    samples = read_rows(out / "samples" / "test.jsonl")
    assert len(samples) == 301 and samples[:-5] == read_rows(DATA / "samples" / "test.jsonl")[:-5]
    redrawn = {r["prompt"]: r for r in samples[-5:]}
    assert set(redrawn) == set(missing)
    assert all(r["rewards"][0] > 0 > r["rewards"][1] and r["finished"][:2] == [True, False] for r in redrawn.values())
    pairs = {r["prompt"]: r for r in read_rows(out / "test.jsonl")}
    assert all(pairs[p]["chosen"] == "I love it, wonderful!" and not pairs[p]["rejected_finished"] for p in missing)


# --------------------------------------------------------------------------------------------------
# sampling (tiny random model, real tokenizer)
# --------------------------------------------------------------------------------------------------


def test_sample_left_pads_like_plain_generate(ms, tiny_model_and_tokenizer):
    """A near-greedy batched draw (prompts of different lengths, left-padded, prompt pass cached outside
    generate) equals the same draw of each prompt alone and plain greedy ``generate``; no stop token in a sample."""
    model, tokenizer = tiny_model_and_tokenizer
    prompts = ["Write a short review of a cinema.", "ok so like, a webcam?? thoughts?? pls", "用一句话评价一家书店。"]
    assert len({len(ms.chat_ids(tokenizer, p)) for p in prompts}) == 3
    batched = ms.sample(model, tokenizer, prompts, k=2, max_new_tokens=6, temperature=1e-4)
    assert [len(per_prompt) for per_prompt in batched] == [2, 2, 2]
    for p, per_prompt in zip(prompts, batched):
        alone = ms.sample(model, tokenizer, [p], k=1, max_new_tokens=6, temperature=1e-4)
        assert per_prompt[0] == per_prompt[1] == alone[0][0]
        assert all(isinstance(text, str) and "<|im_end|>" not in text for text, _ in per_prompt)
        ids = torch.tensor([ms.chat_ids(tokenizer, p)])
        greedy = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                                pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1] :]
        assert per_prompt[0][0] == tokenizer.decode(greedy, skip_special_tokens=True).rstrip("\ufffd").strip()


def test_decode_cuts_at_the_stop_token(ms, tiny_model_and_tokenizer):
    tokenizer = tiny_model_and_tokenizer[1]
    hi, eos, pad = tokenizer(" hi there", add_special_tokens=False).input_ids, tokenizer.eos_token_id, 0
    assert ms.decode(tokenizer, [*hi, eos, pad, *hi], {eos}) == ("hi there", True)
    assert ms.decode(tokenizer, [eos, *hi], {eos}) == ("", True)
    assert ms.decode(tokenizer, hi, {eos}) == ("hi there", False)
    cut = tokenizer("好", add_special_tokens=False).input_ids  # a multi-byte character cut after its first token
    assert len(cut) > 1 and ms.decode(tokenizer, [*hi, cut[0]], {eos}) == ("hi there", False)


# --------------------------------------------------------------------------------------------------
# the shipped data set
# --------------------------------------------------------------------------------------------------


@shipped_data
@pytest.mark.parametrize("split", ["train", "test"])
def test_built_dataset_rows(split):
    path = DATA / f"{split}.jsonl"
    rows = read_rows(path)
    # JSONL readers that split on every Unicode line break (str.splitlines) see the same rows
    assert len([line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]) == len(rows)
    assert rows
    for r in rows:
        assert set(r) == ROW_KEYS
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


@shipped_data
def test_built_dataset_splits_disjoint():
    subjects = {split: {r["subject"] for r in read_rows(DATA / f"{split}.jsonl")} for split in ("train", "test")}
    assert not subjects["train"] & subjects["test"]
