"""data.label_noise (src/lbdpo/data/label_noise.py): a seeded fraction of one domain's training pairs flipped, the
held-out pairs untouched, validated before loading, counted in the banner."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset
from hydra import compose, initialize_config_dir

from conftest import REPO_ROOT
from lbdpo.build import build_datasets
from lbdpo.data.label_noise import apply_label_noise, flipped_indices, parse_label_noise
from lbdpo.errors import LbdpoError
from lbdpo.train.trainer import train

CONF = str(REPO_ROOT / "conf")
DOMAINS = ("en", "fr", "zh")


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """60 pairs, 20 per domain, every prompt distinct; each row says which response its rewards favour."""
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps({
        "prompt": f"Prompt number {i}?", "chosen": f"good answer {i}", "rejected": f"bad {i}",
        "chosen_reward": 1.0, "rejected_reward": -1.0, "chosen_finished": i % 2 == 0, "rejected_finished": True,
        "domain": DOMAINS[i % 3]}) + "\n" for i in range(60)))
    return path


def data_cfg(pairs_file, *overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=["model=tiny_random", "data=jsonl", f"data.path={pairs_file}",
                                            "data.max_length=48", "data.max_prompt_length=32", "data.eval_size=15",
                                            "data.eval_fraction=null", *overrides])


def build(pairs_file, tokenizer, seed, *overrides):
    cfg = data_cfg(pairs_file, *overrides)
    return build_datasets(cfg.data, tokenizer, seed=seed)


def flipped_prompts(ds) -> set[str]:
    return {r["prompt"] for r in ds if r["chosen"].startswith("bad")}


def test_flips_exactly_that_many_of_one_domains_training_pairs(pairs_file, tiny_model_and_tokenizer):
    tokenizer = tiny_model_and_tokenizer[1]
    clean_train, clean_eval, _ = build(pairs_file, tokenizer, 0)
    train_ds, eval_ds, report = build(pairs_file, tokenizer, 0, "data.label_noise={domain: fr, fraction: 0.4}")
    n_fr = sum(d == "fr" for d in clean_train["domain"])
    assert n_fr not in (0, 20) and report["label_noise"] == {"domain": "fr", "fraction": 0.4, "domain_pairs": n_fr,
                                                             "flipped": int(0.4 * n_fr + 0.5)}
    assert clean_train["prompt"] == train_ds["prompt"]  # same pairs, same order
    flipped = [i for i, (a, b) in enumerate(zip(clean_train, train_ds)) if a["chosen"] != b["chosen"]]
    assert len(flipped) == report["label_noise"]["flipped"]
    for i in flipped:  # every chosen… column swapped with its rejected… partner, nothing else touched
        a, b = clean_train[i], train_ds[i]
        assert b["domain"] == "fr"
        for col in ("", "_input_ids", "_reward", "_finished"):
            assert (b[f"chosen{col}"], b[f"rejected{col}"]) == (a[f"rejected{col}"], a[f"chosen{col}"]), col
        assert b["prompt_input_ids"] == a["prompt_input_ids"]
    unflipped = [i for i in range(len(train_ds)) if i not in set(flipped)]
    assert [train_ds[i] for i in unflipped] == [clean_train[i] for i in unflipped]
    assert eval_ds.to_list() == clean_eval.to_list() and not flipped_prompts(eval_ds)  # held-out pairs stay clean


def test_same_seed_same_pairs_another_seed_others(pairs_file, tiny_model_and_tokenizer):
    tokenizer = tiny_model_and_tokenizer[1]
    noise = "data.label_noise={domain: zh, fraction: 0.5}"
    first, again, other = (flipped_prompts(build(pairs_file, tokenizer, seed, noise)[0]) for seed in (0, 0, 1))
    assert first == again and first != other
    assert len(first) > 0 and len(other) > 0


@pytest.mark.parametrize("fraction, expected", [(0.0, 0), (0.1, 1), (0.25, 3), (0.5, 5), (0.99, 10), (1.0, 10)])
def test_count_is_fraction_of_the_domain_rounded_half_up(fraction, expected):
    domains = ["a", "b"] * 10  # 10 pairs of domain b
    picked = flipped_indices(domains, "b", fraction, seed=3)
    assert len(picked) == expected == len(set(picked)) and all(domains[i] == "b" for i in picked)
    ds = Dataset.from_dict({"prompt": [str(i) for i in range(20)], "chosen": ["c"] * 20, "rejected": ["r"] * 20,
                            "domain": domains})
    noisy, report = apply_label_noise(ds, {"domain": "b", "fraction": fraction}, seed=3)
    assert [i for i, c in enumerate(noisy["chosen"]) if c == "r"] == picked and report["flipped"] == expected
    assert apply_label_noise(ds, None, seed=3) == (ds, None)


@pytest.mark.parametrize("value, key", [
    ({"domain": "fr", "fraction": 1.5}, "data.label_noise.fraction"),
    ({"domain": "fr", "fraction": -0.1}, "data.label_noise.fraction"),
    ({"domain": "fr", "fraction": True}, "data.label_noise.fraction"),
    ({"domain": "", "fraction": 0.4}, "data.label_noise.domain"),
    ({"domain": "fr"}, "data.label_noise"),
    ({"domain": "fr", "fraction": 0.4, "seed": 1}, "data.label_noise"),
    (0.4, "data.label_noise"),
])
def test_bad_values_name_the_key(value, key):
    with pytest.raises(LbdpoError, match=key.replace(".", r"\.")):
        parse_label_noise(value)
    assert parse_label_noise({"domain": "fr", "fraction": 1}) == ("fr", 1.0)


def test_a_bad_option_fails_before_loading_and_an_unknown_domain_on_load(pairs_file, tiny_model_and_tokenizer,
                                                                            tmp_path, monkeypatch):
    import lbdpo.train.setup as setup_module

    with pytest.raises(LbdpoError, match=r"data\.label_noise\.domain='de': no training pair has that domain; the "
                                         r"training domains are \['en', 'fr', 'zh'\]"):
        build(pairs_file, tiny_model_and_tokenizer[1], 0, "data.label_noise={domain: de, fraction: 0.4}")
    monkeypatch.setattr(setup_module, "build_model_and_data", lambda *a, **k: pytest.fail("loaded before checking"))
    cfg = data_cfg(pairs_file, "trainer=tiny", "logger=none", "data.label_noise={domain: fr, fraction: 2}")
    with pytest.raises(LbdpoError, match=r"data\.label_noise\.fraction=2"):
        train(cfg, tmp_path / "run")


def test_the_banner_counts_the_flipped_pairs(pairs_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # one line per row of the rich table
    cfg = data_cfg(pairs_file, "trainer=tiny", "logger=none", "trainer.max_steps=1", "trainer.eval_every=0",
                   "data.eval_size=null", "data.label_noise={domain: en, fraction: 0.4}")
    train(cfg, tmp_path / "run")
    assert "8 of 20 en training pairs flipped (fraction 0.4); eval pairs clean" in capsys.readouterr().out
