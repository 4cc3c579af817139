"""beta_head.objective=validation: the look-ahead hypergradient against exact autograd (double backward), the held-out
slice, the refusals, and training runs (metrics, the policy's gradient unchanged, resume, two processes)."""

from __future__ import annotations

import copy
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from conftest import TINY_CFG, random_pairs, train_two_processes
from test_train import make_cfg, pairs_file, read_metrics  # noqa: F401  (pairs_file: the module fixture)
from lbdpo.beta_head import BetaHead, BetaHeadConfig
from lbdpo.data.collator import PreferenceCollator
from lbdpo.dpo_model import DynamicBetaDPOModel
from lbdpo.errors import LbdpoError
from lbdpo.losses import dpo_loss
from lbdpo.models import freeze, load_model_and_tokenizer
from lbdpo.train import beta_validation as bv
from lbdpo.train.trainer import train

VAL = ("beta_head.objective=validation", "beta_head.w_init=0.05")


# ---------------------------------------------------------------------------------------------- the hypergradient


def perturbed_policy():
    """tiny_random as policy (eager attention: sdpa's CPU kernel has no double backward), its frozen copy as
    reference, then the policy nudged by 2 % of each parameter's sd so that margins are not 0: (policy, reference,
    tokenizer)."""
    torch.manual_seed(0)
    policy, tok = load_model_and_tokenizer(TINY_CFG)
    policy.set_attn_implementation("eager")
    reference = freeze(copy.deepcopy(policy))
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * p.std() * torch.randn_like(p))
    return policy, reference, tok


@pytest.fixture(scope="module")
def setting():
    """A policy a little away from its reference (margins ≠ 0), a head whose β differs per pair, two training
    micro-batches of 3 pairs and a held-out one. Eager attention: sdpa's CPU kernel has no double backward."""
    policy, reference, tok = perturbed_policy()
    head = BetaHead(BetaHeadConfig(hidden_size=64, epsilon=0.5, w_init=0.03, init_std=0.5))
    collate = PreferenceCollator(tok.pad_token_id)
    batches = [collate(random_pairs(3, 2000, seed=s)) for s in (1, 2)]
    return policy, reference, head, batches, collate(random_pairs(3, 2000, seed=3))


def dpo_model(setting, forward="rows", label_smoothing=0.0):
    policy, reference, head, _, _ = setting
    return DynamicBetaDPOModel(policy, head, ref_model=reference, forward=forward, packed_attention="block_mask",
                               label_smoothing=label_smoothing)


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors]).double()


def exact_hypergradients(model, batches, val_batch, eta, val_beta):
    """By double backward: (first order, −η ∇φ (v · ∇θ L) with v = ∇θ L_val(θ) fixed; the look-ahead itself,
    ∇φ L_val(θ − η ∇θ L(θ, φ)) through functional_call)."""
    params = {k: p for k, p in model.policy_model.named_parameters() if p.requires_grad}
    head_params = bv.head_beta_parameters(model.beta_head)
    out = model(val_batch)
    v = torch.autograd.grad(dpo_loss(out.policy_chosen_logps, out.policy_rejected_logps, out.reference_chosen_logps,
                                     out.reference_rejected_logps, val_beta,
                                     label_smoothing=model.label_smoothing)[0].mean(), list(params.values()))
    train_loss = lambda: sum(model(b).loss for b in batches) / len(batches)  # noqa: E731  (the trainer's L)
    g = torch.autograd.grad(train_loss(), list(params.values()), create_graph=True)
    first = torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, v)), head_params)
    g = torch.autograd.grad(train_loss(), list(params.values()), create_graph=True)
    ahead = {f"policy.{k}": p - eta * gi for (k, p), gi in zip(params.items(), g)}
    logps = torch.func.functional_call(bv._PolicyScore(model.policy_model, model.scorer), ahead, (val_batch,),
                                       tie_weights=True)
    n = val_batch["prompt_lengths"].shape[0]
    ref_chosen, ref_rejected = model.reference_logps(val_batch)
    val_loss = dpo_loss(logps[:n], logps[n:], ref_chosen, ref_rejected, val_beta,
                        label_smoothing=model.label_smoothing)[0].mean()
    return flat([-eta * x for x in first]), flat(torch.autograd.grad(val_loss, head_params))


@pytest.mark.parametrize("forward,label_smoothing", [("rows", 0.0), ("packed", 0.1)])
def test_hypergradient_matches_double_backward(setting, forward, label_smoothing):
    """The finite-difference hypergradient against exact autograd. Measured (tiny_random, float32, FD_STEP 0.01):
    relative error 2.8e-3 against the first-order formula; the look-ahead itself differs from the first order by
    3e-4 at η = 1e-4; both asserted < 1e-2."""
    model = dpo_model(setting, forward, label_smoothing)
    _, _, _, batches, val_batch = setting
    records = [bv.MicroBatch.of(b, model(b)) for b in batches]
    assert all(r.delta.abs().max() > 0.1 for r in records)  # a real margin, not the reference's 0
    first, ahead = exact_hypergradients(model, batches, val_batch, 1e-4, 0.1)
    grads, val_loss = bv.hypergradient(model, records, val_batch, 1e-4, 0.1)
    found = flat(grads)
    assert len(grads) == len(bv.head_beta_parameters(model.beta_head)) == 3  # w, the context net's weight and bias
    assert (found - first).norm() / first.norm() < 1e-2
    assert (found - ahead).norm() / ahead.norm() < 1e-2
    assert first.norm() > 0 and val_loss > 0
    # the held-out loss is at β₀, not the head's β: another β₀ gives another loss and hypergradient
    other, other_loss = bv.hypergradient(model, records, val_batch, 1e-4, 0.5)
    assert other_loss != pytest.approx(val_loss) and (flat(other) - found).norm() > 1e-3 * found.norm()


def test_margin_derivatives_match_autograd(setting):
    """d_i = ∇θ Δ_i · v for each pair, v the held-out gradient, by autograd one pair at a time, against the
    finite difference."""
    model = dpo_model(setting)
    batch = setting[3][0]
    params = {k: p for k, p in model.policy_model.named_parameters() if p.requires_grad}
    _, v = bv.heldout_gradient(model, setting[4], params, 0.1)
    found = bv.margin_derivatives(model, batch, params, v)
    exact = []
    for i in range(3):
        logps = model.scorer.response_logps(model.policy_model, batch)
        grads = torch.autograd.grad(logps[i] - logps[3 + i], list(params.values()))
        exact.append(sum(float((g * v[k]).sum()) for g, k in zip(grads, params)))
    exact = torch.tensor(exact)
    assert torch.allclose(found, exact, rtol=1e-2, atol=1e-2 * float(exact.abs().max()))
    zero = {k: torch.zeros_like(p) for k, p in params.items()}
    assert bv.margin_derivatives(model, batch, params, zero).eq(0).all()
    assert all(p is params[k] for k, p in model.policy_model.named_parameters())  # nothing replaced or moved


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_beta_derivative_of_g(label_smoothing):
    """∂g/∂β·N by autograd through dpo_loss against the closed form (ε_ls = 0) and a central difference of
    g(β) = ∂ℓ(βΔ)/∂Δ = β ℓ'(βΔ) with ℓ'(z) = −(1 − ε)σ(−z) + εσ(z)."""
    beta = torch.tensor([0.05, 0.1, 0.3, 1.0, 2.0], dtype=torch.float64)
    delta = torch.tensor([-3.0, 0.5, 4.0, -0.2, 1.5], dtype=torch.float64)
    found = bv.beta_derivative_of_g(beta, delta, label_smoothing)
    g = lambda b: b * (-(1 - label_smoothing) * torch.sigmoid(-b * delta) + label_smoothing * torch.sigmoid(b * delta))  # noqa: E731
    h = 1e-6
    assert torch.allclose(found, (g(beta + h) - g(beta - h)) / (2 * h), rtol=1e-6, atol=1e-9)
    if label_smoothing == 0:
        z = beta * delta
        assert torch.allclose(found, -torch.sigmoid(-z) * (1 - z * torch.sigmoid(z)), rtol=1e-10)


# ---------------------------------------------------------------------------------------------- the held-out slice


def test_held_out_slice_is_seeded_disjoint_and_counted():
    from datasets import Dataset

    from lbdpo.data.loading import hold_out_pairs

    ds = Dataset.from_dict({"i": list(range(50))})
    ids = lambda d: list(d["i"])  # noqa: E731
    rest, held = hold_out_pairs(ds, 0.1, seed=3)
    assert len(held) == 5 and len(rest) == 45 and sorted(ids(rest) + ids(held)) == list(range(50))
    assert ids(rest) == sorted(ids(rest)) and ids(held) == sorted(ids(held))  # both keep the data's order
    assert ids(hold_out_pairs(ds, 0.1, seed=3)[1]) == ids(held)  # seeded
    assert ids(hold_out_pairs(ds, 0.1, seed=4)[1]) != ids(held)
    assert len(hold_out_pairs(ds, 0.001, seed=0)[1]) == 1  # at least one pair
    same, none = hold_out_pairs(ds, 0, seed=0)
    assert same is ds and len(none) == 0
    for bad in (1.0, -0.1):
        with pytest.raises(LbdpoError, match="data.beta_val_fraction"):
            hold_out_pairs(ds, bad)


def test_held_out_batches_are_a_function_of_seed_and_step():
    from datasets import Dataset

    ds = Dataset.from_dict({"prompt_input_ids": [[1, 2, 3]] * 10, "chosen_input_ids": [[4, i + 5] for i in range(10)],
                            "rejected_input_ids": [[6]] * 10})
    collate = PreferenceCollator(0)
    one = bv.HeldOutBatches(ds, collate, 2, seed=0)
    assert [one.indices(t) for t in range(1, 8)] == [bv.HeldOutBatches(ds, collate, 2, 0).indices(t)
                                                     for t in range(1, 8)]  # no state: resume draws the same
    assert one.indices(6) != bv.HeldOutBatches(ds, collate, 2, seed=1).indices(6)
    first_pass = [i for t in range(1, 6) for i in one.indices(t)]
    assert sorted(first_pass) == list(range(10))  # each pass visits every held-out pair once
    assert [i for t in range(6, 11) for i in one.indices(t)] != first_pass  # a new permutation per pass
    # two processes draw together, at each step, the pairs one process draws with their global batch
    wide = bv.HeldOutBatches(ds, collate, 4, seed=0)
    ranks = [bv.HeldOutBatches(ds, collate, 2, 0, rank=r, processes=2) for r in (0, 1)]
    for t in (1, 2, 3, 7):
        assert ranks[0].indices(t) + ranks[1].indices(t) == wide.indices(t)
    batch = one.batch(3)
    assert batch["input_ids"].shape[0] == 4 and batch["prompt_lengths"].tolist() == [3, 3]
    with pytest.raises(LbdpoError, match="data.beta_val_fraction"):
        bv.HeldOutBatches(ds, collate, 6, seed=0, processes=2)


# ---------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("options,key", [
    ({"mode": "fixed"}, "mode=fixed"), ({"mode": "beta_dpo"}, "mode=beta_dpo"),
    ({"mode": "schedule", "schedule": [[0, 0.1]]}, "mode=schedule"),
    ({"mode": "per_domain", "domain_betas": {"a": 1.0}}, "mode=per_domain"),
    ({"detach_hidden": False}, "beta_head.detach_hidden"), ({"detach_ppl": False}, "beta_head.detach_ppl"),
    ({"context_net_type": "mlp", "dropout": 0.1}, "beta_head.dropout"),
    ({"w_trainable": False, "epsilon": 0.0}, "no trainable parameter"),
    ({"val_every": 0}, "beta_head.val_every"), ({"val_every": 1.5}, "beta_head.val_every"),
    ({"val_beta": -0.1}, "beta_head.val_beta"), ({"objective": "held_out"}, "beta_head.objective"),
])
def test_incompatible_head_options_are_refused(options, key):
    config = {"objective": "validation", "hidden_size": 8, **options}
    with pytest.raises(LbdpoError, match=key):
        BetaHeadConfig(**config)
    if "objective" not in options and "val_" not in key:
        BetaHeadConfig(**{**config, "objective": "dpo"})  # the same options train on the DPO loss


@pytest.mark.parametrize("override,kind,key", [
    ("data.beta_val_fraction=0", "NO", "data.beta_val_fraction=0"),
    ("data.beta_val_fraction=1.5", "NO", "data.beta_val_fraction=1.5"),
    ("trainer.compile=true", "NO", "trainer.compile"),
    ("trainer.mixed_precision=fp16", "NO", "trainer.mixed_precision=fp16"),
    (None, "DEEPSPEED", "DEEPSPEED"), (None, "FSDP", "FSDP"),
])
def test_launches_it_cannot_serve_are_refused_before_loading(pairs_file, tmp_path, override, kind, key):  # noqa: F811
    cfg = make_cfg(pairs_file, *VAL, *([override] if override else []))
    with pytest.raises(LbdpoError, match=key):
        bv.check_launch(cfg, SimpleNamespace(distributed_type=DistributedType[kind]))
    bv.check_launch(make_cfg(pairs_file), SimpleNamespace(distributed_type=DistributedType[kind]))  # dpo: fine
    if override and override.startswith("data."):  # through train(): before anything loads
        import lbdpo.train.setup as setup_module

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(setup_module, "build_model_and_data", lambda *a, **k: pytest.fail("loaded before checking"))
            with pytest.raises(LbdpoError, match=key):
                train(cfg, tmp_path)


def test_half_precision_policy_weights_are_refused(pairs_file, tiny_model):  # noqa: F811
    head = BetaHead(BetaHeadConfig(hidden_size=64, objective="validation", w_init=0.05))
    model = DynamicBetaDPOModel(tiny_model.to(torch.bfloat16), head)
    accelerator = SimpleNamespace(process_index=0, num_processes=1, device="cpu")
    with pytest.raises(LbdpoError, match="model.dtype=float32"):
        bv.build_beta_validation(make_cfg(pairs_file, *VAL), accelerator, model, None, None)


# ---------------------------------------------------------------------------------------------- training runs


@pytest.fixture(scope="module")
def validation_run(pairs_file, tmp_path_factory):  # noqa: F811
    run_dir = tmp_path_factory.mktemp("val_run")
    cfg = make_cfg(pairs_file, *VAL, "trainer.max_steps=4", "trainer.save_every=2", "trainer.keep_last=0",
                   "trainer.eval_every=2")
    train(cfg, run_dir)
    return run_dir


def test_validation_run_logs_the_held_out_loss_and_hypergradient(validation_run, capsys):
    steps, evals = read_metrics(validation_run)
    assert [s["step"] for s in steps] == [1, 2, 3, 4] and [e["step"] for e in evals] == [2, 4]
    for s in steps:
        assert s["beta_val/loss"] > 0 and s["beta_val/hypergrad_norm"] > 0
        # the head's gradient is the hypergradient (no w prior here): the trainer's norm of it, before clipping
        assert s["grad_norm/beta_head"] == pytest.approx(s["beta_val/hypergrad_norm"], rel=1e-5)
    assert len({s["beta_head/w"] for s in steps}) == 4  # w learns from it
    config = json.loads((validation_run / "checkpoints" / "final" / "beta_head_config.json").read_text())
    assert config["objective"] == "validation" and config["val_beta"] == 0.1


def test_the_policy_gradient_is_unchanged_and_the_head_gradient_replaced(pairs_file, tmp_path):  # noqa: F811
    """Step 1 from the same state and pairs (the same explicit slice held out): the same loss and policy gradient
    under both objectives, another head gradient; objective=dpo runs no held-out pass at all."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bv, "hypergradient", lambda *a, **k: pytest.fail("held-out pass under objective=dpo"))
        train(make_cfg(pairs_file, "beta_head.w_init=0.05", "data.beta_val_fraction=0.1", "trainer.max_steps=1",
                       "trainer.eval_every=0"), tmp_path / "dpo")
    train(make_cfg(pairs_file, *VAL, "data.beta_val_fraction=0.1", "trainer.max_steps=1", "trainer.eval_every=0"),
          tmp_path / "val")
    (dpo,), _ = read_metrics(tmp_path / "dpo")
    (val,), _ = read_metrics(tmp_path / "val")
    for key in ("loss", "beta/mean", "grad_norm/policy", "logps/chosen"):
        assert val[key] == pytest.approx(dpo[key], rel=1e-6), key
    assert abs(val["grad_norm/beta_head"] - dpo["grad_norm/beta_head"]) > 1e-3 * dpo["grad_norm/beta_head"]
    assert "beta_val/loss" not in dpo


def test_null_fraction_holds_out_nothing_under_dpo_and_a_tenth_under_validation(pairs_file, tmp_path, capsys):  # noqa: F811
    import lbdpo.train.setup as setup_module

    seen = {}
    real = setup_module.build_model_and_data

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen[args[0].beta_head.objective] = (len(out[2]), len(out[6]), out[4]["beta_val_pairs"])
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(setup_module, "build_model_and_data", spy)
        for objective in ("dpo", "validation"):
            train(make_cfg(pairs_file, "beta_head.w_init=0.05", f"beta_head.objective={objective}",
                           "trainer.max_steps=1", "trainer.eval_every=0"), tmp_path / objective)
    assert seen == {"dpo": (40, 0, 0), "validation": (36, 4, 4)}  # 48 pairs − 8 eval; round(0.1 · 40) held out
    assert "held out for β" in capsys.readouterr().out


def test_resume_reproduces_the_uninterrupted_validation_run(validation_run, pairs_file, tmp_path):  # noqa: F811
    shutil.copytree(validation_run / "checkpoints" / "step-2", tmp_path / "checkpoints" / "step-2")
    lines = (validation_run / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")
    train(make_cfg(pairs_file, *VAL, "trainer.max_steps=4", "trainer.save_every=2", "trainer.eval_every=2",
                   "trainer.resume_from=auto"), tmp_path)
    uninterrupted, _ = read_metrics(validation_run)
    resumed, _ = read_metrics(tmp_path)
    assert [s["step"] for s in resumed] == [1, 2, 3, 4]
    for a, b in zip(uninterrupted[2:], resumed[2:]):
        for key in ("loss", "beta/mean", "beta_head/w", "beta_val/loss", "beta_val/hypergrad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)


def test_val_every_gives_the_head_no_gradient_between_held_out_passes(pairs_file, tmp_path):  # noqa: F811
    train(make_cfg(pairs_file, *VAL, "beta_head.val_every=2", "trainer.max_steps=4", "trainer.eval_every=0"),
          tmp_path)
    steps, _ = read_metrics(tmp_path)
    assert ["beta_val/loss" in s for s in steps] == [False, True, False, True]
    assert [s["grad_norm/beta_head"] == 0 for s in steps] == [True, False, True, False]
    w = [s["beta_head/w"] for s in steps]
    # the logged w is the step's forward's (before its update); AdamW skips a parameter without a gradient
    assert w[0] == w[1] == pytest.approx(0.05) and w[2] != w[1] and w[3] == w[2]


def test_two_processes_match_one_process(pairs_file, tmp_path):  # noqa: F811
    """DDP (torchrun, gloo): v averaged across processes, each drawing half the held-out batch, so the held-out loss,
    the hypergradient and w equal a one-process run's with the same global batch."""
    options = ["trainer.max_steps=2", "trainer.eval_every=0", "trainer.log_pairs=false", *VAL]
    train(make_cfg(pairs_file, *options), tmp_path / "one")  # in this process, batch_size 4
    train_two_processes(pairs_file, options, tmp_path / "two")
    s1, _ = read_metrics(tmp_path / "one")
    s2, _ = read_metrics(tmp_path / "two")
    assert len(s1) == len(s2) == 2
    for a, b in zip(s1, s2):
        for key in ("loss", "beta_val/loss", "beta_val/hypergrad_norm", "beta_head/w", "beta/mean"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
