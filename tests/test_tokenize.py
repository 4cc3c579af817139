"""Exact prompt/response boundaries for several chat templates; truncation; skip counting."""

from __future__ import annotations

import copy

import pytest
from datasets import Dataset

from lbdpo.data import PreferenceCollator
from lbdpo.data.tokenize import (
    PairEncoder,
    TokenizeConfig,
    end_of_turn_ids,
    hh_transcript_to_messages,
    tokenize_pairs,
)

QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# DeepSeek-R1-Distill style: drops reasoning before </think> in assistant turns, opens <think> when generating.
DEEPSEEK_R1_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '<｜User｜>' + message['content'] }}{% elif message['role'] == 'assistant' %}"
    "{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\n' }}{% endif %}"
)


def with_template(tokenizer, name):
    tok = copy.deepcopy(tokenizer)
    if name == "smollm2":
        return tok
    if name == "qwen2":
        tok.chat_template = QWEN2_TEMPLATE
        return tok
    tok.add_special_tokens({"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>",
                            "additional_special_tokens": ["<｜User｜>", "<｜Assistant｜>"]})
    tok.chat_template = DEEPSEEK_R1_TEMPLATE
    return tok


ROWS = [
    {"prompt": "Write a short review of a rainy afternoon in Paris.", "chosen": "Lovely, calm and cosy.",
     "rejected": "Wet. Grey. Awful."},
    {"prompt": "用一句话评价这家餐厅。", "chosen": "菜很好吃，服务也很周到。", "rejected": "很一般。"},
]


@pytest.mark.parametrize("template", ["smollm2", "qwen2", "deepseek_r1"])
def test_prompt_is_exact_prefix_and_response_ends_with_end_of_turn(tiny_model_and_tokenizer, template):
    tok = with_template(tiny_model_and_tokenizer[1], template)
    enc = PairEncoder(tok, TokenizeConfig(prompt_format="chat", max_length=512, max_prompt_length=256))
    expected_eot = {"smollm2": "<|im_end|>", "qwen2": "<|im_end|>", "deepseek_r1": "<｜end▁of▁sentence｜>"}[template]
    assert tok.convert_ids_to_tokens(enc.eot) == [expected_eot]
    out = enc({k: [r[k] for r in ROWS] for k in ROWS[0]})
    for i, row in enumerate(ROWS):
        msgs = [{"role": "user", "content": row["prompt"]}]
        prompt_text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        assert out["prompt_input_ids"][i] == tok(prompt_text, add_special_tokens=False)["input_ids"]
        for key in ("chosen", "rejected"):
            resp = out[f"{key}_input_ids"][i]
            assert resp == tok(row[key], add_special_tokens=False)["input_ids"] + enc.eot
            sequence_text = tok.decode(out["prompt_input_ids"][i] + resp)
            assert sequence_text.startswith(prompt_text)
            assert sequence_text == prompt_text + row[key] + expected_eot
            full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": row[key]}], tokenize=False)
            if template == "deepseek_r1":
                # the rendered finished conversation has no "<think>\n"; we condition on the generation prompt
                assert not full.startswith(prompt_text) and prompt_text.endswith("<think>\n")
            else:
                assert full.startswith(prompt_text) and full.startswith(sequence_text)


def test_hh_transcript_becomes_chat_turns():
    prompt = "\n\nHuman: hi there\n\nAssistant: hello!\n\nHuman: how are you?\n\nAssistant:"
    assert hh_transcript_to_messages(prompt) == [
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello!"},
        {"role": "user", "content": "how are you?"},
    ]


def test_raw_format_keeps_text_and_appends_eos(tiny_model_and_tokenizer):
    tok = tiny_model_and_tokenizer[1]
    enc = PairEncoder(tok, TokenizeConfig(prompt_format="raw"))
    row = {"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " Hello!", "rejected": " Go away.",
           "transcript_format": "hh"}
    out = enc({k: [v] for k, v in row.items()})
    assert tok.decode(out["prompt_input_ids"][0]) == row["prompt"]
    assert out["chosen_input_ids"][0][-1] == tok.eos_token_id
    assert tok.decode(out["chosen_input_ids"][0][:-1]) == " Hello!"  # leading space kept in raw format


def test_truncation_keeps_prompt_end_and_counts_skips(tiny_model_and_tokenizer):
    tok = tiny_model_and_tokenizer[1]
    long_prompt = " ".join(f"word{i}" for i in range(200)) + " FINAL QUESTION?"
    rows = [
        {"prompt": long_prompt, "chosen": "yes " * 100, "rejected": "no " * 100},
        {"prompt": "ok?", "chosen": "", "rejected": "fine"},  # empty response → skip
        {"prompt": "same start?", "chosen": "a b c d e f g h " * 20 + "X", "rejected": "a b c d e f g h " * 20 + "Y"},
        {"prompt": "short", "chosen": "good", "rejected": "bad"},
    ]
    cfg = TokenizeConfig(prompt_format="chat", max_length=64, max_prompt_length=32)
    ds, skips = tokenize_pairs(Dataset.from_list(rows), tok, cfg)
    assert skips == {"response_empty_after_truncation": 1, "identical_after_truncation": 1}
    assert len(ds) == 2
    full_prompt = PairEncoder(tok, cfg).prompt_ids(rows[0])
    first = ds[0]
    assert len(first["prompt_input_ids"]) == 32 and first["prompt_input_ids"] == full_prompt[-32:]
    assert tok.decode(first["prompt_input_ids"]).endswith("FINAL QUESTION?<|im_end|>\n<|im_start|>assistant\n")
    for key in ("chosen_input_ids", "rejected_input_ids"):
        assert len(first["prompt_input_ids"]) + len(first[key]) == 64  # response cut from the right
        assert first[key][-1] != PairEncoder(tok, cfg).eot[0]  # a truncated response has no end-of-turn
    assert ds[1]["chosen_input_ids"][-1] == PairEncoder(tok, cfg).eot[0]
    # the result feeds the collator directly
    batch = PreferenceCollator(tok.pad_token_id)(list(ds))
    assert batch["input_ids"].shape[0] == 4 and (batch["attention_mask"].sum(1) <= 64).all()


def test_bad_tokenize_config_names_key(tiny_model_and_tokenizer):
    with pytest.raises(ValueError, match="data.prompt_format"):
        TokenizeConfig(prompt_format="markdown")
    with pytest.raises(ValueError, match="data.max_prompt_length"):
        TokenizeConfig(max_length=10, max_prompt_length=10)
    tok = copy.deepcopy(tiny_model_and_tokenizer[1])
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        PairEncoder(tok, TokenizeConfig(prompt_format="chat"))
    assert PairEncoder(tok, TokenizeConfig(prompt_format="auto")).prompt_format == "raw"
    assert end_of_turn_ids(tok, "raw") == [tok.eos_token_id]


def test_unfinished_response_gets_no_end_of_turn(tiny_model_and_tokenizer):
    """`<key>_finished=false` (a sample cut at a token limit) → no end-of-turn token; true/missing → one."""
    tok = tiny_model_and_tokenizer[1]
    cfg = TokenizeConfig(prompt_format="chat", max_length=64, max_prompt_length=32)
    rows = [
        {"prompt": "Review a film.", "chosen": "Great fun and", "rejected": "Dull, slow", "chosen_finished": False,
         "rejected_finished": True},
        {"prompt": "Review a book.", "chosen": "A joy.", "rejected": "Boring and", "chosen_finished": None,
         "rejected_finished": False},
    ]
    ds, skips = tokenize_pairs(Dataset.from_list(rows), tok, cfg)
    eot = PairEncoder(tok, cfg).eot
    assert not skips and len(ds) == 2
    for row, enc in zip(rows, ds):
        for key in ("chosen", "rejected"):
            text_ids = tok(row[key], add_special_tokens=False)["input_ids"]
            expected = text_ids if row[f"{key}_finished"] is False else text_ids + eot
            assert enc[f"{key}_input_ids"] == expected, (key, row)
