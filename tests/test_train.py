"""Training loop end to end on the tiny model: metrics, checkpoints, resume, β modes, NaN guard, reference modes."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from conftest import REPO_ROOT, fresh_cache
from lbdpo.train.trainer import train

CONF = str(REPO_ROOT / "conf")
STEP_KEYS = [
    "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
    "logps/rejected", "beta/mean", "beta/std", "beta/min", "beta/max", "log_ppl/mean", "log_ppl/std",
    "beta_head/w", "beta_head/f_mean", "beta_head/f_std", "grad_norm/total", "grad_norm/policy",
    "grad_norm/beta_head",
    "lr/policy", "lr/beta_head", "pairs_per_s", "tokens_per_s",
]
WORDS = "good fine great bad awful nice poor lovely grim superb dull bright".split()


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    rows = []
    for i in range(48):
        rows.append({
            "prompt": f"Review item {i}: {WORDS[i % 12]} {WORDS[(i * 5) % 12]}?",
            "chosen": f"It is {WORDS[(i * 7) % 12]} and {WORDS[(i + 3) % 12]}.",
            "rejected": f"Sadly {WORDS[(i * 3) % 12]}.",
            "domain": "en" if i % 3 else "fr",
        })
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_cfg(pairs_file, *overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=[
            "model=tiny_random", "trainer=tiny", "logger=none", "data=jsonl", f"data.path={pairs_file}",
            "data.max_length=48", "data.max_prompt_length=32", "data.eval_size=8", "data.eval_fraction=null",
            "trainer.batch_size=4", *overrides,
        ])


def read_metrics(run_dir: Path):
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [l for l in lines if "loss" in l], [l for l in lines if "eval/loss" in l]


@pytest.fixture(scope="module")
def default_run(pairs_file, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    cfg = make_cfg(pairs_file, "trainer.max_steps=6", "trainer.save_every=3", "trainer.keep_last=0",
                   "trainer.eval_every=3")
    final = train(cfg, run_dir)
    return run_dir, final


def test_metrics_and_checkpoint(default_run):
    run_dir, final = default_run
    steps, evals = read_metrics(run_dir)
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6]
    for key in STEP_KEYS:
        assert all(key in s and math.isfinite(s[key]) for s in steps), key
    assert [e["step"] for e in evals] == [3, 6]
    assert {"eval/rewards/accuracies", "eval/en/loss", "eval/fr/loss"} <= set(evals[-1])
    assert final["eval/loss"] == evals[-1]["eval/loss"]
    # checkpoints: step-3 and final, the policy loads with stock transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final_dir = run_dir / "checkpoints" / "final"
    assert (run_dir / "checkpoints" / "step-3" / "trainer_state.pt").is_file()
    policy = AutoModelForCausalLM.from_pretrained(final_dir)
    assert AutoTokenizer.from_pretrained(final_dir).pad_token is not None
    assert json.loads((final_dir / "beta_head_config.json").read_text())["mode"] == "learnable"
    # the logged w is the w of the step's forward (before its update): step 4 logs what step 3's update left
    head_state = load_file(run_dir / "checkpoints" / "step-3" / "beta_head.safetensors")
    assert head_state["w"].item() == pytest.approx(steps[3]["beta_head/w"], rel=1e-6)
    assert sum(p.numel() for p in policy.parameters()) > 0
    # no temporary directories left behind
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]


def read_pairs(run_dir: Path) -> dict[int, list[dict]]:
    """pairs.jsonl as step → its rows."""
    out: dict[int, list[dict]] = {}
    for line in (run_dir / "pairs.jsonl").read_text().splitlines():
        row = json.loads(line)
        out.setdefault(row["step"], []).append(row)
    return out


def test_pairs_file_holds_each_training_pair_and_agrees_with_the_step_metrics(default_run, pairs_file):
    """pairs.jsonl: one row per pair per logged step, its domain from the data, and per step the mean of its β,
    loss, log PPL, f and β·Δ equal to metrics.jsonl's beta/mean, loss, log_ppl/mean, f_mean, rewards/margins."""
    run_dir, _ = default_run
    steps, _ = read_metrics(run_dir)
    rows = read_pairs(run_dir)
    assert sorted(rows) == [s["step"] for s in steps]
    train_domains = {json.loads(l)["domain"] for l in pairs_file.read_text().splitlines()}
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    for s in steps:
        step_rows = rows[s["step"]]
        assert len(step_rows) == 4 and {r["domain"] for r in step_rows} <= train_domains
        for column, key in (("beta", "beta/mean"), ("loss", "loss"), ("log_ppl", "log_ppl/mean"),
                            ("f", "beta_head/f_mean")):
            assert mean([r[column] for r in step_rows]) == pytest.approx(s[key], rel=1e-4, abs=1e-6), column
        assert mean([r["beta"] * r["margin"] for r in step_rows]) == pytest.approx(s["rewards/margins"],
                                                                                   rel=1e-3, abs=1e-6)
    assert {r["domain"] for rs in rows.values() for r in rs} == train_domains  # both domains seen in 6 steps


def test_resume_reproduces_uninterrupted_run(default_run, pairs_file, tmp_path):
    run_dir, _ = default_run
    uninterrupted, _ = read_metrics(run_dir)
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(run_dir / "checkpoints" / "step-3", resumed_dir / "checkpoints" / "step-3")
    # the killed run had written lines past step 3: resume must drop them
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (resumed_dir / "metrics.jsonl").write_text("\n".join(lines[:6]) + '\n{"step": 4, "loss": 99}\n{"ste')
    pair_lines = (run_dir / "pairs.jsonl").read_text().splitlines()
    (resumed_dir / "pairs.jsonl").write_text("\n".join(pair_lines[:14]) + '\n{"step": 4, "beta": 9')
    cfg = make_cfg(pairs_file, "trainer.max_steps=6", "trainer.save_every=3", "trainer.eval_every=3",
                   "trainer.resume_from=auto")
    train(cfg, resumed_dir)
    resumed, _ = read_metrics(resumed_dir)
    assert [s["step"] for s in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(uninterrupted[3:], resumed[3:]):
        for key in ("loss", "beta/mean", "beta_head/w", "rewards/margins", "logps/chosen"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)
    # pairs.jsonl: the interrupted run's tail is dropped, and the resumed steps' rows match the uninterrupted run
    before, after = read_pairs(run_dir), read_pairs(resumed_dir)
    assert sorted(after) == [1, 2, 3, 4, 5, 6] and all(len(after[k]) == 4 for k in after)
    for step in (4, 5, 6):
        for a, b in zip(before[step], after[step]):
            assert a["domain"] == b["domain"] and b["beta"] == pytest.approx(a["beta"], abs=1e-5)
            assert b["margin"] == pytest.approx(a["margin"], abs=1e-4)


def test_same_seed_same_curve(default_run, pairs_file, tmp_path):
    run_dir, _ = default_run
    cfg = make_cfg(pairs_file, "trainer.max_steps=6", "trainer.save_every=0", "trainer.eval_every=0")
    train(cfg, tmp_path)
    first, _ = read_metrics(run_dir)
    again, _ = read_metrics(tmp_path)
    assert [s["loss"] for s in again] == pytest.approx([s["loss"] for s in first], abs=1e-6)


def test_fixed_beta_is_constant_and_fixed_w_does_not_move(pairs_file, tmp_path):
    cfg = make_cfg(pairs_file, "beta_head=fixed", "beta_head.beta=0.2", "trainer.max_steps=3", "trainer.eval_every=0")
    train(cfg, tmp_path / "fixed")
    steps, _ = read_metrics(tmp_path / "fixed")
    assert all(s["beta/min"] == pytest.approx(0.2) and s["beta/max"] == pytest.approx(0.2) for s in steps)
    cfg = make_cfg(pairs_file, "beta_head.w_trainable=false", "beta_head.w_init=0.05", "trainer.max_steps=3",
                   "trainer.eval_every=0")
    train(cfg, tmp_path / "fixed_w")
    steps, _ = read_metrics(tmp_path / "fixed_w")
    assert all(s["beta_head/w"] == pytest.approx(0.05) for s in steps)
    assert len({round(s["beta_head/f_mean"], 9) for s in steps}) > 1, "f still learns"


def test_log_w_run_logs_w_and_moves_it_relatively(pairs_file, tmp_path):
    """beta_head.w_param=log through the whole loop: the logged w is exp(log w), it moves, and each Adam step moves
    log w by about beta_head_lr (so w by about that fraction of itself), not w by beta_head_lr."""
    cfg = make_cfg(pairs_file, "beta_head.w_param=log", "beta_head.w_init=0.05", "trainer.beta_head_lr=1e-2",
                   "trainer.max_steps=4", "trainer.eval_every=0")
    train(cfg, tmp_path / "logw")
    steps, _ = read_metrics(tmp_path / "logw")
    ws = [s["beta_head/w"] for s in steps]
    assert len(set(ws)) > 1 and all(w > 0 for w in ws)
    assert all(abs(math.log(w / 0.05)) <= 3e-2 * len(steps) for w in ws)


def test_learnable_w_moves_and_group_lrs(default_run):
    steps, _ = read_metrics(default_run[0])
    assert steps[-1]["beta_head/w"] != steps[0]["beta_head/w"]
    # trainer=tiny: policy_lr 1e-3, beta_head_lr 1e-3 by default → override checked in the next test
    assert steps[0]["lr/beta_head"] / steps[0]["lr/policy"] == pytest.approx(1.0)


def test_optimizer_groups(pairs_file, tiny_model):
    from lbdpo.beta_head import BetaHead, BetaHeadConfig, DynamicBetaDPOModel
    from lbdpo.train.setup import build_optimizer

    cfg = make_cfg(pairs_file, "trainer.policy_lr=1e-6", "trainer.beta_head_lr=1e-2", "trainer.weight_decay=0.1",
                   "trainer.beta_head_weight_decay=0.01")
    head = BetaHead(BetaHeadConfig(hidden_size=64, w_init=0.1))
    opt = build_optimizer(DynamicBetaDPOModel(tiny_model, head), cfg.trainer)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["policy"]["lr"] == 1e-6 and groups["policy"]["weight_decay"] == 0.1
    assert groups["beta_head"]["lr"] == 1e-2 and groups["beta_head"]["weight_decay"] == 0.01
    assert groups["beta_head_w"]["params"] == [head.w] and groups["beta_head_w"]["weight_decay"] == 0.0
    assert len(groups["policy"]["params"]) == len(list(tiny_model.parameters()))
    assert not opt.defaults["fused"]
    cfg.trainer.adamw_fused = True
    assert build_optimizer(DynamicBetaDPOModel(tiny_model, head), cfg.trainer).defaults["fused"]
    # w_param=log: log w takes w's group (its lr, no weight decay), not the NN's
    log_head = BetaHead(BetaHeadConfig(hidden_size=64, w_init=0.1, w_param="log"))
    groups = {g["name"]: g for g in build_optimizer(DynamicBetaDPOModel(tiny_model, log_head), cfg.trainer).param_groups}
    assert groups["beta_head_w"]["params"] == [log_head.log_w] and groups["beta_head_w"]["weight_decay"] == 0.0
    assert all(p is not log_head.log_w for p in groups["beta_head"]["params"])


def test_grad_norms_per_group_are_logged_before_clipping(pairs_file, tmp_path):
    """grad_norm/policy and grad_norm/beta_head: each optimizer group's gradient norm before clipping, with
    total² = policy² + beta_head²; the update then sees both scaled by max_grad_norm / total."""
    seen = []

    def before_update(optimizer, args, kwargs):  # each group's gradient norm as the optimizer receives it
        squares = {"policy": 0.0, "beta_head": 0.0}
        for group in optimizer.param_groups:
            key = "policy" if group["name"] == "policy" else "beta_head"
            squares[key] += sum(float(p.grad.double().pow(2).sum()) for p in group["params"] if p.grad is not None)
        seen.append({k: math.sqrt(v) for k, v in squares.items()})

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    handle = register_optimizer_step_pre_hook(before_update)
    try:
        train(make_cfg(pairs_file, "trainer.max_steps=3", "trainer.eval_every=0", "data.eval_size=null",
                       "trainer.max_grad_norm=0.01"), tmp_path)
    finally:
        handle.remove()
    steps, _ = read_metrics(tmp_path)
    assert len(steps) == len(seen) == 3
    for s, after in zip(steps, seen):
        policy, head, total = s["grad_norm/policy"], s["grad_norm/beta_head"], s["grad_norm/total"]
        assert policy > 0 and total > 0.01
        assert total ** 2 == pytest.approx(policy ** 2 + head ** 2, rel=1e-5)
        assert after["policy"] == pytest.approx(policy * 0.01 / total, rel=1e-4)
        assert after["beta_head"] == pytest.approx(head * 0.01 / total, rel=1e-4, abs=1e-12)
    assert steps[0]["grad_norm/beta_head"] == 0.0 < steps[-1]["grad_norm/beta_head"]  # step 1: policy = reference


def test_nan_guard_skips_and_stops(pairs_file, tmp_path, monkeypatch):
    import lbdpo.dpo_model as dpo_model

    real = dpo_model.dpo_loss
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        losses, c, r = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:  # the second training step's loss is NaN
            losses = losses * float("nan")
        return losses, c, r

    monkeypatch.setattr(dpo_model, "dpo_loss", flaky)
    cfg = make_cfg(pairs_file, "trainer.max_steps=4", "trainer.eval_every=0", "data.eval_size=null")
    train(cfg, tmp_path / "one_nan")
    steps, _ = read_metrics(tmp_path / "one_nan")
    assert [s["train/nonfinite_skips"] for s in steps] == [0, 1, 1, 1]

    monkeypatch.setattr(dpo_model, "dpo_loss", lambda *a, **k: tuple(x * float("nan") for x in real(*a, **k)))
    cfg = make_cfg(pairs_file, "trainer.max_steps=10", "trainer.eval_every=0", "trainer.max_consecutive_nonfinite=3",
                   "data.eval_size=null")
    with pytest.raises(RuntimeError, match="3 consecutive non-finite"):
        train(cfg, tmp_path / "all_nan")


def nan_policy_forward(monkeypatch, bad_calls):
    """Make the policy's forward (the one that scores prompts: token log-probs and h) return NaN on the given
    calls, whichever forward path (packed pairs, rows, full logits) computes them."""
    from lbdpo.dpo_model import DynamicBetaDPOModel

    real, calls = DynamicBetaDPOModel.token_logps_of, {"n": 0}

    def token_logps_of(self, model, *args, score_prompt=True):
        token_lp, h = real(self, model, *args, score_prompt=score_prompt)
        if score_prompt:
            calls["n"] += 1
            if calls["n"] in bad_calls:
                token_lp, h = token_lp * float("nan"), h * float("nan")
        return token_lp, h

    monkeypatch.setattr(DynamicBetaDPOModel, "token_logps_of", token_logps_of)


@pytest.mark.parametrize("head", ["linear", "fixed"])
def test_nan_policy_forward_goes_through_the_guard(pairs_file, tmp_path, monkeypatch, head):
    """NaN from the policy itself (not only from the loss) is skipped and counted, with either β head; on the
    first step it also postpones w_init=auto to the next, finite batch."""
    nan_policy_forward(monkeypatch, bad_calls={1, 3})
    cfg = make_cfg(pairs_file, f"beta_head={head}", "trainer.max_steps=4", "trainer.eval_every=0",
                   "data.eval_size=null")
    train(cfg, tmp_path / "run")
    steps, _ = read_metrics(tmp_path / "run")
    assert [s["train/nonfinite_skips"] for s in steps] == [1, 1, 2, 2]
    assert math.isnan(steps[0]["loss"]) and math.isfinite(steps[1]["loss"]) and math.isfinite(steps[3]["loss"])
    head_state = load_file(tmp_path / "run" / "checkpoints" / "final" / "beta_head.safetensors")
    assert torch.isfinite(head_state["w"])
    if head == "linear":
        assert bool(head_state["w_initialized"])

    nan_policy_forward(monkeypatch, bad_calls=set(range(1, 100)))
    cfg = make_cfg(pairs_file, f"beta_head={head}", "trainer.max_steps=10", "trainer.eval_every=0",
                   "trainer.max_consecutive_nonfinite=3", "data.eval_size=null")
    with pytest.raises(RuntimeError, match="3 consecutive non-finite"):
        train(cfg, tmp_path / "all_nan")


def test_precompute_reference_matches_copy(pairs_file, tmp_path, monkeypatch):
    monkeypatch.setenv("LBDPO_CACHE_REFERENCE", str(tmp_path))
    runs = {}
    for mode in ("copy", "precompute"):
        cfg = make_cfg(pairs_file, f"trainer.reference={mode}", "trainer.max_steps=3", "trainer.eval_every=3")
        train(cfg, tmp_path / mode)
        runs[mode] = read_metrics(tmp_path / mode)
    for key in ("loss", "rewards/margins"):
        assert [s[key] for s in runs["precompute"][0]] == pytest.approx([s[key] for s in runs["copy"][0]], abs=1e-5)
    assert runs["precompute"][1][-1]["eval/loss"] == pytest.approx(runs["copy"][1][-1]["eval/loss"], abs=1e-5)


def test_auto_reference_precomputes_a_whole_epoch_and_copies_a_short_run(pairs_file, tmp_path, monkeypatch, caplog):
    """trainer.reference=auto (the CPU default): one epoch (40 pairs, 10 steps) precomputes, 2 steps keep a copy."""
    monkeypatch.setenv("LBDPO_CACHE", fresh_cache(tmp_path / "cache"))
    caplog.set_level("INFO", logger="lbdpo.train.reference")
    train(make_cfg(pairs_file, "trainer.reference=auto", "trainer.max_steps=null", "trainer.num_epochs=1",
                   "trainer.eval_every=0"), tmp_path / "epoch")
    assert "trainer.reference=auto → precompute (the run reads 40 pairs of a 40-pair training split)" in caplog.text
    assert list((tmp_path / "cache" / "reference_logps").glob("*.pt"))  # scored and cached
    caplog.clear()
    train(make_cfg(pairs_file, "trainer.reference=auto", "trainer.max_steps=2", "trainer.eval_every=0"),
          tmp_path / "short")
    assert "trainer.reference=auto → copy (the run reads 8 pairs of a 40-pair training split)" in caplog.text


def test_lora_with_adapter_disabled_reference(pairs_file, tmp_path):
    cfg = make_cfg(pairs_file, "trainer.lora.enabled=true", "trainer.lora.r=4", "trainer.reference=adapter_disabled",
                   "trainer.max_steps=2", "trainer.eval_every=0", "trainer.lora.save_merged=true")
    train(cfg, tmp_path)
    steps, _ = read_metrics(tmp_path)
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # adapter starts at zero: policy == reference
    final = tmp_path / "checkpoints" / "final"
    assert (final / "adapter_config.json").is_file()
    from transformers import AutoModelForCausalLM

    from lbdpo import AutoModelForCausalLMWithBetaHead

    merged = AutoModelForCausalLM.from_pretrained(final / "merged")
    lm = AutoModelForCausalLMWithBetaHead.from_pretrained(final)  # the adapter on its base, from lbdpo_config.json
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(lm(ids).logits, merged(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_incompatible_options_raise(pairs_file, tmp_path):
    cfg = make_cfg(pairs_file, "trainer.reference=adapter_disabled")
    with pytest.raises(ValueError, match="trainer.lora.enabled"):
        train(cfg, tmp_path)
    cfg = make_cfg(pairs_file, "trainer.reference=magic")
    with pytest.raises(ValueError, match="trainer.reference"):
        train(cfg, tmp_path)


def test_two_process_ddp_matches_one_process(pairs_file, tmp_path):
    """Two CPU processes (DDP on gloo, launched with torchrun, which Accelerate picks up) give the same losses
    as one process with the same global batch. (`accelerate launch --cpu` in accelerate 1.15 starts a single
    process unless an MPI hostfile is configured, so torchrun is the CPU launcher; see docs/training.md.)"""
    common = ["model=tiny_random", "trainer=tiny", "logger=none", "data=jsonl", f"data.path={pairs_file}",
              "data.max_length=48", "data.max_prompt_length=32", "data.eval_size=8", "data.eval_fraction=null",
              "trainer.max_steps=3",
              "trainer.eval_every=3", "beta_head.w_init=0.1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), *common, "trainer.batch_size=4",
                          f"hydra.run.dir={tmp_path / 'one'}"], capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          str(REPO_ROOT / "train.py"), *common, "trainer.batch_size=2",
                          f"hydra.run.dir={tmp_path / 'two'}"], capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    s1, e1 = read_metrics(tmp_path / "one")
    s2, e2 = read_metrics(tmp_path / "two")
    assert len(s1) == len(s2) == 3
    for a, b in zip(s1, s2):
        for key in ("loss", "rewards/margins", "beta/mean", "beta/std"):
            assert b[key] == pytest.approx(a[key], abs=1e-4), (a["step"], key)
    assert e2[-1]["eval/loss"] == pytest.approx(e1[-1]["eval/loss"], abs=1e-4)
    # pairs.jsonl gathers both processes' pairs: each step holds the same 4 pairs as the one-process run
    p1, p2 = read_pairs(tmp_path / "one"), read_pairs(tmp_path / "two")
    assert sorted(p1) == sorted(p2) == [1, 2, 3]
    key = lambda r: (r["domain"], round(r["margin"], 3))  # noqa: E731
    for step in p1:
        assert sorted(map(key, p2[step])) == sorted(map(key, p1[step])), step


def test_gradient_checkpointing_gives_same_losses(default_run, pairs_file, tmp_path):
    cfg = make_cfg(pairs_file, "trainer.max_steps=6", "trainer.eval_every=0", "trainer.gradient_checkpointing=true")
    train(cfg, tmp_path)
    steps, _ = read_metrics(tmp_path)
    reference, _ = read_metrics(default_run[0])
    assert [s["loss"] for s in steps] == pytest.approx([s["loss"] for s in reference], abs=1e-5)


def test_fused_adamw_gives_the_same_run(default_run, pairs_file, tmp_path):
    cfg = make_cfg(pairs_file, "trainer.max_steps=6", "trainer.eval_every=0", "trainer.adamw_fused=true")
    train(cfg, tmp_path)
    steps, _ = read_metrics(tmp_path)
    reference, _ = read_metrics(default_run[0])
    for key in ("loss", "beta_head/w", "rewards/margins"):
        assert [s[key] for s in steps] == pytest.approx([s[key] for s in reference], abs=1e-5), key


def test_compiled_decoder_gives_the_same_run(default_run, pairs_file, tmp_path, monkeypatch):
    """trainer.compile=true: the policy's and the reference's decoders go through torch.compile, and the first
    step's loss, log PPL, margins and gradient norm equal the eager run's up to float rounding (fused kernels
    reorder sums: gradients agree to ~1e-6 relative). Later steps are compared loosely: on this tiny random model,
    Adam turns rounding-level differences of near-zero gradient entries into lr-sized steps, and by step 3 the
    two runs' losses differ by ~1e-2, as two eager runs with any other order of sums would."""
    import torch

    compiled, real = [], torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, *a, **k: (compiled.append(type(self).__name__), real(self, *a, **k))[1])
    cfg = make_cfg(pairs_file, "trainer.max_steps=3", "trainer.eval_every=0", "trainer.compile=true")
    train(cfg, tmp_path)
    assert compiled == ["Qwen2Model", "Qwen2Model"]  # the policy's decoder and the reference copy's
    steps, _ = read_metrics(tmp_path)
    reference, _ = read_metrics(default_run[0])
    for key in ("loss", "rewards/margins", "log_ppl/mean", "grad_norm/total"):
        assert steps[0][key] == pytest.approx(reference[0][key], rel=1e-5, abs=1e-6), key
    assert [s["loss"] for s in steps] == pytest.approx([s["loss"] for s in reference[:3]], abs=0.05)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_pinned_malloc_threshold_gives_the_same_run(default_run, pairs_file, tmp_path):
    """Where freed memory goes changes nothing computed (own process: the setting is process-wide)."""
    out = subprocess.run([
        sys.executable, str(REPO_ROOT / "train.py"), "model=tiny_random", "trainer=tiny", "logger=none", "data=jsonl",
        f"data.path={pairs_file}", "data.max_length=48", "data.max_prompt_length=32", "data.eval_size=8",
        "data.eval_fraction=null", "trainer.batch_size=4", "trainer.max_steps=6", "trainer.eval_every=0",
        "trainer.malloc_mmap_threshold=131072", f"hydra.run.dir={tmp_path}"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "allocations of ≥ 131072 bytes are mmap'ed" in out.stdout + out.stderr
    steps, _ = read_metrics(tmp_path)
    reference, _ = read_metrics(default_run[0])
    assert [s["loss"] for s in steps] == pytest.approx([s["loss"] for s in reference], abs=1e-6)


def test_wandb_offline_run_is_written(pairs_file, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc → auto mode must pick offline
    cfg = make_cfg(pairs_file, "logger=wandb", "logger.histogram_every=1", "trainer.max_steps=2",
                   "trainer.eval_every=0", "data.eval_size=null")
    train(cfg, tmp_path / "run")
    offline = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))


def test_tensorboard_events_hold_the_logged_metrics(pairs_file, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_cfg(pairs_file, "logger=tensorboard", "logger.histogram_every=1", "trainer.max_steps=2",
                   "trainer.eval_every=0", "data.eval_size=null")
    train(cfg, tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    steps, _ = read_metrics(tmp_path)
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([s["loss"] for s in steps])
    assert "beta/hist" in events.Tags()["histograms"]


@pytest.mark.parametrize("where", ["forward", "optimizer.step", "eval"])
def test_interrupt_saves_a_whole_step_and_resume_continues(default_run, pairs_file, tmp_path, monkeypatch, where):
    """SIGINT inside step 3's forward, inside its AdamW update (parameters half-moved), or inside its eval:
    the step finishes, checkpoints/step-3 holds it whole, and resuming reproduces the uninterrupted run."""
    import os
    import signal

    import lbdpo.dpo_model as dpo_model
    import lbdpo.train.trainer as trainer

    calls = {"forward": 0, "optimizer.step": 0, "eval": 0}

    def ctrl_c_at(name, fn, at):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            if name == where and calls[name] == at:
                os.kill(os.getpid(), signal.SIGINT)  # a real signal, delivered inside the call
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(dpo_model, "dpo_loss", ctrl_c_at("forward", dpo_model.dpo_loss, 3))
    monkeypatch.setattr(torch.optim.AdamW, "step", ctrl_c_at("optimizer.step", torch.optim.AdamW.step, 3))
    monkeypatch.setattr(trainer, "evaluate_pairs", ctrl_c_at("eval", trainer.evaluate_pairs, 1))
    overrides = ("trainer.max_steps=6", "trainer.save_every=3", "trainer.keep_last=0", "trainer.eval_every=3")
    with pytest.raises(KeyboardInterrupt):
        train(make_cfg(pairs_file, *overrides), tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-3"]
    monkeypatch.undo()
    train(make_cfg(pairs_file, *overrides, "trainer.resume_from=auto"), tmp_path)
    resumed, evals = read_metrics(tmp_path)
    uninterrupted, uninterrupted_evals = read_metrics(default_run[0])
    assert [s["step"] for s in resumed] == [1, 2, 3, 4, 5, 6]
    assert [s["loss"] for s in resumed] == pytest.approx([s["loss"] for s in uninterrupted], abs=1e-5)
    assert [e["step"] for e in evals] == [3, 6]
    assert evals[-1]["eval/loss"] == pytest.approx(uninterrupted_evals[-1]["eval/loss"], abs=1e-5)


def test_a_second_ctrl_c_aborts_without_saving(pairs_file, tmp_path, monkeypatch):
    import os
    import signal

    import lbdpo.dpo_model as dpo_model

    real, calls = dpo_model.dpo_loss, {"n": 0}

    def twice(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(dpo_model, "dpo_loss", twice)
    with pytest.raises(KeyboardInterrupt):
        train(make_cfg(pairs_file, "trainer.max_steps=4", "trainer.eval_every=0"), tmp_path)
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())


def test_ppl_approx_head_trains_and_logs(pairs_file, tmp_path, capsys):
    from lbdpo import AutoModelForCausalLMWithBetaHead
    from lbdpo.eval.ppl_approx import main as ppl_approx_main

    cfg = make_cfg(pairs_file, "beta_head.use_ppl_approx=true", "beta_head.ppl_net_type=mlp", "trainer.max_steps=4",
                   "trainer.eval_every=2")
    train(cfg, tmp_path)
    steps, evals = read_metrics(tmp_path)
    assert all(math.isfinite(s["ppl_approx/mae"]) and "ppl_approx/spearman_beta" in s for s in steps)
    assert {"eval/ppl_approx/mae", "eval/ppl_approx/r2", "eval/ppl_approx/spearman_beta"} <= set(evals[-1])
    lm = AutoModelForCausalLMWithBetaHead.from_pretrained(tmp_path / "checkpoints" / "final")
    assert lm.beta_head.config.use_ppl_approx and bool(lm.beta_head.ppl_net_initialized)
    out = lm(torch.tensor([[5, 6, 7, 8, 9]]))
    assert out.beta.shape == (1,) and torch.isfinite(out.beta).all()
    assert out.log_ppl_approx.shape == (1,) and out.beta_exact.shape == (1,)
    ppl_approx_main([str(tmp_path / "checkpoints" / "final"), "--data", str(pairs_file)])
    table = capsys.readouterr().out
    assert "48 distinct prompts" in table and "| all | 48 |" in table and "| fr | 16 |" in table


@pytest.mark.parametrize("reference", ["copy", "precompute"])
def test_chunked_and_packed_runs_match_the_full_logits_run(pairs_file, tmp_path, reference, monkeypatch, capsys):
    """Whole runs, one per path of ``trainer.forward``: the packed default (auto on CPU: attention per segment), packed
    rows under a block mask and chunked rows give the one-row-per-response full-logits run's losses, margins, β, log
    PPL and evaluation, with the reference as a copy or precomputed (through the same path); with the copy also packed
    rows rounded up to a multiple (``trainer.pad_to_multiple_of`` reaches the packing). The banner names each path."""
    import lbdpo.packed_pairs as packed_pairs

    runs, widths = {}, {}  # widths: the packed rows' width of every forward, per arm
    arms = {"full": ["trainer.forward=rows", "trainer.logps_chunk_size=null"],
            "chunked": ["trainer.forward=rows", "trainer.logps_chunk_size=16"],
            "packed": ["trainer.logps_chunk_size=16"],  # the default: forward=auto
            "block_mask": ["trainer.forward=packed", "trainer.packed_attention=block_mask"],
            "flex": ["trainer.forward=packed", "trainer.packed_attention=flex"]}
    banners = {"full": "one row per response, full logits", "chunked": "one row per response, chunked log-probs (16)",
               "packed": "packed pairs, attention per segment (one row)", "block_mask": "packed pairs, rows under a block mask",
               "flex": "packed pairs, rows under a FlexAttention block mask"}
    if reference == "copy":  # padding columns only
        arms["packed_rounded"] = [*arms["packed"], "trainer.pad_to_multiple_of=16"]
    pack = packed_pairs.pack_pairs

    def recording_pack(*args, **kwargs):
        packed = pack(*args, **kwargs)
        widths[arm].append(packed.input_ids.shape[1])
        return packed

    monkeypatch.setattr(packed_pairs, "pack_pairs", recording_pack)
    for arm, overrides in arms.items():
        widths[arm] = []
        monkeypatch.setenv("LBDPO_CACHE", fresh_cache(tmp_path / arm / "cache"))  # each arm computes its own reference
        cfg = make_cfg(pairs_file, *overrides, "trainer.max_steps=3", "trainer.eval_every=3",
                       f"trainer.reference={reference}")
        train(cfg, tmp_path / arm)
        runs[arm] = read_metrics(tmp_path / arm)
        assert arm not in banners or banners[arm] in capsys.readouterr().out  # the banner's "forward" row
    assert not widths["full"] and not widths["chunked"] and widths["packed"] and widths["block_mask"]
    if reference == "copy":
        assert all(w % 16 == 0 for w in widths["packed_rounded"]) and widths["packed_rounded"] != widths["packed"]
    for arm in arms.keys() - {"full"}:
        for key in ("loss", "rewards/margins", "beta/mean", "log_ppl/mean"):
            assert [s[key] for s in runs[arm][0]] == pytest.approx([s[key] for s in runs["full"][0]], abs=1e-5), key
        assert runs[arm][1][-1]["eval/loss"] == pytest.approx(runs["full"][1][-1]["eval/loss"], abs=1e-5)


def test_health_problems_name_collapse_zero_gradient_and_clamped_beta():
    from lbdpo.train.trainer import health_problems

    fine = {"loss": 0.6, "log_ppl/mean": 3.0, "grad_norm/total": 1.2, "beta/min": 0.05, "beta/max": 0.2}
    assert health_problems(fine, 3.1, 1000, 1e-4, 1e4) == {}
    collapsed = {**fine, "loss": math.log(2), "log_ppl/mean": 6.5, "grad_norm/total": 0.0}
    assert set(health_problems(collapsed, 3.1, 1000, 1e-4, 1e4)) == {"collapse", "zero_grad"}
    # a random model starts near uniform: that is not a collapse
    assert "collapse" not in health_problems({**fine, "log_ppl/mean": 6.9}, 6.9, 1000, 1e-4, 1e4)
    assert set(health_problems({**fine, "beta/min": 1e-4, "beta/max": 1e-4}, 3.1, 1000, 1e-4, 1e4)) == {"beta_min"}
    assert set(health_problems({**fine, "beta/min": 1e4, "beta/max": 1e4}, 3.1, 1000, 1e-4, 1e4)) == {"beta_max"}


def test_a_destroyed_policy_is_reported(pairs_file, tmp_path, caplog):
    """policy_lr=1e3 wrecks the model without any NaN: the run says so in its log."""
    cfg = make_cfg(pairs_file, "trainer.policy_lr=1e3", "trainer.max_steps=4", "trainer.eval_every=0",
                   "data.eval_size=null", "trainer.max_grad_norm=0")
    train(cfg, tmp_path)
    assert "!!! this run has a problem" in caplog.text


@pytest.mark.parametrize("override, key", [
    ("trainer.label_smoothing=0.5", "trainer.label_smoothing"),
    ("trainer.policy_lr=-1", "trainer.policy_lr"),
    ("trainer.max_grad_norm=-1", "trainer.max_grad_norm"),
    ("trainer.mixed_precision=fp8", "trainer.mixed_precision"),
    ("trainer.resume_from=/nonexistent/step-3", "trainer.resume_from"),
    ("beta_head.w_init=1e39", "beta_head.w_init"),
    ("beta_head.epsilon=1.5", "beta_head.epsilon"),
])
def test_invalid_options_fail_before_anything_loads(pairs_file, tmp_path, monkeypatch, override, key):
    import lbdpo.train.setup as setup_module

    def no_loading(*args, **kwargs):
        raise AssertionError("models were loaded before the config was checked")

    monkeypatch.setattr(setup_module, "build_model_and_data", no_loading)
    with pytest.raises((ValueError, FileNotFoundError), match=key.replace(".", r"\.")):
        train(make_cfg(pairs_file, override), tmp_path / "run")
    assert not Path("/nonexistent").exists()
