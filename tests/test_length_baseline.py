"""The longer-reply baseline (lbdpo.eval.length_baseline): the rule, conversations, per-domain counts on a local file
against a hand count, and the one-line error for an unknown data group."""

import json

import pytest

from lbdpo.eval import length_baseline as lb


def test_the_rule_counts_characters_and_reads_conversations():
    assert lb.longer_wins("abcd", "abc") == 1.0 and lb.longer_wins("ab", "abc") == 0.0 and lb.longer_wins("x", "y") == 0.5
    chosen = [{"role": "assistant", "content": "héllo wörld"}]  # 11 characters, not 13 bytes
    assert lb.reply_text(chosen) == "héllo wörld"
    assert lb.longer_wins(chosen, "x" * 12) == 0.0 and lb.longer_wins(chosen, "x" * 10) == 1.0


def test_per_domain_accuracy_matches_a_hand_count(tmp_path, monkeypatch):
    rows = [("a", "long reply", "short"), ("b", "s", "longer"), ("c", "same", "size"),  # domain x: 1, 0, ½
            ("d", "much longer reply", "no"), ("e", "yes!", "no")]                       # domain y: 1, 1
    files = {}
    for domain, part in (("x", rows[:3]), ("y", rows[3:])):
        path = tmp_path / f"{domain}.jsonl"
        path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in part))
        files[domain] = str(path)
    data = {"train": [], "eval": [{"path": files["x"], "domain": "x"}, {"path": files["y"], "domain": "y"}],
            "eval_fraction": None, "eval_size": None}
    monkeypatch.setattr(lb, "data_config", lambda name, seed: data)
    out = lb.baseline("local", [0, 1])
    assert out["x"]["acc"] == [pytest.approx(1.5 / 3)] * 2 and out["x"]["pairs"] == [3, 3]
    assert out["y"]["acc"] == [1.0, 1.0] and out["all"]["acc"] == [pytest.approx(3.5 / 5)] * 2
    assert "| local | x | 3 | 0.500 [0.500, 0.500] |" in lb.markdown({"local": out}, [0, 1])


def test_an_unknown_data_group_is_one_line_naming_the_options(capsys):
    with pytest.raises(SystemExit) as stop:
        lb.main(["no_such_data", "--seeds", "0"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert "data=no_such_data" in err and "sentiment" in err
