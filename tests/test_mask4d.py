"""The rows forward's 4D mask (``lbdpo.logprobs.forward_model``): a decoder that applies a custom 4D mask as given
(sdpa, eager) gets one built on the device, so transformers never reads the 2D padding mask on the host; its logits
equal transformers' own 2D-mask forward at every real position, for left and right padding, and a padded query
(even one with no real key before it) stays finite. Any other decoder gets the 2D mask, unchanged."""

from __future__ import annotations

import copy
import types

import pytest
import torch
import transformers.masking_utils as masking_utils
from transformers import AutoModelForCausalLM, LlamaConfig

from lbdpo.data.collator import pad_rows
from lbdpo.logprobs import forward_model, position_ids_from_mask, row_attention_mask, row_mask_kind

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def decoder(arch: str, attn: str, tiny_model_and_tokenizer):
    """tiny_random (Qwen2, the tests' model) or a tiny Llama (SmolLM2's architecture) on ``attn``."""
    if arch == "qwen2":
        model = copy.deepcopy(tiny_model_and_tokenizer[0])
        model.set_attn_implementation(attn)
    else:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(LlamaConfig(**SMALL), attn_implementation=attn)
    assert model.config._attn_implementation == attn
    return model.eval()


def padded_rows(vocab: int, side: str):
    """Rows of 2..9 tokens (one as long as the batch: no padding), padded on ``side``."""
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in (9, 3, 6, 2)]
    return pad_rows(rows, 0, side)


def transformers_own(model, ids, mask):
    """The forward as transformers runs it from the 2D mask (what forward_model did before)."""
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False).logits


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_the_4d_mask_forward_equals_transformers_2d_mask_forward(tiny_model_and_tokenizer, arch, attn, side,
                                                                 monkeypatch):
    model = decoder(arch, attn, tiny_model_and_tokenizer)
    ids, mask = padded_rows(model.config.vocab_size, side)
    assert (mask == 0).any() and (mask.sum(-1) == mask.shape[1]).any()  # padded rows and an unpadded one
    assert row_mask_kind(model) == ("bool" if attn == "sdpa" else "additive")
    with torch.no_grad():
        expected = transformers_own(model, ids, mask)
        reads = []  # transformers' "can the mask be skipped?" check, which reads the padding mask on the host
        check = masking_utils._ignore_causal_mask_sdpa
        monkeypatch.setattr(masking_utils, "_ignore_causal_mask_sdpa", lambda *a, **k: reads.append(1) or check(*a, **k))
        transformers_own(model, ids, mask)
        assert reads == ([1] if attn == "sdpa" else [])  # the 2D path reads it (eager builds its mask without)
        logits = forward_model(model, ids, mask).logits
        assert len(reads) == (1 if attn == "sdpa" else 0)  # the 4D path never does
    real = mask.bool()
    torch.testing.assert_close(logits[real], expected[real], rtol=1e-6, atol=1e-6)
    assert logits.isfinite().all()  # padded queries too, the left-padded ones with no real key before them


def test_the_mask_is_causal_over_real_keys_and_no_query_row_is_empty():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    got = row_attention_mask(mask)
    assert got.shape == (3, 1, 5, 5) and got.dtype == torch.bool
    for n in range(3):
        for i in range(5):
            for j in range(5):
                assert bool(got[n, 0, i, j]) == ((j <= i and bool(mask[n, j])) or i == j), (n, i, j)
    additive = row_attention_mask(mask, torch.bfloat16)
    assert additive.dtype == torch.bfloat16
    assert torch.equal(additive == 0, got) and (additive[~got] == torch.finfo(torch.bfloat16).min).all()
    assert got.any(-1).all()


class Recorder:
    """A causal LM stand-in that records the mask it is given; ``attn`` is its attention implementation."""

    def __init__(self, attn):
        self.config = types.SimpleNamespace(_attn_implementation=attn)
        self.seen = None

    def __call__(self, **kwargs):
        self.seen = kwargs["attention_mask"]
        return types.SimpleNamespace(logits=None)


@pytest.mark.parametrize("attn", ["flash_attention_2", "flex_attention", None])
def test_other_attention_implementations_keep_the_2d_mask(attn):
    model = Recorder(attn)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    forward_model(model, torch.ones(2, 3, dtype=torch.long), mask)
    assert row_mask_kind(model) is None and model.seen is mask


def test_remote_code_and_sliding_windows_keep_the_2d_mask(tiny_model_and_tokenizer):
    model = copy.deepcopy(tiny_model_and_tokenizer[0])
    assert row_mask_kind(model) == "bool"
    model.config.use_sliding_window = True  # a custom mask would drop the window
    model.set_attn_implementation("eager")  # a switch decides again
    assert row_mask_kind(model) is None
    model.config.use_sliding_window = False
    model.set_attn_implementation("sdpa")
    remote = type("RemoteDecoder", (torch.nn.Module,), {"__module__": "transformers_modules.internlm2"})()
    model.get_decoder = lambda: remote
    model.set_attn_implementation("eager")
    assert row_mask_kind(model) is None
