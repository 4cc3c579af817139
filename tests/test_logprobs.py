"""Masks, padding side, shifts and prompt/response boundaries against brute-force per-sequence computation.

The brute force runs the model on ONE sequence at a time with no padding and reads the quantities
straight from log_softmax, so any off-by-one, pad leakage or boundary error in the batched code shows.
"""

from __future__ import annotations

import pytest
import torch

from conftest import random_pairs
from lbdpo.beta_head import BetaHead, BetaHeadConfig, DynamicBetaDPOModel
from lbdpo.data import PreferenceCollator
from lbdpo.data.collator import pad_rows
from lbdpo.logprobs import position_ids_from_mask, prompt_ppl_mask, real_token_positions, sequence_log_ppl, token_logps

ATOL = 1e-5


def brute_force(model, pair):
    """Per-pair reference values from unpadded single-sequence forwards."""
    prompt = pair["prompt_input_ids"]
    out = {}
    with torch.no_grad():
        for name in ("chosen", "rejected"):
            resp = pair[f"{name}_input_ids"]
            ids = torch.tensor([prompt + resp])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            # token t is predicted by position t-1; response tokens are t = len(prompt) .. end
            out[name] = sum(logp[t - 1, ids[0, t]].item() for t in range(len(prompt), ids.shape[1]))
        ids = torch.tensor([prompt])
        res = model(input_ids=ids, output_hidden_states=True)
        logp = torch.log_softmax(res.logits[0].double(), -1)
        nll = [-logp[t - 1, ids[0, t]].item() for t in range(1, len(prompt))]
        out["log_ppl"] = sum(nll) / len(nll)
        out["h"] = res.hidden_states[-1][0, -1]
    return out


def seq_log_ppl(model, seq):
    with torch.no_grad():
        ids = torch.tensor([seq])
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return sum(-logp[t - 1, ids[0, t]].item() for t in range(1, len(seq))) / (len(seq) - 1)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_sequence_log_ppl_matches_brute_force(tiny_model, tiny_model_and_tokenizer, padding_side):
    tok = tiny_model_and_tokenizer[1]
    pairs = random_pairs(5, len(tok), seed=1, prompt_range=(2, 12))
    seqs = [p["prompt_input_ids"] for p in pairs]
    assert len({len(s) for s in seqs}) > 1, "need unequal lengths"
    ids, mask = pad_rows(seqs, tok.pad_token_id, padding_side)
    assert mask.sum(-1).tolist() == [len(s) for s in seqs]
    assert all(ids[i][mask[i].bool()].tolist() == s for i, s in enumerate(seqs))
    with torch.no_grad():
        log_ppl = sequence_log_ppl(tiny_model, ids, mask)
    expected = torch.tensor([seq_log_ppl(tiny_model, s) for s in seqs]).float()
    torch.testing.assert_close(log_ppl, expected, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_forward_matches_brute_force(tiny_model, tiny_model_and_tokenizer, padding_side):
    """Response log-probs (policy and reference), prompt log PPL and h inside the ONE policy forward."""
    tok = tiny_model_and_tokenizer[1]
    pairs = random_pairs(4, len(tok), seed=2)
    batch = PreferenceCollator(tok.pad_token_id, padding_side=padding_side)(pairs)
    head = BetaHead(BetaHeadConfig(hidden_size=64, epsilon=0.5, w_init=0.05, ppl_transform="log_ppl"))
    captured = {}
    head.register_forward_hook(lambda mod, args, kwargs, out: captured.update(h=args[0]), with_kwargs=True)
    model = DynamicBetaDPOModel(tiny_model, head, ref_model=tiny_model)
    with torch.no_grad():
        out = model(batch)
    ref = [brute_force(tiny_model, p) for p in pairs]
    for name in ("chosen", "rejected"):
        expected = torch.tensor([r[name] for r in ref], dtype=torch.float32)
        torch.testing.assert_close(getattr(out, f"policy_{name}_logps"), expected, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(getattr(out, f"reference_{name}_logps"), expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.log_ppl, torch.tensor([r["log_ppl"] for r in ref], dtype=torch.float32),
                               atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(captured["h"], torch.stack([r["h"] for r in ref]), atol=ATOL, rtol=1e-4)
    # and β is the formula applied to those brute-force quantities
    f = 1 + 0.5 * torch.tanh(head.context_net(torch.stack([r["h"] for r in ref])).squeeze(-1))
    expected_beta = 0.05 * torch.tensor([r["log_ppl"] for r in ref]) * f
    torch.testing.assert_close(out.beta, expected_beta.float(), atol=1e-6, rtol=1e-5)


def test_left_and_right_padding_agree(tiny_model, tiny_model_and_tokenizer):
    tok = tiny_model_and_tokenizer[1]
    pairs = random_pairs(6, len(tok), seed=3)
    head = BetaHead(BetaHeadConfig(hidden_size=64, w_init=0.1))
    model = DynamicBetaDPOModel(tiny_model, head, ref_model=tiny_model)
    with torch.no_grad():
        right = model(PreferenceCollator(tok.pad_token_id, "right")(pairs))
        left = model(PreferenceCollator(tok.pad_token_id, "left", pad_to_multiple_of=8)(pairs))
    for key in ("policy_chosen_logps", "policy_rejected_logps", "log_ppl", "beta"):
        torch.testing.assert_close(getattr(left, key), getattr(right, key), atol=1e-4, rtol=1e-5)


def test_token_logps_low_precision_path_matches_float32():
    logits = torch.randn(3, 7, 50)
    ids = torch.randint(0, 50, (3, 7))
    expected = torch.log_softmax(logits.double(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(token_logps(logits, ids), expected.float(), atol=1e-5, rtol=1e-5)
    bf = logits.bfloat16()
    expected_bf = torch.log_softmax(bf.double(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(token_logps(bf, ids), expected_bf.float(), atol=1e-4, rtol=1e-4)


def test_masks_on_left_padded_rows():
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    assert real_token_positions(mask).tolist() == [[-1, -1, 0, 1, 2, 3], [0, 1, 2, 3, -1, -1]]
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 3, 3]]
    # prompt of 3 tokens: positions 1 and 2 are scored (the first token has no prediction)
    pm = prompt_ppl_mask(mask, torch.tensor([3, 3]))
    assert pm.long().tolist() == [[0, 0, 0, 1, 1, 0], [0, 1, 1, 0, 0, 0]]


def test_collator_contract(tiny_model_and_tokenizer):
    tok = tiny_model_and_tokenizer[1]
    pairs = random_pairs(3, len(tok), seed=4)
    pairs[0]["domain"], pairs[1]["domain"], pairs[2]["domain"] = "a", "b", "a"
    for p in pairs:
        p["reference_chosen_logps"], p["reference_rejected_logps"] = -1.0, -2.0
    b = PreferenceCollator(tok.pad_token_id, pad_to_multiple_of=8)(pairs)
    n = len(pairs)
    assert b["input_ids"].shape[0] == 2 * n and b["input_ids"].shape[1] % 8 == 0
    assert b["domain"] == ["a", "b", "a"]
    assert b["reference_chosen_logps"].tolist() == [-1.0] * n
    for i, p in enumerate(pairs):
        for half, key in ((0, "chosen_input_ids"), (1, "rejected_input_ids")):
            row = half * n + i
            length = len(p["prompt_input_ids"]) + len(p[key])
            assert b["attention_mask"][row].sum() == length
            assert b["input_ids"][row, :length].tolist() == p["prompt_input_ids"] + p[key]
            labels = b["labels"][row]
            assert (labels[: len(p["prompt_input_ids"])] == -100).all()
            assert labels[len(p["prompt_input_ids"]) : length].tolist() == p[key]
            assert (labels[length:] == -100).all()
        assert b["prompt_lengths"][i] == len(p["prompt_input_ids"])
    with pytest.raises(ValueError, match="prompt of ≥ 2 tokens"):
        PreferenceCollator(0)([{"prompt_input_ids": [5], "chosen_input_ids": [1], "rejected_input_ids": [2]}])
