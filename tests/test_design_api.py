"""The design documents' API (../shared/design/003_*.txt, task 2), kept through every refactor: the import, the
constructor, ``compute_ppl`` and ``get_dynamic_beta``, each against a brute-force computation — one unpadded
sequence at a time through the model's own forward and logits — on both padding sides."""

from __future__ import annotations

import pytest
import torch

from lbdpo.beta_head import BetaHead, BetaHeadConfig, DynamicBetaDPOModel  # the documents' import
from lbdpo.data.collator import pad_rows


def brute_force(model, ids: list[int]):
    """log PPL of one unpadded sequence (mean NLL of tokens 2..m) and h at its last token."""
    x = torch.tensor([ids])
    out = model(input_ids=x, output_hidden_states=True, use_cache=False)
    logp = torch.log_softmax(out.logits[0, :-1].float(), -1).gather(-1, x[0, 1:, None]).squeeze(-1)
    return -logp.mean(), out.hidden_states[-1][0, -1]


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (2, 9, 5, 13)]


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("chunk_size", [None, 3])  # trainer.logps_chunk_size: full logits or chunks of lm_head
def test_compute_ppl_and_get_dynamic_beta_match_one_sequence_at_a_time(tiny_model, tiny_model_and_tokenizer,
                                                                       padding_side, chunk_size):
    tok = tiny_model_and_tokenizer[1]
    rows = prompts(len(tok))
    input_ids, attention_mask = pad_rows(rows, tok.pad_token_id, padding_side)
    head = BetaHead(BetaHeadConfig(hidden_size=64, epsilon=0.5, w_init=0.05, init_std=0.3))
    model = DynamicBetaDPOModel(tiny_model, head, logps_chunk_size=chunk_size)

    ppl = model.compute_ppl(input_ids, attention_mask)
    beta = model.get_dynamic_beta(input_ids, attention_mask)
    assert ppl.shape == beta.shape == (len(rows),) and not ppl.requires_grad
    beta.sum().backward()  # get_dynamic_beta follows the grad mode: the head learns through it
    assert head.w.grad is not None and tiny_model.model.embed_tokens.weight.grad is None  # h and PPL detached
    for i, ids in enumerate(rows):
        log_ppl, h = brute_force(tiny_model, ids)
        torch.testing.assert_close(ppl[i], log_ppl.exp(), atol=1e-4, rtol=1e-5)
        expected = head(h[None].detach(), log_ppl=log_ppl[None].detach())[0]
        torch.testing.assert_close(beta[i], expected, atol=1e-6, rtol=1e-5)


def test_beta_lies_in_its_band_and_epsilon_zero_gives_w_log_ppl(tiny_model, tiny_model_and_tokenizer):
    """β ∈ w·T(PPL)·[1 − ε, 1 + ε]; with ε = 0, β = w · log PPL exactly (the design's formula with f ≡ 1)."""
    tok = tiny_model_and_tokenizer[1]
    input_ids, attention_mask = pad_rows(prompts(len(tok)), tok.pad_token_id, "left")
    for eps in (0.0, 0.3):
        head = BetaHead(BetaHeadConfig(hidden_size=64, epsilon=eps, w_init=0.05, init_std=1.0))
        model = DynamicBetaDPOModel(tiny_model, head)
        with torch.no_grad():
            beta = model.get_dynamic_beta(input_ids, attention_mask)
        w_log_ppl = 0.05 * model.compute_ppl(input_ids, attention_mask).log()
        if eps == 0:
            torch.testing.assert_close(beta, w_log_ppl, atol=1e-6, rtol=1e-5)
        else:
            assert ((beta >= w_log_ppl * (1 - eps) - 1e-6) & (beta <= w_log_ppl * (1 + eps) + 1e-6)).all()
            assert not torch.allclose(beta, w_log_ppl)  # f moves β inside the band


def test_the_design_documents_calls_run(tiny_model, tiny_model_and_tokenizer):
    """The documents' usage, their sketches' bugs fixed: the constructor with a reference, the two methods on a
    padded batch of prompts, the DPO forward on a batch of pairs, and the extended model's logits and β."""
    from conftest import random_pairs
    from lbdpo.data import PreferenceCollator
    from lbdpo.errors import LbdpoError
    from lbdpo.modeling import AutoModelForCausalLMWithBetaHead

    tok = tiny_model_and_tokenizer[1]
    import copy

    beta_head = BetaHead(BetaHeadConfig(hidden_size=tiny_model.config.hidden_size))
    model = DynamicBetaDPOModel(tiny_model, beta_head, ref_model=copy.deepcopy(tiny_model))
    input_ids, attention_mask = pad_rows(prompts(len(tok)), tok.pad_token_id, "right")
    assert model.compute_ppl(input_ids, attention_mask).gt(1).all()
    assert model.get_dynamic_beta(input_ids, attention_mask).gt(0).all()
    out = model(PreferenceCollator(tok.pad_token_id)(random_pairs(3, len(tok))))
    assert out.loss.ndim == 0 and out.beta.shape == (3,)
    with pytest.raises(LbdpoError, match="≥ 2 real tokens"):
        model.compute_ppl(input_ids[:, :1], attention_mask[:, :1])

    extended = AutoModelForCausalLMWithBetaHead(tiny_model, beta_head, tok)
    result = extended(input_ids, attention_mask)
    assert result.logits.shape[:2] == input_ids.shape
    torch.testing.assert_close(result.beta, model.get_dynamic_beta(input_ids, attention_mask))
