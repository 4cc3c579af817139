"""Packed pairs ([prompt | chosen | rejected] segments; rows under a block mask, or one row with attention per
segment) against brute force: every sequence run alone, unpadded, through the model's own forward and logits."""

from __future__ import annotations

import copy

import pytest
import torch

from lbdpo.data import PreferenceCollator
from lbdpo.packed_pairs import (CHOSEN, PROMPT, REJECTED, SEGMENT_ATTENTION, pack_pairs, packed_pair_token_logps,
                                enable_segment_attention, restore_attention)

LAYOUTS = ["block_mask", "segments"]  # trainer.packed_attention


def with_layout(model, layout: str):
    """``model`` switched to attention per segment (one row, no padding) for ``segments``; as it is otherwise."""
    if layout == "segments":
        assert enable_segment_attention(model) is None and model.config._attn_implementation == SEGMENT_ATTENTION
    return model


def brute_force(model, prompt: list[int], response: list[int]):
    """One unpadded sequence: the log-prob of each token 1.. (its own logits), and h at the prompt's last token."""
    ids = torch.tensor([prompt + response])
    out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    logp = torch.log_softmax(out.logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return logp, out.hidden_states[-1][0, len(prompt) - 1]


def scored_entries(mask_row: torch.Tensor) -> torch.Tensor:
    """(T − 1,) bool: entries t − 1 whose token t and predictor t − 1 are both real (any padding side)."""
    return (mask_row[1:] * mask_row[:-1]).bool()


def test_layout_positions_and_mask():
    prompts = [torch.tensor([1, 2, 3]), torch.tensor([4, 5])]
    chosen = [torch.tensor([6]), torch.tensor([7, 8, 9])]
    rejected = [torch.tensor([10, 11]), torch.tensor([12])]
    packed = pack_pairs(prompts, chosen, rejected, pad_token_id=0)
    # segments of 6 tokens each: one row as long as the longest, the other pair in a second row
    assert packed.input_ids.tolist() == [[1, 2, 3, 6, 10, 11], [4, 5, 7, 8, 9, 12]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 3, 4], [0, 1, 2, 3, 4, 2]]
    assert packed.part[0].tolist() == [PROMPT] * 3 + [CHOSEN] + [REJECTED] * 2
    mask = packed.attention_mask()[0, 0]
    assert mask[4].tolist() == [True, True, True, False, True, False]  # rejected 1st: prompt + itself, not chosen
    assert mask[3].tolist() == [True, True, True, True, False, False]  # chosen: prompt + itself
    additive = packed.attention_mask(torch.float32)
    assert (additive[0, 0, 4, 3] == torch.finfo(torch.float32).min) and additive[0, 0, 4, 0] == 0


def test_short_pairs_share_a_row_and_never_see_each_other():
    prompts = [torch.tensor([1, 2, 3, 4])] + [torch.tensor([5, 6])] * 2
    chosen = [torch.tensor([7, 8, 9])] + [torch.tensor([10])] * 2
    rejected = [torch.tensor([11])] + [torch.tensor([12])] * 2
    packed = pack_pairs(prompts, chosen, rejected)  # lengths 8, 4, 4 → rows [8] and [4 + 4]
    assert packed.input_ids.shape == (2, 8) and packed.offsets.tolist() == [[0, 0], [1, 0], [1, 4]]
    mask = packed.attention_mask()[1, 0]
    assert not mask[4:, :4].any() and mask[4:, 4:].any()


def test_one_row_layout_and_its_segments_are_the_blocks_of_the_mask():
    prompts = [torch.tensor([1, 2, 3]), torch.tensor([4, 5])]
    chosen = [torch.tensor([6]), torch.tensor([7, 8, 9, 13])]
    rejected = [torch.tensor([10, 11]), torch.tensor([12])]
    packed = pack_pairs(prompts, chosen, rejected, pad_token_id=0, multiple_of=16, one_row=True)
    # longest segment first, back to back, then padding to 16
    assert packed.input_ids.tolist() == [[4, 5, 7, 8, 9, 13, 12, 1, 2, 3, 6, 10, 11, 0, 0, 0]]
    assert packed.offsets.tolist() == [[0, 7], [0, 0]]
    segments, mask = packed.segments(), packed.attention_mask()
    assert [(s, e) for s, e, _ in segments] == [(0, 7), (7, 13), (13, 16)]
    covered = torch.zeros_like(mask)
    for s, e, block in segments:
        assert block.shape == (1, 1, e - s, e - s) and torch.equal(block, mask[:, :, s:e, s:e])
        covered[:, :, s:e, s:e] = True
    assert not mask[~covered].any()  # nothing allowed outside the blocks
    with pytest.raises(ValueError, match="one-row"):
        pack_pairs(prompts, chosen, rejected).segments()


def test_segment_attention_is_switched_on_only_where_it_applies(tiny_model):
    plain = copy.deepcopy(tiny_model)
    eager = copy.deepcopy(tiny_model)
    eager.config._attn_implementation = "eager"
    assert "eager" in enable_segment_attention(eager) and eager.config._attn_implementation == "eager"
    assert enable_segment_attention(tiny_model) is None and enable_segment_attention(tiny_model) is None  # idempotent
    assert tiny_model.config._attn_implementation == SEGMENT_ATTENTION
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert plain.config._attn_implementation == "sdpa"
    # an unpacked forward (padded rows, no segments) is sdpa's own
    torch.testing.assert_close(tiny_model(input_ids=ids, attention_mask=mask).logits,
                               plain(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)


def test_a_decoder_that_drops_the_segments_is_refused(tiny_model, tiny_model_and_tokenizer, monkeypatch):
    """If a decoder's layers do not forward keyword arguments to attention, the one row would be attended as one
    sequence across pairs: refused, not silently wrong."""
    from conftest import random_pairs

    tok = tiny_model_and_tokenizer[1]
    batch = PreferenceCollator(tok.pad_token_id)(random_pairs(2, len(tok), seed=3))
    with_layout(tiny_model, "segments")
    for layer in tiny_model.get_decoder().layers:
        forward = layer.self_attn.forward
        monkeypatch.setattr(layer.self_attn, "forward",
                            lambda *a, _f=forward, segments=None, **k: _f(*a, **k))  # drops the keyword
    with pytest.raises(RuntimeError, match="did not pass the packed segments"):
        packed_pair_token_logps(tiny_model, batch["input_ids"], batch["attention_mask"], batch["prompt_lengths"], 8,
                                per_segment=True)


def test_rows_rounded_up_to_a_multiple_are_padding_only():
    prompts, chosen, rejected = [torch.tensor([1, 2, 3])] * 2, [torch.tensor([6])] * 2, [torch.tensor([10, 11])] * 2
    packed = pack_pairs(prompts, chosen, rejected, pad_token_id=0, multiple_of=16)  # 6 + 6 tokens → one row of 16
    assert packed.input_ids.shape == (1, 16) and packed.offsets.tolist() == [[0, 0], [0, 6]]
    assert packed.pair[0, 12:].eq(-1).all() and packed.input_ids[0, 12:].eq(0).all()
    assert pack_pairs(prompts, chosen, rejected, multiple_of=8).input_ids.shape == (2, 8)  # rows of 8: one pair each


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("score_prompt", [True, False])
@pytest.mark.parametrize("multiple_of", [None, 16])  # trainer.pad_to_multiple_of: extra padding columns
def test_token_logps_and_h_match_one_sequence_at_a_time(tiny_model, tiny_model_and_tokenizer, padding_side,
                                                        score_prompt, multiple_of, layout):
    from conftest import random_pairs

    tok = tiny_model_and_tokenizer[1]
    brute_model = copy.deepcopy(tiny_model)  # brute force: the model as loaded (sdpa)
    with_layout(tiny_model, layout)
    pairs = random_pairs(6, len(tok), seed=11, prompt_range=(2, 12), response_range=(1, 9))
    batch = PreferenceCollator(tok.pad_token_id, padding_side)(pairs)
    n, mask = len(pairs), batch["attention_mask"]
    token_lp, h = packed_pair_token_logps(tiny_model, batch["input_ids"], mask, batch["prompt_lengths"],
                                          chunk_size=7, score_prompt=score_prompt, multiple_of=multiple_of,
                                          per_segment=layout == "segments")
    assert token_lp.shape == (2 * n, batch["input_ids"].shape[1] - 1)
    for i, pair in enumerate(pairs):
        prompt = pair["prompt_input_ids"]
        for row, response in ((i, pair["chosen_input_ids"]), (n + i, pair["rejected_input_ids"])):
            want, want_h = brute_force(brute_model, prompt, response)
            got = token_lp[row][scored_entries(mask[row])]  # the row's tokens 1.. in order
            first = 0 if score_prompt and row < n else len(prompt) - 1  # prompt tokens scored on chosen rows only
            torch.testing.assert_close(got[first:], want[first:], atol=1e-5, rtol=1e-5)
            assert (got[:first] == 0).all()
            if score_prompt and row < n:
                torch.testing.assert_close(h[i], want_h, atol=1e-5, rtol=1e-5)
    assert all((token_lp[r][~scored_entries(mask[r])] == 0).all() for r in range(2 * n))
    assert (h is None) == (not score_prompt)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradients_match_one_sequence_at_a_time(tiny_model, tiny_model_and_tokenizer, layout):
    """d(Σ weighted log-probs)/dθ through the packed forward = the same sum over unpadded sequences."""
    from conftest import random_pairs

    tok = tiny_model_and_tokenizer[1]
    pairs = random_pairs(4, len(tok), seed=12, prompt_range=(2, 10), response_range=(1, 8))
    batch = PreferenceCollator(tok.pad_token_id, "left")(pairs)
    mask = batch["attention_mask"]
    weights = torch.randn(batch["input_ids"].shape[0], batch["input_ids"].shape[1] - 1,
                          generator=torch.Generator().manual_seed(0))
    packed_model, brute_model = with_layout(copy.deepcopy(tiny_model), layout), tiny_model
    token_lp, h = packed_pair_token_logps(packed_model, batch["input_ids"], mask, batch["prompt_lengths"], 5,
                                          per_segment=layout == "segments")
    ((token_lp * weights).sum() + h.square().sum()).backward()
    assert_grads_match_brute_force(packed_model, brute_model, pairs, mask, weights)


def assert_grads_match_brute_force(model, brute_model, pairs, mask, weights):
    """``model``'s gradients (the caller has back-propagated Σ weights · token log-probs + Σ h² of its packed forward
    over ``pairs``: chosen rows 0..n−1, rejected n..2n−1, ``mask`` their (2n, T) padded mask) equal those of the same
    objective computed one unpadded sequence at a time on ``brute_model`` (same weights)."""
    n, total = len(pairs), 0
    for i, pair in enumerate(pairs):
        for row, response in ((i, pair["chosen_input_ids"]), (n + i, pair["rejected_input_ids"])):
            lp, hi = brute_force(brute_model, pair["prompt_input_ids"], response)
            first = 0 if row < n else len(pair["prompt_input_ids"]) - 1
            total = total + (lp[first:] * weights[row][scored_entries(mask[row])][first:]).sum()
            if row < n:
                total = total + hi.square().sum()
    total.backward()
    for (name, p), q in zip(model.named_parameters(), brute_model.parameters()):
        scale = float(q.grad.abs().max())  # float32 sums in another order: 1e-5 of the largest entry
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5 * max(scale, 1.0), rtol=1e-4, msg=name)


def test_rows_whose_prompts_differ_are_refused(tiny_model, tiny_model_and_tokenizer):
    from conftest import random_pairs

    tok = tiny_model_and_tokenizer[1]
    batch = PreferenceCollator(tok.pad_token_id)(random_pairs(2, len(tok), seed=3))
    batch["input_ids"][3, 0] += 1  # pair 1's rejected row starts with another token
    with pytest.raises(ValueError, match="pair 1"):
        packed_pair_token_logps(tiny_model, batch["input_ids"], batch["attention_mask"], batch["prompt_lengths"], 8)


def test_importing_registers_nothing_and_restore_switches_back(tiny_model):
    """No global state at import (a fresh interpreter: lbdpo's modules imported, nothing registered with
    transformers); enable_segment_attention registers and switches, restore_attention switches back to sdpa; a
    per-segment forward on a model that was not switched is refused, not run across pairs."""
    import subprocess
    import sys

    code = ("import lbdpo.packed_pairs, lbdpo.dpo_model, lbdpo.scoring, lbdpo.train.setup\n"
            "from transformers import AttentionInterface\n"
            "print({'lbdpo_segments', 'lbdpo_flex'} & set(AttentionInterface._global_mapping) != set())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]
    ids, mask = torch.tensor([[5, 6, 7, 5, 6, 8]] * 2), torch.ones(2, 6, dtype=torch.long)
    with pytest.raises(RuntimeError, match="not switched to per-segment attention"):
        packed_pair_token_logps(tiny_model, ids, mask, torch.tensor([3]), 8, per_segment=True)
    assert enable_segment_attention(tiny_model) is None and tiny_model.config._attn_implementation == SEGMENT_ATTENTION
    restore_attention(tiny_model)
    assert tiny_model.config._attn_implementation == "sdpa"
    assert all(layer.self_attn.config._attn_implementation == "sdpa" for layer in tiny_model.get_decoder().layers)
