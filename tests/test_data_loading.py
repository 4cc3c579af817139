"""Tests for lbdpo.data.loading: every input shape, filters, errors, mixtures and splits."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from lbdpo.data import (
    FilterReport,
    load_mixture,
    load_preference_pairs,
    load_preference_pairs_with_report,
    train_eval_split,
)
from lbdpo.data import loading

SHARED = Path(__file__).resolve().parents[1].parent / "shared/data/preference"
HH_FILES = ["hh_harmless-base_test.jsonl", "hh_helpful-online_test.jsonl", "hh_helpful-rejection-sampled_test.jsonl"]

PAIRS = [
    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "chosen_reward": 1.0},
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven.", "chosen_reward": 0.5},
    {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Rome", "chosen_reward": 0.9},
]
HH_CHOSEN = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Fine, thanks."
HH_REJECTED = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Go away."


def write_jsonl(path: Path, rows: list) -> Path:
    """Writes rows as JSON lines and returns the path."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def need_shared() -> Path:
    """The shared preference-data folder, or a skip where this checkout has none."""
    if not SHARED.is_dir():
        pytest.skip(f"shared data folder absent: {SHARED}")
    return SHARED


# --------------------------------------------------------------------------- file types and shapes


@pytest.mark.parametrize("suffix", [".jsonl", ".json-list", ".json-lines", ".csv", ".parquet"])
def test_every_file_type_loads_pairs_with_metadata(tmp_path, suffix):
    if suffix == ".jsonl":
        path = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    elif suffix == ".json-list":
        path = tmp_path / "p.json"
        path.write_text(json.dumps(PAIRS, indent=2))
    elif suffix == ".json-lines":
        path = write_jsonl(tmp_path / "p.json", PAIRS)
    else:
        path = tmp_path / f"p{suffix}"
        frame = datasets.Dataset.from_list(PAIRS)
        frame.to_csv(str(path), index=False) if suffix == ".csv" else frame.to_parquet(str(path))
    ds = load_preference_pairs(path)
    assert ds["prompt"] == [r["prompt"] for r in PAIRS]
    assert ds["chosen"] == [r["chosen"] for r in PAIRS]
    assert ds["rejected"] == [r["rejected"] for r in PAIRS]
    assert ds["chosen_reward"] == [1.0, 0.5, 0.9]
    assert ds["prompt_messages"] == [""] * 3 and ds["transcript_format"] == ["plain"] * 3


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    row = {"prompt": "line\u2028sep\x85", "chosen": "a\r\nb", "rejected": "c"}
    ds = load_preference_pairs(write_jsonl(tmp_path / "u.jsonl", [row, row]))
    assert ds["prompt"] == [row["prompt"]] * 2 and ds[0]["chosen"] == "a\r\nb"


def test_csv_keeps_numeric_looking_text_as_strings(tmp_path):
    path = tmp_path / "nums.csv"
    path.write_text("prompt,chosen,rejected\nWhat is 2+2?,4,5\n")
    ds = load_preference_pairs(path)
    assert ds[0]["chosen"] == "4" and ds[0]["rejected"] == "5"


def test_folder_concatenates_files_sorted_by_name(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", PAIRS[1:])
    write_jsonl(tmp_path / "a.jsonl", PAIRS[:1])
    (tmp_path / "notes.txt").write_text("ignored")
    ds, report = load_preference_pairs_with_report(tmp_path)
    assert ds["prompt"] == [r["prompt"] for r in PAIRS]
    assert [Path(p.source).name for p in report.parts] == ["a.jsonl", "b.jsonl"]
    assert report.rows_in == report.rows_kept == report.rows_out == 3


def test_column_mapping_and_design_doc_names(tmp_path):
    mapped = write_jsonl(tmp_path / "m.jsonl", [{"question": "Q?", "good": "yes", "bad": "no", "id": 7}])
    ds = load_preference_pairs(mapped, columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert (ds[0]["prompt"], ds[0]["chosen"], ds[0]["rejected"], ds[0]["id"]) == ("Q?", "yes", "no", 7)
    assert "question" not in ds.column_names
    design = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q?", "chosen_response": "yes", "rejected_response": "no"}])
    ds = load_preference_pairs(design)
    assert (ds[0]["chosen"], ds[0]["rejected"]) == ("yes", "no")
    assert "chosen_response" not in ds.column_names


def test_hh_transcripts_split_at_last_assistant_and_reconstruct_exactly(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}])
    row = load_preference_pairs(path)[0]
    assert row["prompt"] == "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant:"
    assert (row["chosen"], row["rejected"]) == (" Fine, thanks.", " Go away.")
    assert row["prompt"] + row["chosen"] == HH_CHOSEN and row["prompt"] + row["rejected"] == HH_REJECTED
    assert row["transcript_format"] == "hh"


def test_hh_rows_with_different_prompts_are_counted(tmp_path):
    rows = [
        {"chosen": HH_CHOSEN, "rejected": HH_REJECTED.replace("Hi there", "Hey")},
        {"chosen": "\n\nHuman: no assistant turn", "rejected": HH_REJECTED},
        {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
    ]
    ds, report = load_preference_pairs_with_report(write_jsonl(tmp_path / "hh.jsonl", rows))
    assert len(ds) == 1 and report.skipped["hh_prompt_mismatch"] == 2


def test_conversational_ultrafeedback_style(tmp_path):
    user = {"role": "user", "content": "Write a haiku."}
    row = {
        "prompt": "Write a haiku.",
        "chosen": [user, {"role": "assistant", "content": "Old pond, frog jumps in."}],
        "rejected": [user, {"role": "assistant", "content": "No."}],
        "score_chosen": 8.0,
    }
    mismatched = {**row, "rejected": [{"role": "user", "content": "Other."}, row["rejected"][1]]}
    ds, report = load_preference_pairs_with_report(write_jsonl(tmp_path / "uf.jsonl", [row, mismatched]))
    assert len(ds) == 1 and report.skipped["conversation_mismatch"] == 1
    out = ds[0]
    assert json.loads(out["prompt_messages"]) == [user]
    assert (out["prompt"], out["chosen"], out["rejected"]) == ("Write a haiku.", "Old pond, frog jumps in.", "No.")
    assert out["score_chosen"] == 8.0


def test_conversational_prompt_as_messages_trl_style(tmp_path):
    prompt = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye?"},
    ]
    row = {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "Bye!"}],
        "rejected": [{"role": "assistant", "content": "What?"}],
    }
    out = load_preference_pairs(write_jsonl(tmp_path / "trl.jsonl", [row]))[0]
    assert json.loads(out["prompt_messages"]) == prompt
    assert (out["prompt"], out["chosen"], out["rejected"]) == ("Bye?", "Bye!", "What?")


def test_history_pairs_become_prompt_messages(tmp_path):
    rows = [
        {"prompt": "Thanks", "chosen": "You're welcome", "rejected": "ok", "history": [["Hi", "Hello"]]},
        {"prompt": "Plain", "chosen": "a", "rejected": "b", "history": []},
    ]
    ds = load_preference_pairs(write_jsonl(tmp_path / "oasst.jsonl", rows))
    assert json.loads(ds[0]["prompt_messages"]) == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Thanks"},
    ]
    assert ds[0]["prompt"] == "Thanks" and ds[1]["prompt_messages"] == ""


# --------------------------------------------------------------------------- filters and report


def test_filters_count_each_reason(tmp_path):
    rows = [
        PAIRS[0],
        {"prompt": "  ", "chosen": "a", "rejected": "b"},  # empty_prompt
        {"prompt": "p", "chosen": "\n", "rejected": "b"},  # empty_response
        {"prompt": "p", "chosen": "same ", "rejected": "same"},  # chosen_equals_rejected
        {"prompt": "p", "chosen": None, "rejected": "b"},  # missing_field
        {"prompt": "p", "rejected": "b"},  # missing_field (key absent)
        {"prompt": "p", "chosen": True, "rejected": "b"},  # not_a_string
        [1, 2],  # unparsable: not an object
    ]
    ds, report = load_preference_pairs_with_report(write_jsonl(tmp_path / "f.jsonl", rows))
    assert len(ds) == 1
    assert {k: v for k, v in report.skipped.items() if v} == {
        "empty_prompt": 1,
        "empty_response": 1,
        "chosen_equals_rejected": 1,
        "missing_field": 2,
        "not_a_string": 1,
        "unparsable": 1,
    }
    assert (report.rows_in, report.rows_kept, report.rows_skipped) == (8, 1, 7)
    assert report.as_dict()["skipped"]["missing_field"] == 2
    lines = report.summary().splitlines()
    assert len(lines) == 6 and all("f.jsonl" in line for line in lines)


def test_report_argument_is_filled_and_limit_is_deterministic(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(50)]
    path = write_jsonl(tmp_path / "many.jsonl", rows)
    report = FilterReport()
    first = load_preference_pairs(path, limit=10, report=report)
    again = load_preference_pairs(path, limit=10)
    head = load_preference_pairs(path, limit=10, seed=None)
    assert first["prompt"] == again["prompt"] and len(first) == 10
    assert head["prompt"] == [f"q{i}" for i in range(10)]
    assert (report.rows_in, report.rows_kept, report.rows_out) == (50, 50, 10)
    assert load_preference_pairs(path, domain="math")["domain"] == ["math"] * 50


# --------------------------------------------------------------------------- errors


def test_missing_required_column_names_file_found_and_expected(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "good": "a"}])
    with pytest.raises(ValueError) as err:
        load_preference_pairs(path)
    message = str(err.value)
    assert "bad.jsonl" in message and "'good', 'question'" in message and "chosen" in message
    assert "rejected" in message


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n\n" + '{"prompt": "x", "chosen": \n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:3: malformed JSON"):
        load_preference_pairs(path)


def test_missing_path_and_offline_hub_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_preference_pairs(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="data/missing"):
        load_preference_pairs("./data/missing")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/name' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(loading.datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError, match="local"):
        load_preference_pairs("org/name", split="train")


# --------------------------------------------------------------------------- mixture and split


def test_mixture_domains_num_samples_weight_and_column_alignment(tmp_path):
    plain_rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b", "idx": i} for i in range(20)]
    hh_rows = [{"chosen": HH_CHOSEN + str(i), "rejected": HH_REJECTED} for i in range(10)]
    plain, hh = write_jsonl(tmp_path / "plain.jsonl", plain_rows), write_jsonl(tmp_path / "hh.jsonl", hh_rows)
    specs = [
        {"path": str(plain), "domain": "general", "num_samples": 5},
        {"source": str(hh), "domain": "chat", "weight": 0.5},
    ]
    mixed, report = load_mixture(specs, seed=3)
    assert sorted(mixed["domain"]) == ["chat"] * 5 + ["general"] * 5
    assert set(mixed.column_names) >= {"prompt", "chosen", "rejected", "domain", "idx", "transcript_format"}
    assert all((r["idx"] is None) == (r["domain"] == "chat") for r in mixed)
    assert (report.rows_in, report.rows_out, len(report.parts)) == (30, 10, 2)
    again, _ = load_mixture(specs, seed=3)
    assert again["prompt"] == mixed["prompt"] and again["chosen"] == mixed["chosen"]
    with pytest.raises(ValueError, match="only 20"):
        load_mixture([{"path": str(plain), "domain": "x", "num_samples": 21}])


def test_train_eval_split_is_deterministic_and_disjoint():
    ds = datasets.Dataset.from_dict({"prompt": [f"q{i}" for i in range(100)]})
    train, evaluation = train_eval_split(ds, eval_fraction=0.1, seed=1)
    train2, evaluation2 = train_eval_split(ds, eval_fraction=0.1, seed=1)
    assert len(evaluation) == 10 and len(train) == 90
    assert evaluation["prompt"] == evaluation2["prompt"] and train["prompt"] == train2["prompt"]
    assert not set(train["prompt"]) & set(evaluation["prompt"])
    assert len(train_eval_split(ds, eval_size=7)[1]) == 7
    with pytest.raises(ValueError):
        train_eval_split(ds)


# --------------------------------------------------------------------------- real shared data


@pytest.mark.parametrize("name", HH_FILES)
def test_shared_hh_files_reconstruct_transcripts(name):
    path = need_shared() / name
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    by_transcript = {(r["chosen"], r["rejected"]) for r in raw}
    ds, report = load_preference_pairs_with_report(path)
    assert report.rows_in == len(raw) and len(ds) == report.rows_kept > 0.98 * len(raw)
    for row in ds:
        assert (row["prompt"] + row["chosen"], row["prompt"] + row["rejected"]) in by_transcript
        assert row["prompt"].endswith("\n\nAssistant:")


def test_shared_files_all_load_with_known_skip_counts():
    root = need_shared()
    counts = {}
    for path in sorted(root.glob("*.jsonl")):
        ds, report = load_preference_pairs_with_report(path)
        assert len(ds) > 0.9 * report.rows_in
        assert all(isinstance(v, str) and v.strip() for c in ("prompt", "chosen", "rejected") for v in ds[c])
        counts[path.name] = report.skipped
    assert counts["hh_helpful-online_test.jsonl"]["chosen_equals_rejected"] == 2
    assert counts["hh_helpful-rejection-sampled_test.jsonl"]["chosen_equals_rejected"] == 32
    assert counts["pandalm_testset_pairs.jsonl"]["not_a_string"] == 6  # `chosen: true` rows


def test_mixture_keeps_per_row_domain_column(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": "good", "rejected": "bad", "domain": "zh" if i % 2 else "en"}
            for i in range(6)]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds, _ = load_mixture([{"path": str(path)}])
    assert sorted(ds["domain"]) == ["en"] * 3 + ["zh"] * 3
    ds2, _ = load_mixture([{"path": str(path), "domain": "forced"}])
    assert set(ds2["domain"]) == {"forced"}


def test_presplit_hh_prompt_becomes_hh_transcript(tmp_path):
    row = {"prompt": "Human: hi\n\nAssistant: hello\n\nHuman: how?", "chosen": "Like this.", "rejected": "No."}
    path = tmp_path / "hh_split.jsonl"
    path.write_text(json.dumps(row) + "\n")
    ds = load_preference_pairs(str(path))
    assert ds[0]["transcript_format"] == "hh"
    assert ds[0]["prompt"] == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant:"
    assert ds[0]["chosen"] == " Like this."


def test_check_counts_loader_and_tokenizer_skips(tmp_path, tiny_model_and_tokenizer, capsys):
    """`python -m lbdpo.data.check` reports each file's loader skips and truncation skips."""
    from lbdpo.data.check import check_file, main
    from lbdpo.data.tokenize import TokenizeConfig

    rows = PAIRS + [{"prompt": "Same?", "chosen": "x", "rejected": "x"},  # chosen_equals_rejected
                    {"prompt": "", "chosen": "a", "rejected": "b"},  # empty_prompt
                    {"prompt": "Long?", "chosen": "a " * 50 + "X", "rejected": "a " * 50 + "Y"}]  # same after cut
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = TokenizeConfig(prompt_format="chat", max_length=48, max_prompt_length=32)
    result = check_file(str(path), tiny_model_and_tokenizer[1], cfg)
    assert {k: result[k] for k in ("file", "rows_in", "loader_skips", "tokenizer_skips", "pairs")} == {
        "file": "pairs.jsonl", "rows_in": 6, "loader_skips": {"chosen_equals_rejected": 1, "empty_prompt": 1},
        "tokenizer_skips": {"identical_after_truncation": 1}, "pairs": 3}  # tests/test_data_check.py: the rest
    main([str(path), "--max-length", "48", "--max-prompt-length", "32", "--prompt-format", "chat"])
    out = capsys.readouterr().out
    assert "| pairs.jsonl | 6 | chosen_equals_rejected 1, empty_prompt 1 | identical_after_truncation 1 | 3 |" in out
