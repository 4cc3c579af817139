"""``trainer.reference=precompute``'s disk cache when runs start side by side on a cold cache: one scores (with
``LBDPO_REFERENCE_THREADS`` threads), the others wait on its lock and read what it wrote."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from datasets import Dataset

from lbdpo.data.collator import PreferenceCollator
from lbdpo.train.reference import add_reference_columns, reference_cache_key


def test_runs_side_by_side_score_a_cold_cache_once(tmp_path, monkeypatch):
    monkeypatch.setenv("LBDPO_CACHE", str(tmp_path))
    monkeypatch.setenv("LBDPO_REFERENCE_THREADS", "3")
    data = Dataset.from_list([{"prompt_input_ids": [1, 2, i + 3], "chosen_input_ids": [4, i], "rejected_input_ids": [5]}
                              for i in range(6)])
    calls, threads_seen = [], []

    def score(batch):  # a slow reference: (chosen, rejected) log-probs from the token ids
        calls.append(1)
        threads_seen.append(torch.get_num_threads())
        time.sleep(0.2)
        ids = batch["input_ids"].float() * batch["attention_mask"]
        n = len(batch["prompt_lengths"])
        return -ids[:n].sum(1), -ids[n:].sum(1)

    threads_before = torch.get_num_threads()
    results = [None, None]

    def run(i):
        results[i] = add_reference_columns(score, data, {"model": "fake"}, PreferenceCollator(0), 4,
                                           torch.device("cpu"), name="train")

    workers = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(calls) == 2  # 6 pairs in batches of 4, scored once (not once per run)
    assert threads_seen == [3, 3] and torch.get_num_threads() == threads_before
    assert results[0]["reference_chosen_logps"] == results[1]["reference_chosen_logps"]
    assert results[0]["reference_rejected_logps"] == [-(5 + 1 + 2 + i + 3) for i in range(6)]
    assert len(list((tmp_path / "reference_logps").glob("*.pt"))) == 1 and not list(tmp_path.rglob("*.tmp"))


def fake_score(calls):
    """A reference whose log-probs are a function of each row's token ids (minus their sum); counts scored pairs."""
    def score(batch):
        n = len(batch["prompt_lengths"])
        calls.append(n)
        ids = batch["input_ids"].float() * batch["attention_mask"]
        return -ids[:n].sum(1), -ids[n:].sum(1)
    return score


def make_pairs(ids):
    return Dataset.from_list([{"prompt_input_ids": [1, i], "chosen_input_ids": [4, i, i], "rejected_input_ids": [5]}
                              for i in ids])


def test_store_is_per_pair_order_and_split_free(tmp_path, monkeypatch):
    """Pairs scored once are read back in any order and any subset (another seed's split); only new pairs are
    scored; each value equals the pair's own brute-force score; another model config is a miss."""
    monkeypatch.setenv("LBDPO_CACHE", str(tmp_path))
    calls = []
    add = lambda data, model="fake": add_reference_columns(fake_score(calls), data, {"model": model},  # noqa: E731
                                                           PreferenceCollator(0), 4, torch.device("cpu"), name="t")
    add(make_pairs(range(6)))
    assert sum(calls) == 6
    calls.clear()
    out = add(make_pairs([5, 3, 7, 0, 8]))  # reordered, a subset, two new pairs
    assert sum(calls) == 2
    assert out["reference_chosen_logps"] == [-(1 + i + 4 + 2 * i) for i in [5, 3, 7, 0, 8]]
    assert out["reference_rejected_logps"] == [-(1 + i + 5) for i in [5, 3, 7, 0, 8]]
    calls.clear()
    add(make_pairs([8, 7, 1]))
    assert sum(calls) == 0
    add(make_pairs([1, 2]), model="other")
    assert sum(calls) == 2
    assert len(list((tmp_path / "reference_logps").glob("*.pairs.pt"))) == 2


def test_a_whole_dataset_cache_file_of_an_earlier_version_is_read(tmp_path, monkeypatch):
    monkeypatch.setenv("LBDPO_CACHE", str(tmp_path))
    data = make_pairs(range(3))
    (tmp_path / "reference_logps").mkdir()
    legacy = torch.tensor([[-1.0, -2.0], [-3.0, -4.0], [-5.0, -6.0]])
    torch.save(legacy, tmp_path / "reference_logps" / f"{reference_cache_key({'model': 'fake'}, data)}.pt")
    calls = []
    out = add_reference_columns(fake_score(calls), data.select([2, 0, 1]).flatten_indices(), {"model": "fake"},
                                PreferenceCollator(0), 4, torch.device("cpu"), name="t")
    assert sum(calls) == 3  # another order is another legacy key: scored, then in the store
    calls.clear()
    torch.save(legacy, tmp_path / "reference_logps" / f"{reference_cache_key({'model': 'old'}, data)}.pt")
    out = add_reference_columns(fake_score(calls), data, {"model": "old"}, PreferenceCollator(0), 4,
                                torch.device("cpu"), name="t")
    assert sum(calls) == 0 and out["reference_chosen_logps"] == [-1.0, -3.0, -5.0]
    out = add_reference_columns(fake_score(calls), data.select([1]), {"model": "old"}, PreferenceCollator(0), 4,
                                torch.device("cpu"), name="t")  # now in the store, per pair
    assert sum(calls) == 0 and out["reference_rejected_logps"] == [-4.0]


@pytest.mark.parametrize("trainer,pairs,expected", [
    ({"max_steps": 60, "num_epochs": None, "batch_size": 4, "gradient_accumulation_steps": 1}, 1749, "copy"),
    ({"max_steps": None, "num_epochs": 1, "batch_size": 4, "gradient_accumulation_steps": 1}, 1749, "precompute"),
    ({"max_steps": 219, "num_epochs": None, "batch_size": 4, "gradient_accumulation_steps": 2}, 1749, "precompute"),
    ({"max_steps": 218, "num_epochs": None, "batch_size": 4, "gradient_accumulation_steps": 2}, 1749, "copy"),
])
def test_auto_precomputes_only_when_the_run_reads_the_whole_split(trainer, pairs, expected):
    from lbdpo.train.reference import resolve_reference_mode

    assert resolve_reference_mode({"reference": "auto", **trainer}, pairs) == expected
    for mode in ("copy", "precompute", "adapter_disabled"):  # explicit modes are kept
        assert resolve_reference_mode({"reference": mode, **trainer}, pairs) == mode
    if expected == "copy":  # more processes read more pairs a step
        assert resolve_reference_mode({"reference": "auto", **trainer}, pairs, processes=8) == "precompute"
