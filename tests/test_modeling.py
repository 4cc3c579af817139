"""AutoModelForCausalLMWithBetaHead: one forward gives logits and β; save/load as one unit; β for new prompts
exactly as training computed it; clear errors for bad folders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import TINY_CFG
from lbdpo import AutoModelForCausalLMWithBetaHead, DynamicBetaDPOModel
from lbdpo.data.collator import PreferenceCollator
from lbdpo.data.tokenize import TokenizeConfig, tokenize_pairs

HEAD = {"epsilon": 0.5, "w_init": 0.05, "context_net_type": "mlp", "init_std": 0.5}


@pytest.fixture(scope="module")
def lm():
    model = AutoModelForCausalLMWithBetaHead.from_pretrained(TINY_CFG, beta_head=HEAD)
    model.tokenize = TokenizeConfig(max_length=40, max_prompt_length=12)
    return model.eval()


def test_fresh_head_takes_the_models_hidden_size(lm):
    assert lm.beta_head.config.hidden_size == 64 and lm.beta_head.config.context_net_type == "mlp"
    assert lm.base_model["source"] == "tiny_random"


def test_forward_whole_input_is_the_prompt_by_default(lm):
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    out = lm(ids, mask)
    explicit = lm(ids, mask, prompt_lengths=torch.tensor([5, 3]))
    torch.testing.assert_close(out.beta, explicit.beta)
    assert out.logits.shape == (2, 5, lm.policy.config.vocab_size) and out.hidden.shape == (2, 64)
    # a shorter prompt inside the same rows: the β of the first 3 tokens, as if the row ended there
    head3 = lm(ids[:, :3], mask[:, :3])
    torch.testing.assert_close(lm(ids, mask, prompt_lengths=torch.tensor([3, 3])).beta, head3.beta, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out.beta[0], head3.beta[0])


def test_save_load_round_trip(lm, tmp_path):
    lm.save_pretrained(tmp_path / "m")
    for name in ("config.json", "model.safetensors", "beta_head.safetensors", "beta_head_config.json",
                 "lbdpo_config.json", "README.md", "tokenizer_config.json"):
        assert (tmp_path / "m" / name).is_file(), name
    loaded = AutoModelForCausalLMWithBetaHead.from_pretrained(tmp_path / "m")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    a, b = lm(ids), loaded(ids)
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)
    torch.testing.assert_close(a.beta, b.beta, atol=0, rtol=0)
    assert loaded.tokenize == lm.tokenize
    prompts = ["Tell me about tea.", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                      {"role": "user", "content": "And coffee?"}]]
    torch.testing.assert_close(loaded.beta(prompts), lm.beta(prompts), atol=0, rtol=0)
    # the policy alone, with plain transformers
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(plain(input_ids=ids).logits, a.logits, atol=0, rtol=0)
    assert "from_pretrained" in (tmp_path / "m" / "README.md").read_text()


def test_save_load_round_trip_with_log_w(tmp_path):
    """w_param=log: log w is what the head file holds, it loads back exactly, and the model card gives w itself."""
    model = AutoModelForCausalLMWithBetaHead.from_pretrained(TINY_CFG, beta_head={**HEAD, "w_param": "log"})
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLMWithBetaHead.from_pretrained(tmp_path / "m")
    assert loaded.beta_head.config.w_param == "log"
    torch.testing.assert_close(loaded.beta_head.log_w, model.beta_head.log_w, atol=0, rtol=0)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    torch.testing.assert_close(loaded.eval()(ids).beta, model.eval()(ids).beta, atol=0, rtol=0)
    assert "w = 0.05 (trainable, as log w)" in (tmp_path / "m" / "README.md").read_text()


def test_beta_of_new_prompts_equals_trainings_beta(lm):
    """β from ``beta()`` (prompts as text, tokenized on the fly) = the β the training forward gave the same
    pairs' prompts (tokenized by the data pipeline, inside prompt + response rows, in a padded batch)."""
    import datasets

    long_prompt = "Please write a very long and detailed review of this product " * 3  # left-truncated to 12
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in [
        ("Review the kettle.", "It boils fast and looks nice.", "Bad."),
        ("Is tea good?", "Yes.", "No, never, not at all."),
        (long_prompt, "Great product.", "Meh."),
    ]]
    ds, skips = tokenize_pairs(datasets.Dataset.from_list(rows), lm.tokenizer, lm.tokenize)
    assert not skips and len(ds[2]["prompt_input_ids"]) == 12
    batch = PreferenceCollator(lm.tokenizer.pad_token_id)(list(ds))
    with torch.no_grad():
        trained = DynamicBetaDPOModel(lm, ref_model=lm.policy)(batch).beta
    torch.testing.assert_close(lm.beta([r["prompt"] for r in rows], batch_size=2), trained, atol=1e-6, rtol=1e-5)


def test_bad_folders_name_the_file(lm, tmp_path):
    lm.save_pretrained(tmp_path / "m")
    no_head = tmp_path / "no_head"
    shutil.copytree(tmp_path / "m", no_head)
    (no_head / "beta_head.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no_head/beta_head.safetensors is missing"):
        AutoModelForCausalLMWithBetaHead.from_pretrained(no_head)
    wrong = tmp_path / "wrong"
    shutil.copytree(tmp_path / "m", wrong)
    cfg = json.loads((wrong / "beta_head_config.json").read_text())
    (wrong / "beta_head_config.json").write_text(json.dumps({**cfg, "hidden_size": 32}))
    with pytest.raises(ValueError, match="wrong/beta_head_config.json: hidden_size=32 .* hidden size 64"):
        AutoModelForCausalLMWithBetaHead.from_pretrained(wrong)
    with pytest.raises(ValueError, match="already has a β head"):
        AutoModelForCausalLMWithBetaHead.from_pretrained(tmp_path / "m", beta_head={"epsilon": 0.1})


def test_push_to_hub_offline_is_one_clear_error(lm, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError, match="push_to_hub.*no network"):
        lm.push_to_hub("someone/lbdpo-test")


def test_generate_delegates_to_the_policy(lm):
    ids = torch.tensor([[5, 6, 7]])
    out = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                      pad_token_id=lm.tokenizer.pad_token_id)
    assert out.shape == (1, 6) and out[0, :3].tolist() == [5, 6, 7]


def test_export_folder_and_model_card(lm, tmp_path, monkeypatch, capsys):
    from lbdpo.export import main

    run = tmp_path / "run"
    lm.save_pretrained(run / "checkpoints" / "final")
    (run / "checkpoints" / "final" / "config.yaml").write_text(
        "seed: 3\ndata:\n  train: [{path: data/x.jsonl}]\n  max_length: 40\n  max_prompt_length: 12\n"
        "trainer:\n  max_steps: 7\n  batch_size: 4\n  policy_lr: 1.0e-05\n")
    (run / "metrics.jsonl").write_text('{"step": 7, "loss": 0.6}\n{"step": 7, "eval/loss": 0.5, '
                                       '"eval/rewards/accuracies": 0.8125}\n')
    assert main([str(run / "checkpoints" / "final"), str(tmp_path / "out")]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| held-out accuracy | 0.8125 |" in card and "data/x.jsonl" in card and "7 steps × 4 pairs" in card
    meta = json.loads((tmp_path / "out" / "lbdpo_config.json").read_text())
    assert meta["training_config"]["seed"] == 3 and meta["exported_from"].endswith("final")
    exported = AutoModelForCausalLMWithBetaHead.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(exported.beta(["Hello there"]), lm.beta(["Hello there"]), atol=0, rtol=0)
    assert not (tmp_path / "out" / "trainer_state.pt").exists()

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main([str(run / "checkpoints" / "final"), str(tmp_path / "out2"), "--push-to-hub", "me/x"]) == 1
    errors = [l for l in capsys.readouterr().err.splitlines() if l.startswith(("error", "Traceback"))]
    assert len(errors) == 1 and errors[0].startswith("error: push_to_hub('me/x') failed")
    assert main([str(tmp_path / "nowhere"), str(tmp_path / "out3")]) == 1
    assert "nowhere: no such checkpoint folder" in capsys.readouterr().err
    assert main([str(run / "checkpoints" / "final"), str(tmp_path / "out4"), "--merge-lora"]) == 1
    assert "not a LoRA adapter" in capsys.readouterr().err


def test_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's Python API block, with tiny_random for the embedded model so that it takes seconds."""
    import re

    from conftest import REPO_ROOT

    readme = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"## Python API.*?```python\n(.*?)```", readme, re.S).group(1)
    block = block.replace('"smollm2_gguf"', '"tiny_random"').replace('"my-model"', repr(str(tmp_path / "my-model")))
    monkeypatch.chdir(REPO_ROOT)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["out"].beta.shape == (4,) and torch.isfinite(namespace["out"].loss)
    assert (tmp_path / "my-model" / "beta_head.safetensors").is_file()


def test_dtype_passes_through_and_is_saved_as_a_name(tmp_path):
    lm = AutoModelForCausalLMWithBetaHead.from_pretrained(TINY_CFG, beta_head={"epsilon": 0.1}, dtype=torch.bfloat16)
    assert lm.policy.dtype == torch.bfloat16 and lm.base_model["dtype"] == "bfloat16"
    lm.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "lbdpo_config.json").read_text())["base_model"]["dtype"] == "bfloat16"
    assert AutoModelForCausalLMWithBetaHead.from_pretrained(tmp_path / "m", dtype=torch.bfloat16).policy.dtype == torch.bfloat16


def test_reassigning_tokenize_takes_effect(lm):
    long_prompt = "Describe this kettle in great detail please " * 4
    before = lm.encode_prompts([long_prompt])[0]
    saved = lm.tokenize
    try:
        lm.tokenize = TokenizeConfig(max_length=40, max_prompt_length=6)
        after = lm.encode_prompts([long_prompt])[0]
    finally:
        lm.tokenize = saved
    assert len(before) == 12 and after == before[-6:]
