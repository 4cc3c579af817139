"""Chunked log-probs from the last hidden state: same values and gradients as full logits + log_softmax."""

from __future__ import annotations

import pytest
import torch

from lbdpo.chunked_logps import chunked_token_logps
from lbdpo.logprobs import forward_model, token_logps


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
@pytest.mark.parametrize("detached_rows", [False, True])
def test_values_and_gradients_match_full_logits(bias, chunk_size, detached_rows):
    g = torch.Generator().manual_seed(0)
    N, T, H, V = 3, 7, 8, 50
    hidden = torch.randn(N, T, H, generator=g, dtype=torch.float64).float().requires_grad_()
    head = torch.nn.Linear(H, V, bias=bias)
    input_ids = torch.randint(0, V, (N, T), generator=g)
    scored = torch.rand(N, T - 1, generator=g) > 0.3
    weights = torch.randn(N, T - 1, generator=g)  # an arbitrary downstream loss
    if detached_rows:  # positions whose log-prob gets no gradient (a detached log PPL): skipped in backward
        weights[0] = 0.0

    full = torch.where(scored, token_logps(head(hidden), input_ids), 0.0)
    (full * weights).sum().backward()
    expected_grads = [hidden.grad.clone(), head.weight.grad.clone()] + ([head.bias.grad.clone()] if bias else [])
    hidden.grad = None
    head.zero_grad()

    chunked = chunked_token_logps(hidden, input_ids, head, scored, chunk_size=chunk_size)
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-5)
    (chunked * weights).sum().backward()
    grads = [hidden.grad, head.weight.grad] + ([head.bias.grad] if bias else [])
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_on_a_real_model_matches_its_own_logits(tiny_model):
    """The decoder's last hidden state + the model's lm_head, chunked, reproduce the model's own log-probs."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    out = forward_model(tiny_model, ids, mask, output_hidden_states=True)
    expected = token_logps(out.logits, ids)
    scored = mask[:, 1:].bool()
    got = chunked_token_logps(out.hidden_states[-1], ids, tiny_model.get_output_embeddings(), scored, chunk_size=4)
    torch.testing.assert_close(got[scored], expected[scored], atol=1e-5, rtol=1e-5)
    assert (got[~scored] == 0).all()


def assert_same_as_standard_forward(tiny_model, tok, padding_side, pairs, **options):
    """A DPO forward + backward with ``options`` gives the standard forward's per-pair values (policy, reference,
    β, log PPL, f) and the same gradient of every policy and head parameter, to 1e-5."""
    import copy

    from lbdpo.beta_head import BetaHead, BetaHeadConfig
    from lbdpo.data import PreferenceCollator
    from lbdpo.dpo_model import DynamicBetaDPOModel

    reference = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    batch = PreferenceCollator(tok.pad_token_id, padding_side)(pairs)
    results = []
    for kwargs in ({}, options):
        torch.manual_seed(0)
        head = BetaHead(BetaHeadConfig(hidden_size=64, epsilon=0.5, w_init=0.05, init_std=0.3))
        model = DynamicBetaDPOModel(copy.deepcopy(tiny_model), head, reference, **kwargs)
        out = model(batch)
        out.loss.backward()
        results.append((out.per_pair(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (full, full_grads), (fast, fast_grads) = results
    for key in ("losses", "beta", "log_ppl", "f", "policy_chosen_logps", "policy_rejected_logps",
                "reference_chosen_logps", "reference_rejected_logps"):
        torch.testing.assert_close(fast[key], full[key], atol=1e-5, rtol=1e-5, msg=key)
    assert full_grads.keys() == fast_grads.keys() and len(full_grads) > 10
    for name in full_grads:
        torch.testing.assert_close(fast_grads[name], full_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_dpo_forward_and_gradients_match_the_full_logits_path(tiny_model, tiny_model_and_tokenizer, padding_side):
    """The whole Learnable-β DPO forward with logps_chunk_size: same values and gradients as full logits."""
    from conftest import random_pairs

    tok = tiny_model_and_tokenizer[1]
    pairs = random_pairs(4, len(tok), seed=2, prompt_range=(2, 10))
    assert_same_as_standard_forward(tiny_model, tok, padding_side, pairs, logps_chunk_size=7)


def test_chunking_asked_for_on_an_unsupported_architecture_is_refused(tiny_model):
    from lbdpo.beta_head import BetaHead, BetaHeadConfig
    from lbdpo.dpo_model import DynamicBetaDPOModel
    from lbdpo.errors import LbdpoError

    tiny_model.config.final_logit_softcapping = 30.0
    for options in ({"logps_chunk_size": 64}, {"forward": "packed"}):
        with pytest.raises(LbdpoError, match="final_logit_softcapping"):
            DynamicBetaDPOModel(tiny_model, BetaHead(BetaHeadConfig(mode="fixed")), **options)
    model = DynamicBetaDPOModel(tiny_model, BetaHead(BetaHeadConfig(mode="fixed")), forward="auto", device="cpu")
    assert model.plan.forward == "rows" and model.plan.chunk_size is None  # auto may choose, and says so


@pytest.mark.parametrize("packed_attention", ["block_mask", "segments"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("pad_to_multiple_of", [None, 16])
def test_packed_pairs_forward_matches_the_standard_forward(tiny_model, tiny_model_and_tokenizer, padding_side,
                                                           pad_to_multiple_of, packed_attention):
    """Each pair one packed segment [prompt | chosen | rejected] (prompt computed once, no padding between pairs):
    same per-pair values and the same gradients as one forward over every prompt + response row; unequal prompt
    and response lengths; rows rounded up to a multiple (trainer.pad_to_multiple_of) or not; rows under a block
    mask or one row with attention per segment (trainer.packed_attention; policy and reference both switched)."""
    from conftest import random_pairs

    tok = tiny_model_and_tokenizer[1]
    pairs = random_pairs(5, len(tok), seed=4, prompt_range=(2, 11), response_range=(1, 8))
    assert_same_as_standard_forward(tiny_model, tok, padding_side, pairs, forward="packed", logps_chunk_size=5,
                                    pad_to_multiple_of=pad_to_multiple_of, packed_attention=packed_attention)


@pytest.mark.parametrize("packed_attention", ["block_mask", "segments"])
def test_packed_pairs_under_activation_checkpointing(tiny_model, tiny_model_and_tokenizer, packed_attention):
    """Packing needs no KV cache, so it stays on when activations are recomputed in backward (the segments, a
    keyword argument of the decoder, reach the recomputed layers too)."""
    import copy

    from conftest import random_pairs
    from lbdpo.beta_head import BetaHead, BetaHeadConfig
    from lbdpo.data import PreferenceCollator
    from lbdpo.dpo_model import DynamicBetaDPOModel

    tok = tiny_model_and_tokenizer[1]
    batch = PreferenceCollator(tok.pad_token_id)(random_pairs(3, len(tok), seed=5))
    plain_model = copy.deepcopy(tiny_model).train()
    plain = DynamicBetaDPOModel(plain_model, BetaHead(BetaHeadConfig(mode="fixed")), tiny_model)(batch)
    plain.loss.backward()
    tiny_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tiny_model.train()
    model = DynamicBetaDPOModel(tiny_model, BetaHead(BetaHeadConfig(mode="fixed")), copy.deepcopy(tiny_model),
                                forward="packed", packed_attention=packed_attention)
    out = model(batch)
    out.loss.backward()
    assert model.plan.forward == "packed" and model.plan.packed_attention == packed_attention
    torch.testing.assert_close(out.policy_chosen_logps, plain.policy_chosen_logps, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(tiny_model.named_parameters(), plain_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_forward_switch_refuses_what_was_asked_and_auto_falls_back(tiny_model, caplog):
    """trainer.forward / trainer.packed_attention: an explicit path the decoder cannot run is refused with one line;
    auto chooses (packed on CPU, rows on an accelerator) and falls back with a log line; the model is switched to
    per-segment attention only when that layout runs, and restore_attention switches it back."""
    import logging

    from lbdpo.beta_head import BetaHead, BetaHeadConfig
    from lbdpo.dpo_model import DynamicBetaDPOModel
    from lbdpo.errors import LbdpoError
    from lbdpo.packed_pairs import SEGMENT_ATTENTION
    from lbdpo.scoring import resolve_forward

    assert resolve_forward("auto", "auto", "cpu") == ("packed", "segments")
    assert resolve_forward("auto", "auto", "cuda") == ("rows", None)
    assert resolve_forward("packed", "auto", "cuda") == ("packed", "block_mask")
    assert resolve_forward("packed", "auto", "cpu", compiled=True) == ("packed", "block_mask")
    assert resolve_forward("packed", "segments", "cuda") == ("packed", "segments")

    def dpo(**options):
        return DynamicBetaDPOModel(tiny_model, BetaHead(BetaHeadConfig(mode="fixed")), **options)

    model = dpo(forward="auto", device="cpu")
    assert (model.plan.forward, model.plan.packed_attention, model.plan.chunk_size) == ("packed", "segments", 1024)
    assert tiny_model.config._attn_implementation == SEGMENT_ATTENTION
    model.restore_attention()
    assert tiny_model.config._attn_implementation == "sdpa"
    assert dpo(forward="packed", packed_attention="block_mask").describe_forward() == "packed pairs, rows under a block mask"
    assert tiny_model.config._attn_implementation == "sdpa"  # nothing switched for the block mask
    assert dpo().describe_forward() == "one row per response, full logits"  # the Python default: rows

    tiny_model.config._attn_implementation = "eager"  # applies a 4D mask, but cannot run per segment
    with pytest.raises(LbdpoError, match="packed_attention=segments: its attention implementation is 'eager'"):
        dpo(forward="packed", packed_attention="segments")
    with caplog.at_level(logging.INFO, logger="lbdpo"):
        assert dpo(forward="packed").plan.packed_attention == "block_mask"
    assert "rows under a block mask" in caplog.text

    tiny_model.config._attn_implementation = "flash_attention_2"  # no custom 4D mask at all
    with pytest.raises(LbdpoError, match="trainer.forward=packed: .*flash_attention_2.*set trainer.forward=rows"):
        dpo(forward="packed")
    with caplog.at_level(logging.INFO, logger="lbdpo"):
        model = dpo(forward="auto", device="cpu")
    assert (model.plan.forward, model.plan.chunk_size) == ("rows", None) and "one row per response" in caplog.text


@pytest.mark.parametrize("packed_attention", ["block_mask", "segments"])
def test_packed_pairs_with_lora_and_the_adapter_disabled_reference(tiny_model, tiny_model_and_tokenizer,
                                                                   packed_attention):
    """LoRA policy (peft-wrapped), reference = the same model with its adapter off: packed = standard."""
    from lbdpo.packed_pairs import SEGMENT_ATTENTION
    import copy

    from peft import LoraConfig, get_peft_model

    from conftest import random_pairs
    from lbdpo.beta_head import BetaHead, BetaHeadConfig
    from lbdpo.data import PreferenceCollator
    from lbdpo.dpo_model import DynamicBetaDPOModel

    tok = tiny_model_and_tokenizer[1]
    batch = PreferenceCollator(tok.pad_token_id)(random_pairs(3, len(tok), seed=6))
    torch.manual_seed(0)
    peft_model = get_peft_model(tiny_model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                        task_type="CAUSAL_LM", init_lora_weights=False))
    outs = []
    for share in (False, True):
        model = DynamicBetaDPOModel(copy.deepcopy(peft_model), BetaHead(BetaHeadConfig(mode="fixed")),
                                    ref_from_disabled_adapter=True, forward="packed" if share else "rows",
                                    packed_attention=packed_attention)
        assert model.plan.forward == ("packed" if share else "rows")
        switched = model.policy_model.config._attn_implementation == SEGMENT_ATTENTION
        assert switched == (share and packed_attention == "segments")
        outs.append(model(batch).per_pair())
    for key in ("losses", "policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "log_ppl"):
        torch.testing.assert_close(outs[1][key], outs[0][key], atol=1e-5, rtol=1e-5, msg=key)
    assert not torch.allclose(outs[0]["policy_chosen_logps"], outs[0]["reference_chosen_logps"])
