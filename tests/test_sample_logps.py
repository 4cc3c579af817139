"""Evaluation's log-probs of generated samples (the KL estimate's two terms) through the run's Scorer, against one
unpadded sequence at a time: every forward path, samples of one prompt paired two by two (an odd one out fills both
slots), empty responses, any order of prompts."""

from __future__ import annotations

import copy

import pytest
import torch

from lbdpo.beta_head import BetaHead, BetaHeadConfig
from lbdpo.dpo_model import DynamicBetaDPOModel
from lbdpo.eval.evaluation import sample_logps
from lbdpo.models import hidden_size_of

FORWARDS = [("rows", "auto", None), ("rows", "auto", 3), ("packed", "segments", None), ("packed", "block_mask", 5)]


@torch.no_grad()
def brute_force(model, prompt: list[int], response: list[int]) -> float:
    """log π(response | prompt): one unpadded sequence, full logits."""
    ids = torch.tensor([prompt + response])
    logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].float(), -1)
    return float(logp.gather(-1, ids[0, 1:, None]).squeeze(-1)[len(prompt) - 1:].sum())


def samples(vocab: int, k: int) -> tuple[list[list[int]], list[list[int]]]:
    """5 prompts × k samples in evaluation's order (the prompt list repeated k times), one prompt sampled once more
    at the end (an odd count), one response empty (an immediate end of turn)."""
    g = torch.Generator().manual_seed(3)

    def ids(lo, hi):
        return torch.randint(3, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    prompts = [ids(2, 12) for _ in range(5)]
    rows = prompts * k + [prompts[2]]
    responses = [ids(1, 10) for _ in rows]
    responses[1] = []
    return rows, responses


@pytest.mark.parametrize("forward,attention,chunk", FORWARDS)
@pytest.mark.parametrize("k", [1, 4])
def test_sample_logps_match_one_sequence_at_a_time(tiny_model, tiny_model_and_tokenizer, forward, attention, chunk, k):
    tok = tiny_model_and_tokenizer[1]
    brute_model = copy.deepcopy(tiny_model).eval()
    head = BetaHead(BetaHeadConfig(hidden_size=hidden_size_of(tiny_model), mode="fixed"))
    scored = DynamicBetaDPOModel(tiny_model.eval(), head, forward=forward, packed_attention=attention,
                                 logps_chunk_size=chunk).eval()
    assert scored.plan.forward == forward
    prompts, responses = samples(len(tok), k)
    got = sample_logps(scored.scorer, tiny_model, prompts, responses, tok.pad_token_id, batch_size=4,
                       device=torch.device("cpu"))
    assert got.shape == (len(prompts),) and got.dtype == torch.float32
    for i, (p, r) in enumerate(zip(prompts, responses)):
        want = brute_force(brute_model, p, r or [tok.pad_token_id])  # an empty response scores one pad token
        assert float(got[i]) == pytest.approx(want, rel=1e-5, abs=1e-4), (i, forward, attention)
    # the order of the samples is theirs, not the batches': reversed in, reversed out
    back = sample_logps(scored.scorer, tiny_model, prompts[::-1], responses[::-1], tok.pad_token_id, batch_size=3,
                        device=torch.device("cpu"))
    torch.testing.assert_close(back, got.flip(0), rtol=1e-5, atol=1e-4)
