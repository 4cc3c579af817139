"""Row formats of preference data: one source row → our ``prompt``/``chosen``/``rejected`` row, or a counted skip.

See :mod:`lbdpo.data.loading` for the shapes recognised and the output columns.
"""

from __future__ import annotations

import json
import re
from typing import Any

HH_ASSISTANT = "\n\nAssistant:"
_HH_PROMPT_START = re.compile(r"^\s*Human: ")


class RowSkipped(Exception):
    """Raised while converting one row; ``args[0]`` is the reason (see ``loading.SKIP_REASONS``)."""




def _text(value: Any) -> str:
    """A required string value, or a skip for null/non-string values."""
    if value is None:
        raise RowSkipped("missing_field")
    if not isinstance(value, str):
        raise RowSkipped("not_a_string")
    return value


def _messages(value: Any) -> list[dict[str, str]]:
    """A validated list of ``{"role","content"}`` messages (extra keys dropped)."""
    def ok(m: Any) -> bool:
        return isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)

    if not isinstance(value, list) or not all(ok(m) for m in value):
        raise RowSkipped("unparsable")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _history_messages(history: Any) -> list[dict[str, str]]:
    """OASST/LLaMA-Factory ``history``: ``[[user, assistant], ...]`` pairs or a message list."""
    if history and all(isinstance(turn, dict) for turn in history):
        return _messages(history)
    out = []
    for turn in history:
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise RowSkipped("unparsable")
        out += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    return out


def _split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen reply, rejected reply) of two HH transcripts sharing everything up to the last
    ``"\\n\\nAssistant:"``; the prompt keeps the marker and the replies keep their leading space."""
    cut_c, cut_r = chosen.rfind(HH_ASSISTANT), rejected.rfind(HH_ASSISTANT)
    if cut_c < 0 or cut_r < 0:
        raise RowSkipped("hh_prompt_mismatch")
    end_c, end_r = cut_c + len(HH_ASSISTANT), cut_r + len(HH_ASSISTANT)
    if chosen[:end_c] != rejected[:end_r]:
        raise RowSkipped("hh_prompt_mismatch")
    return chosen[:end_c], chosen[end_c:], rejected[end_r:]


def _final_reply(side: Any) -> tuple[list[dict[str, str]], str]:
    """(messages before the reply, reply text) of one side: a message list ending with an assistant
    message, or a plain string reply."""
    if isinstance(side, str):
        return [], side
    if side is None:
        raise RowSkipped("missing_field")
    messages = _messages(side)
    if not messages or messages[-1]["role"] != "assistant":
        raise RowSkipped("unparsable")
    return messages[:-1], messages[-1]["content"]


def _split_conversation(prompt: Any, chosen: Any, rejected: Any) -> tuple[list[dict[str, str]], str, str]:
    """(prompt messages, chosen reply, rejected reply) of a conversational row."""
    before_c, reply_c = _final_reply(chosen)
    before_r, reply_r = _final_reply(rejected)
    if before_c != before_r:
        raise RowSkipped("conversation_mismatch")
    if isinstance(prompt, list):
        prompt_msgs = _messages(prompt)
        # TRL style: chosen continues the prompt (prompt + chosen); some datasets repeat the prompt in chosen.
        repeated = bool(prompt_msgs) and before_c[: len(prompt_msgs)] == prompt_msgs
        prompt_msgs = before_c if repeated else prompt_msgs + before_c
    elif before_c:
        prompt_msgs = before_c  # UltraFeedback: the string prompt is repeated as the first user message
    else:
        prompt_msgs = [{"role": "user", "content": _text(prompt)}]
    return prompt_msgs, reply_c, reply_r


def convert_row(row: Any, has_prompt: bool) -> dict[str, Any]:
    """One source row in our format, or ``RowSkipped`` with the reason."""
    if not isinstance(row, dict):
        raise RowSkipped("unparsable")
    if "chosen" not in row or "rejected" not in row or (has_prompt and "prompt" not in row):
        raise RowSkipped("missing_field")
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    messages: list[dict[str, str]] = []
    fmt = "plain"
    if any(isinstance(v, list) for v in (chosen, rejected, prompt)):
        messages, chosen, rejected = _split_conversation(prompt, chosen, rejected)
        # the plain-text prompt of a conversation is its last user message ("" if none: an empty prompt)
        prompt = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    elif not has_prompt:
        prompt, chosen, rejected = _split_hh(_text(chosen), _text(rejected))
        fmt = "hh"
    else:
        prompt, chosen, rejected = _text(prompt), _text(chosen), _text(rejected)
        if _HH_PROMPT_START.match(prompt) and not prompt.rstrip().endswith("Assistant:"):
            # an already-split HH transcript ("Human: …\n\nAssistant: …\n\nHuman: …", no final marker):
            # restore the canonical "\n\nHuman: … \n\nAssistant:" prompt so it is read as HH turns
            prompt = "\n\n" + prompt.lstrip() + "\n\nAssistant:"
            chosen, rejected = (r if r[:1].isspace() else " " + r for r in (chosen, rejected))
            fmt = "hh"
        elif row.get("history"):
            messages = _history_messages(row["history"]) + [{"role": "user", "content": prompt}]
    if not prompt.strip():
        raise RowSkipped("empty_prompt")
    if not chosen.strip() or not rejected.strip():
        raise RowSkipped("empty_response")
    if chosen.strip() == rejected.strip():
        raise RowSkipped("chosen_equals_rejected")
    core = {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "prompt_messages": json.dumps(messages, ensure_ascii=False) if messages else "",
        "transcript_format": fmt,
    }
    return {**core, **{k: v for k, v in row.items() if k not in core}}
