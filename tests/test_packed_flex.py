"""Packed pairs under FlexAttention (``trainer.packed_attention=flex``, ``lbdpo.packed_flex``) against brute force:
every sequence run alone, unpadded, through the model's own sdpa forward — log-probs, h and gradients, on the tests'
Qwen2 and a tiny Llama. On the CPU the attention is torch's unfused FlexAttention (the op's reference implementation,
with its own backward; torch's public flex_attention refuses a backward on CPU), under the same BlockMask the GPU
kernel gets; the GPU's compiled kernel itself is not run here."""

from __future__ import annotations

import copy

import pytest
import torch
from test_packed_pairs import assert_grads_match_brute_force, brute_force, scored_entries
from torch.nn.attention.flex_attention import create_mask
from transformers import AutoModelForCausalLM, LlamaConfig

from lbdpo.beta_head import BetaHead, BetaHeadConfig
from lbdpo.data import PreferenceCollator
from lbdpo.dpo_model import DynamicBetaDPOModel
from lbdpo.errors import LbdpoError
from lbdpo.packed_flex import TILE, enable_flex_attention, flex_pair_token_logps, flex_unsupported, pair_block_mask
from lbdpo.packed_pairs import FLEX_ATTENTION, pack_pairs, restore_attention
from lbdpo.scoring import plan_forward, resolve_forward

LLAMA = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


def decoder(arch: str, tiny_model_and_tokenizer):
    """(model on sdpa, its vocabulary size): tiny_random (Qwen2) or a tiny Llama (SmolLM2's architecture)."""
    if arch == "qwen2":
        return copy.deepcopy(tiny_model_and_tokenizer[0]), len(tiny_model_and_tokenizer[1])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA), attn_implementation="sdpa"), LLAMA["vocab_size"]


def flex_copy(model):
    flex = copy.deepcopy(model)
    assert enable_flex_attention(flex) is None and flex.config._attn_implementation == FLEX_ATTENTION
    return flex


def test_the_block_mask_is_the_layout_rule_and_skips_empty_tiles():
    lengths = [(150, 60, 90), (30, 5, 9), (70, 40, 20), (12, 30, 30), (100, 20, 10), (8, 3, 2), (40, 60, 50)]
    seg = lambda n: torch.randint(3, 50, (n,), generator=torch.Generator().manual_seed(n))
    packed = pack_pairs(*([seg(part[i]) for part in lengths] for i in range(3)))  # rows of 300: 3 tiles, 1 partial
    rows, width = packed.pair.shape
    assert rows == 3 and width == 300
    block = pair_block_mask(packed)
    assert block.shape == (rows, 1, width, width)
    dense = packed.attention_mask()  # the block_mask layout's (R, 1, C, C): the same rule, materialised
    assert torch.equal(create_mask(block.mask_mod, rows, 1, width, width), dense)
    # tile (i, j) is visited iff some query of tile i may attend to some key of tile j; the others are skipped
    tiles = -(-width // TILE)
    padded = torch.zeros(rows, 1, tiles * TILE, tiles * TILE, dtype=torch.bool)
    padded[..., :width, :width] = dense
    wanted = padded.reshape(rows, 1, tiles, TILE, tiles, TILE).any(dim=(3, 5))
    assert torch.equal(block.to_dense().bool(), wanted)
    assert (~wanted).any()  # empty tiles exist (above the diagonal at least) and are skipped


@pytest.mark.parametrize("arch,side,bucketed,score_prompt,multiple_of", [
    ("qwen2", "left", True, True, None), ("qwen2", "right", False, False, 16), ("llama", "left", False, True, None),
    ("llama", "right", True, True, 8)])
def test_token_logps_and_h_match_one_sequence_at_a_time(tiny_model_and_tokenizer, arch, side, bucketed, score_prompt,
                                                        multiple_of):
    from conftest import random_pairs

    model, vocab = decoder(arch, tiny_model_and_tokenizer)
    pairs = random_pairs(6, vocab, seed=11, prompt_range=(2, 12), response_range=(1, 9))
    batch = PreferenceCollator(0, side)(pairs)
    n, mask = len(pairs), batch["attention_mask"]
    token_lp, h = flex_pair_token_logps(flex_copy(model), batch["input_ids"], mask, batch["prompt_lengths"], 7,
                                        score_prompt=score_prompt, multiple_of=multiple_of, bucketed=bucketed)
    assert token_lp.shape == (2 * n, batch["input_ids"].shape[1] - 1)
    for i, pair in enumerate(pairs):
        prompt = pair["prompt_input_ids"]
        for row, response in ((i, pair["chosen_input_ids"]), (n + i, pair["rejected_input_ids"])):
            want, want_h = brute_force(model, prompt, response)
            got = token_lp[row][scored_entries(mask[row])]
            first = 0 if score_prompt and row < n else len(prompt) - 1
            torch.testing.assert_close(got[first:], want[first:], atol=1e-5, rtol=1e-5)
            assert (got[:first] == 0).all()
            if score_prompt and row < n:
                torch.testing.assert_close(h[i], want_h, atol=1e-5, rtol=1e-5)
    assert all((token_lp[r][~scored_entries(mask[r])] == 0).all() for r in range(2 * n))
    assert (h is None) == (not score_prompt)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_gradients_match_one_sequence_at_a_time(tiny_model_and_tokenizer, arch):
    """d(Σ weighted log-probs + Σ h²)/dθ through FlexAttention's backward = the same sum over unpadded sequences."""
    from conftest import random_pairs

    brute, vocab = decoder(arch, tiny_model_and_tokenizer)
    flex = flex_copy(brute)
    pairs = random_pairs(4, vocab, seed=12, prompt_range=(2, 10), response_range=(1, 8))
    batch = PreferenceCollator(0, "left")(pairs)
    n, mask = len(pairs), batch["attention_mask"]
    weights = torch.randn(2 * n, batch["input_ids"].shape[1] - 1, generator=torch.Generator().manual_seed(0))
    token_lp, h = flex_pair_token_logps(flex, batch["input_ids"], mask, batch["prompt_lengths"], 5, bucketed=True)
    ((token_lp * weights).sum() + h.square().sum()).backward()
    assert_grads_match_brute_force(flex, brute, pairs, mask, weights)


def test_flex_is_opt_in_and_refused_clearly_where_it_cannot_run(tiny_model, monkeypatch):
    for device in ("cpu", "cuda"):  # auto never picks flex
        assert resolve_forward("packed", "auto", device)[1] != "flex"
        assert resolve_forward("auto", "auto", device)[1] != "flex"
    plan = plan_forward(tiny_model, "packed", "flex", device="cuda")
    assert plan.packed_attention == "flex" and plan.bucket_shapes  # rows bucketed on a GPU, as block_mask's
    assert plan.describe() == "packed pairs, rows under a FlexAttention block mask, bucketed shapes"
    assert not plan_forward(tiny_model, "packed", "flex").bucket_shapes  # the CPU keeps exact widths

    def refused(model, match, key="packed_attention=flex", fix="packed_attention=block_mask", **options):
        with pytest.raises(LbdpoError, match=rf"trainer\.{key}: .*{match}.*; set trainer\.{fix} \(or auto\)"):
            plan_forward(model, "packed", "flex", **options)

    refused(tiny_model, "inductor's CPU kernel, which has no backward", compiled=True)
    eager = copy.deepcopy(tiny_model)
    eager.config._attn_implementation = "eager"
    refused(eager, "its attention implementation is 'eager', not 'sdpa'")
    windowed = copy.deepcopy(tiny_model)  # a decoder that cannot pack at all: refused as packed pairs are
    windowed.config.use_sliding_window = True
    refused(windowed, "sliding-window", key="forward=packed", fix="forward=rows")
    monkeypatch.setattr(type(tiny_model.get_decoder()), "__module__", "transformers_modules.remote.modeling")
    refused(tiny_model, "remote code", key="forward=packed", fix="forward=rows")
    assert "sliding-window" in flex_unsupported(windowed) and "remote code" in flex_unsupported(tiny_model)
    monkeypatch.undo()
    assert "not 'sdpa'" in flex_unsupported(eager) and enable_flex_attention(eager) is not None
    assert eager.config._attn_implementation == "eager"  # refused: left as it was
    from lbdpo import packed_flex

    monkeypatch.setattr(packed_flex, "flex_unavailable", lambda: "torch 2.4 has no torch.nn.attention.flex_attention")
    refused(tiny_model, "torch 2.4 has no")


def test_switching_keeps_unpacked_forwards_on_sdpa(tiny_model):
    """(Nothing is registered at import: tests/test_packed_pairs.py's fresh-interpreter test checks both names.)"""
    plain = copy.deepcopy(tiny_model)
    with pytest.raises(RuntimeError, match="not switched to FlexAttention"):
        flex_pair_token_logps(tiny_model, torch.tensor([[5, 6, 7, 5, 6, 8]] * 2), torch.ones(2, 6, dtype=torch.long),
                              torch.tensor([3]), 8)
    assert enable_flex_attention(tiny_model) is None and enable_flex_attention(tiny_model) is None  # idempotent
    assert tiny_model.config._attn_implementation == FLEX_ATTENTION
    ids, mask = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    torch.testing.assert_close(tiny_model(input_ids=ids, attention_mask=mask).logits,
                               plain(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)  # sdpa's own
    restore_attention(tiny_model)
    assert all(layer.self_attn.config._attn_implementation == "sdpa" for layer in tiny_model.get_decoder().layers)


def test_the_dpo_forward_and_gradients_equal_the_standard_forward(tiny_model, tiny_model_and_tokenizer):
    """The whole Learnable-β DPO step with packed_attention=flex: the rows forward's per-pair values and the gradient
    of every parameter (policy and head); the policy and the reference are switched, and switched back."""
    from conftest import random_pairs
    from test_chunked_logps import assert_same_as_standard_forward

    tok = tiny_model_and_tokenizer[1]
    pairs = random_pairs(4, len(tok), seed=2, prompt_range=(2, 10))
    assert_same_as_standard_forward(tiny_model, tok, "right", pairs, forward="packed", packed_attention="flex")
    model = DynamicBetaDPOModel(tiny_model, BetaHead(BetaHeadConfig(hidden_size=64)), copy.deepcopy(tiny_model),
                                forward="packed", packed_attention="flex")
    assert model.plan.packed_attention == "flex"
    assert {m.config._attn_implementation for m in (model.policy_model, model.ref_model)} == {FLEX_ATTENTION}
    model.restore_attention()
    assert {m.config._attn_implementation for m in (model.policy_model, model.ref_model)} == {"sdpa"}


def test_the_compiled_kernel_is_not_rebuilt_per_batch(monkeypatch):
    """The GPU path, transformers' flex_attention_forward (flex_attention under torch.compile, once per process), over
    16 bucketed batches of 12 (rows, width) shapes, each with its own BlockMask: dynamo compiles a graph for the first
    shape and again as a size first changes or first takes a special value (rows, width, one row, one tile: automatic
    dynamic shapes) — 5 graphs — never for a shape seen before nor for a new BlockMask. Counted with dynamo's test
    backend on the CPU (no inductor, no grad); outputs equal the CPU reference path's."""
    import types

    import transformers.integrations.flex_attention as hf_flex
    from torch._dynamo.testing import CompileCounter

    from lbdpo.packed_flex import reference_flex_attention

    counter, compile_ = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **_: compile_(fn, backend=counter))
    monkeypatch.setattr(hf_flex.WrappedFlexAttention, "_instance", None)
    monkeypatch.setattr(hf_flex.WrappedFlexAttention, "_is_flex_compiled", False)
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    seg = lambda hi: torch.randint(3, 50, (int(torch.randint(2, hi, (1,), generator=g)),), generator=g)
    graphs, shapes = [], []
    for hi, n in zip([40, 40, 40, 40, 120, 120, 300, 300, 40, 120, 300, 200, 40, 80, 300, 250],
                     [4, 8, 5, 1, 4, 8, 2, 6, 8, 3, 4, 1, 7, 2, 8, 4]):  # longest prompt, pairs
        packed = pack_pairs([seg(hi) for _ in range(n)], [seg(40) for _ in range(n)], [seg(40) for _ in range(n)],
                            bucketed=True)
        rows, width = packed.pair.shape
        query, key = torch.randn(rows, 4, width, 8, generator=g), torch.randn(rows, 2, width, 8, generator=g)
        with torch.no_grad():
            out, _ = hf_flex.flex_attention_forward(types.SimpleNamespace(training=False), query, key, key,
                                                    pair_block_mask(packed), scaling=0.3)
            torch.testing.assert_close(out, reference_flex_attention(query, key, key, pair_block_mask(packed), 0.3))
        graphs.append(counter.frame_count)
        shapes.append((rows, width))
    torch._dynamo.reset()
    assert len(set(shapes)) == 12 and graphs[-1] <= 5, (shapes, graphs)
    seen_before = [i for i in range(1, len(shapes)) if shapes[i] in shapes[:i]]
    assert len(seen_before) == 4 and all(graphs[i] == graphs[i - 1] for i in seen_before), (shapes, graphs)
    assert graphs[-1] == graphs[len(graphs) // 2], (shapes, graphs)  # none in the second half: 7 new shapes there
