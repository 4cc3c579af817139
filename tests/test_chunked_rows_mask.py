"""The chunked rows path (``trainer.logps_chunk_size`` set) gives its decoder the 4D mask that ``forward_model`` gives
(``lbdpo.logprobs.row_attention_mask``: built on the device, so transformers never reads the 2D padding mask on the
host) and scores the same log-probs and h as the unchunked rows path, for left and right padding."""

from __future__ import annotations

import copy

import pytest
import torch

from lbdpo.data import PreferenceCollator
from lbdpo.data.collator import IGNORE_INDEX
from lbdpo.logprobs import prompt_ppl_mask
from lbdpo.scoring import ForwardPlan, Scorer


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_chunked_rows_take_the_4d_mask_and_equal_the_unchunked_rows(tiny_model_and_tokenizer, attn, side,
                                                                    monkeypatch):
    from conftest import random_pairs

    model, tok = copy.deepcopy(tiny_model_and_tokenizer[0]), tiny_model_and_tokenizer[1]
    model.set_attn_implementation(attn)
    batch = PreferenceCollator(tok.pad_token_id, side)(random_pairs(4, len(tok), seed=7, prompt_range=(2, 10)))
    ids, mask, labels, lengths = batch["input_ids"], batch["attention_mask"], batch["labels"], batch["prompt_lengths"]
    with torch.no_grad():
        full, full_h = Scorer(ForwardPlan("rows", None, None)).token_logps(model, ids, mask, labels, lengths)
        masks = []  # what the chunked path hands the decoder
        decoder = model.get_decoder()
        forward = decoder.forward
        monkeypatch.setattr(decoder, "forward", lambda *a, **k: masks.append(k["attention_mask"]) or forward(*a, **k))
        chunked, h = Scorer(ForwardPlan("rows", None, 5)).token_logps(model, ids, mask, labels, lengths)
    assert len(masks) == 1 and masks[0].shape == (ids.shape[0], 1, ids.shape[1], ids.shape[1])
    assert masks[0].dtype == (torch.bool if attn == "sdpa" else torch.float32)
    scored = labels[:, 1:] != IGNORE_INDEX
    scored[: len(lengths)] |= prompt_ppl_mask(mask[: len(lengths)], lengths)[:, 1:]
    torch.testing.assert_close(chunked[scored], full[scored], atol=1e-5, rtol=1e-5)
    assert (chunked[~scored] == 0).all()
    torch.testing.assert_close(h, full_h, atol=1e-5, rtol=1e-5)
