"""`python -m lbdpo.data.check` (src/lbdpo/data/check.py): the same counts as the training loader and tokenizer (checked
against them row by row), every skipped row listed with its line, bad input (malformed JSON, non-UTF-8, a missing or
unknown file, an empty or all-skipped file) reported per file without a traceback, an exit code ≠ 0 when a file is
unusable; the training loader's messages that recommend the command."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter

import pytest

from conftest import REPO_ROOT, SHARED_PREFERENCE_DIR
from lbdpo.data import load_mixture, load_preference_pairs, load_preference_pairs_with_report
from lbdpo.data.check import check_file
from lbdpo.data.sources import read_local_located
from lbdpo.data.tokenize import TokenizeConfig, tokenize_pairs
from lbdpo.errors import LbdpoError

CFG = TokenizeConfig(prompt_format="chat", max_length=48, max_prompt_length=32)
# row kinds: (row, loader skip reason or None); "long" rows are identical within the first 48 tokens
KINDS = [
    ({"prompt": "Fine?", "chosen": "yes", "rejected": "no"}, None),
    ({"prompt": "Same?", "chosen": "x", "rejected": " x "}, "chosen_equals_rejected"),
    ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "empty_prompt"),
    ({"prompt": "Empty?", "chosen": "", "rejected": "b"}, "empty_response"),
    ({"prompt": "Number?", "chosen": 3, "rejected": "b"}, "not_a_string"),
    ({"prompt": "Null?", "chosen": None, "rejected": "b"}, "missing_field"),
    ({"prompt": "Long?", "chosen": "a " * 60 + "X", "rejected": "a " * 60 + "Y"}, None),  # identical_after_truncation
]


def write_rows(path, rows, blank_every: int = 0) -> dict[int, int]:
    """Writes JSON lines (a blank line after every ``blank_every``-th row); returns {row index: line number}."""
    lines, where = [], {}
    for i, row in enumerate(rows):
        lines.append(json.dumps(row))
        where[i] = len(lines)
        if blank_every and i % blank_every == blank_every - 1:
            lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return where


def loader_and_tokenizer_counts(path, tokenizer):
    """What training sees: the loader's report and the tokenizer's skips and cuts."""
    ds, report = load_preference_pairs_with_report(path)
    cut = Counter()
    tokenized, skips = tokenize_pairs(ds, tokenizer, CFG, truncated=cut)
    return report, dict(skips), dict(cut), len(tokenized)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_counts_and_rows_match_the_training_loader(tmp_path, tiny_model_and_tokenizer, seed):
    tok = tiny_model_and_tokenizer[1]
    rng = random.Random(seed)
    picks = [rng.randrange(len(KINDS)) for _ in range(40)]
    rows = [{**KINDS[k][0], "prompt": KINDS[k][0]["prompt"] + ("" if k == 2 else f" #{i}")}
            for i, k in enumerate(picks)]
    path = tmp_path / "pairs.jsonl"
    where = write_rows(path, rows, blank_every=rng.randint(2, 5))
    result = check_file(path, tok, CFG)
    report, tok_skips, cut, pairs = loader_and_tokenizer_counts(path, tok)
    assert result["rows_in"] == report.rows_in == len(rows)
    assert result["loader_skips"] == {k: v for k, v in report.skipped.items() if v}
    assert result["tokenizer_skips"] == tok_skips and result["truncated"] == cut and result["pairs"] == pairs
    # every skipped row, by its line in the file, recomputed from what was written
    expected = [(str(where[i]), KINDS[k][1] or "identical_after_truncation") for i, k in enumerate(picks)
                if KINDS[k][1] or k == 6]
    assert result["skipped_rows"] == expected
    assert pairs == sum(1 for k in picks if k == 0)
    mostly_cut = cut.get("pairs_cut", 0) > pairs / 2  # SmolLM2's template has a system prompt: prompts > 32 tokens
    assert result["status"] == ("ok, but most pairs are cut by truncation: raise data.max_length / "
                                "data.max_prompt_length" if mostly_cut else "ok" if pairs else
                                f"unusable: all {len(rows)} rows skipped (--rows lists them)")


def test_json_list_and_csv_rows_are_located(tmp_path, tiny_model_and_tokenizer):
    tok = tiny_model_and_tokenizer[1]
    listed = tmp_path / "pairs.json"
    listed.write_text('[\n  {"prompt": "a?", "chosen": "b", "rejected": "c"},\n\n  {"prompt": "a?", "chosen": "b",\n'
                      '   "rejected": "b"},  {"prompt": "q?", "chosen": "", "rejected": "y"}\n]\n')
    assert read_local_located(listed, set()).where == ["2", "4", "5"]
    result = check_file(listed, tok, CFG)
    assert result["skipped_rows"] == [("4", "chosen_equals_rejected"), ("5", "empty_response")]
    assert result["pairs"] == 1 and result["status"] == "ok"
    table = tmp_path / "pairs.csv"
    table.write_text("prompt,chosen,rejected\nq1?,a,b\nq2?,same,same\nq3?,c,d\n")
    result = check_file(table, tok, CFG)
    assert result["skipped_rows"] == [("row 2", "chosen_equals_rejected")] and result["pairs"] == 2
    assert len(load_preference_pairs(table)) == 2


def test_all_rows_skipped_is_reported_not_a_crash(tmp_path, tiny_model_and_tokenizer):
    """Issue 41's probe: every row has chosen == rejected. The checker used to fail with `Column 'skip_reason'
    doesn't exist`; training names the file and recommends the checker with --rows, which lists every row."""
    path = tmp_path / "same.jsonl"
    write_rows(path, [{"prompt": f"p{i}", "chosen": "same", "rejected": "same"} for i in range(5)])
    result = check_file(path, tiny_model_and_tokenizer[1], CFG)
    assert result["status"] == "unusable: all 5 rows skipped (--rows lists them)"
    assert result["skipped_rows"] == [(str(i), "chosen_equals_rejected") for i in range(1, 6)]
    with pytest.raises(LbdpoError, match=r"same\.jsonl: no usable preference pairs .*chosen_equals_rejected=5.*"
                                         r"`python -m lbdpo\.data\.check FILE --rows` lists the bad rows"):
        load_mixture([{"path": str(path)}])


def test_malformed_line_message_says_what_to_do(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": \n')
    with pytest.raises(LbdpoError) as err:
        load_preference_pairs(path)
    message = str(err.value)
    assert message.startswith(f"{path}:2: malformed JSON line")
    assert "fix or remove the line; `python -m lbdpo.data.check FILE --rows` lists them" in message
    assert "\n" not in message


def test_unreadable_lines_are_listed_and_the_rest_counted(tmp_path, tiny_model_and_tokenizer):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"prompt": "a?", "chosen": "b", "rejected": "c"}\n{"prompt": "caf\xe9", "chosen": "b"}\n'
                     b'{not json}\n{"prompt": "d?", "chosen": "e", "rejected": "e"}\n')
    result = check_file(path, tiny_model_and_tokenizer[1], CFG)
    assert [w for w, _ in result["skipped_rows"]] == ["2", "3", "4"]
    assert result["skipped_rows"][0][1].startswith("not UTF-8")
    assert result["skipped_rows"][1][1].startswith("malformed JSON line")
    assert result["skipped_rows"][2][1] == "chosen_equals_rejected"
    assert result["rows_in"] == 2 and result["pairs"] == 1
    assert result["status"].startswith("unusable: 2 unreadable line(s), the first line 2: not UTF-8")
    with pytest.raises(LbdpoError, match="not UTF-8"):  # what training does with it
        load_preference_pairs(path)


def test_a_byte_order_mark_is_read_as_training_reads_it(tmp_path, tiny_model_and_tokenizer):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a?", "chosen": "b", "rejected": "c"}\n')
    assert len(load_preference_pairs(path)) == 1
    assert check_file(path, tiny_model_and_tokenizer[1], CFG)["pairs"] == 1


def test_empty_csv_is_one_line_in_training_too(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("")
    with pytest.raises(LbdpoError, match=r"empty\.csv: cannot be read as a \.csv file \(EmptyDataError"):
        load_preference_pairs(path)


@pytest.mark.skipif(not SHARED_PREFERENCE_DIR.is_dir(), reason="needs ../shared/data/preference")
def test_shared_file_counts_match_training(tiny_model_and_tokenizer):
    tok = tiny_model_and_tokenizer[1]
    path = SHARED_PREFERENCE_DIR / "pandalm_testset_pairs.jsonl"
    result = check_file(path, tok, CFG)
    report, tok_skips, cut, pairs = loader_and_tokenizer_counts(path, tok)
    assert result["loader_skips"] == {k: v for k, v in report.skipped.items() if v}
    assert (result["tokenizer_skips"], result["truncated"], result["pairs"]) == (tok_skips, cut, pairs)
    assert len(result["skipped_rows"]) == report.rows_skipped + sum(tok_skips.values())
    rows = path.read_text().split("\n")
    for where, reason in result["skipped_rows"]:
        if reason == "not_a_string":  # the file's `chosen: true` rows, by their line
            assert json.loads(rows[int(where) - 1])["chosen"] is True


def run_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lbdpo.data.check", "--model", "tiny_random", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)


def test_command_checks_every_file_and_never_crashes(tmp_path):
    good = tmp_path / "good.jsonl"
    write_rows(good, [{"prompt": "q?", "chosen": "a", "rejected": "b"}, {"prompt": "r?", "chosen": "c", "rejected": "c"}])
    bad = {"malformed.jsonl": b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{oops\n',
           "latin1.jsonl": '{"prompt": "café", "chosen": "b", "rejected": "c"}\n'.encode("latin-1"),
           "empty.jsonl": b"", "notes.txt": b"hello", "same.jsonl": b'{"prompt": "p", "chosen": "s", "rejected": "s"}\n',
           "list.json": b'[{"prompt": "a", "chosen": "b"', "ints.json": b"[1, 2]", "empty.csv": b""}
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "nodata").mkdir()
    paths = [tmp_path / name for name in bad] + [tmp_path / "missing.jsonl", tmp_path / "nodata", good]
    out = run_check(*paths, "--rows")
    assert "Traceback" not in out.stdout + out.stderr, out.stderr[-3000:]
    assert out.returncode == 1
    table = {line.split(" | ")[0].lstrip("| "): line for line in out.stdout.splitlines() if line.startswith("| ")}
    for name in [*bad, "missing.jsonl", "nodata"]:
        assert "| unusable: " in table[name], (name, table.get(name))
    assert table["good.jsonl"].endswith("| 1 | none | ok |")
    assert "empty (no rows)" in table["empty.jsonl"] and "all 1 rows skipped" in table["same.jsonl"]
    assert "unsupported file type" in table["notes.txt"] and "not found" in table["missing.jsonl"]
    for line in (f"{tmp_path / 'malformed.jsonl'}:2: malformed JSON line", f"{tmp_path / 'latin1.jsonl'}:1: not UTF-8",
                 f"{tmp_path / 'same.jsonl'}:1: chosen_equals_rejected", f"{good}:2: chosen_equals_rejected"):
        assert line in out.stdout, line
    assert "10 of 11 file(s) unusable for training" in out.stderr
    ok = run_check(good)
    assert ok.returncode == 0 and "| good.jsonl | 2 | chosen_equals_rejected 1 | none | 1 | none | ok |" in ok.stdout


@pytest.mark.parametrize("args,message", [
    (["--columns", "prompt"], "error: --columns takes OURS=THEIRS pairs"),
    (["--max-length", "4", "--max-prompt-length", "8"], "error: data.max_prompt_length=8 must be"),
])
def test_bad_options_are_one_line_exit_2(tmp_path, args, message):
    out = run_check(tmp_path / "x.jsonl", *args)
    assert out.returncode == 2 and out.stderr.startswith(message) and out.stderr.count("\n") == 1, out.stderr
