"""Issue 39 on the CPU: a host-light step. The step reads the device once (counted by ``benchmarks/host_ops.py``'s
dispatch and function modes, whose classification rule is tested here too), its reads give the same numbers,
the packed block mask's bucketed shapes give the same log-probs, and the chunked lm_head runs in bf16 under autocast
(within bf16's tolerance of float32) while staying float32 without it."""

from __future__ import annotations

import importlib
import random
import sys
import types

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import REPO_ROOT, write_item_pairs
from lbdpo.chunked_logps import ChunkedTokenLogps
from lbdpo.data.collator import IGNORE_INDEX, PreferenceCollator, pad_rows
from lbdpo.errors import LbdpoError
from lbdpo.logprobs import DeferredChecks, masked_mean_nll
from lbdpo.packed_pairs import pack_pairs, packed_pair_token_logps, width_bucket
from lbdpo.scoring import ForwardPlan, Scorer
from lbdpo.train.step_metrics import pair_rows, read_step

TRANSFORMERS_MASK_CHECKS = "transformers/masking_utils.py"  # sdpa's "can the causal mask be skipped?" (TRL's too)


def host_ops():
    """``benchmarks/host_ops.py`` (not a package module: imported from its folder)."""
    if str(REPO_ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    return importlib.import_module("host_ops")


# ---- the counting rule ---------------------------------------------------------------------------------------


def test_the_counter_classifies_device_host_and_reads():
    ops = host_ops()
    ledger = ops.Ledger()
    weight = torch.nn.Parameter(torch.randn(3, 3))
    with ops.FunctionCounter(ledger), ops.DispatchCounter(ledger):
        ops.seed_device(ledger, [types.SimpleNamespace(parameters=lambda: [weight], buffers=lambda: [])],
                        types.SimpleNamespace(param_groups=[], state={}))
        ledger.phase = "forward"
        y = weight.sum(0)  # device: a parameter's op
        index = torch.tensor([0, 1])  # host: built from a list
        index = index + 1  # host
        on_device = torch.arange(3, device=y.device)  # device: allocated where a device tensor lives
        picked = y[index.to(y.device)]  # one host → device copy, then a device op
        float(picked.sum())  # a read: one sync
        host_copy = y.cpu()  # a read
        host_copy.mul(2).tolist()  # ops on the host copy, no sync
        if (on_device > 0).any():  # a read
            pass
    counts = {k: sum(n for (p, kind), n in ledger.counts.items() if kind == k) for k in ops.KINDS}
    assert counts["sync"] == 3
    assert ledger.counts["forward", "host"] == 3  # lift_fresh, add, mul
    # sum, arange, the copy, index, sum, gt, any (reads not counted twice: _local_scalar_dense inside float())
    assert ledger.counts["forward", "device"] == 7
    assert ledger.kind(on_device) == "device" and ledger.kind(host_copy) == "host" and ledger.kind(index) == "host"


def tiny_run(tmp_path, *overrides):
    from lbdpo.train.setup import setup

    pairs = write_item_pairs(tmp_path / "pairs.jsonl", n=24)
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[
            "model=tiny_random", "trainer=tiny", "logger=none", "data=jsonl", f"data.path={pairs}",
            "data.max_length=48", "data.max_prompt_length=32", "data.eval_size=null", "data.eval_fraction=null",
            "trainer.batch_size=4", "trainer.max_steps=2", "trainer.eval_every=0", "trainer.save_every=0",
            "trainer.log_every=1", "trainer.forward=rows", "trainer.logps_chunk_size=null", *overrides])
    return setup(cfg, tmp_path / "run")


@pytest.mark.parametrize("head", ["fixed", "linear"])
def test_a_training_step_reads_the_device_once(tmp_path, head):
    """lbdpo's GPU default (one row per response): step + logging read the device once (step_metrics.read_step), a
    trainable w included (read there, before the update); transformers' sdpa mask checks are gone (the rows forward
    gives a 4D mask built on the device: logprobs.forward_model), and so is a learnable head's w_initialized read."""
    run = tiny_run(tmp_path, f"beta_head={head}")  # linear: w_init=auto, set in the first (uncounted) step
    ledger = host_ops().count_lbdpo_step(run)
    run.logger.close()
    syncs = dict(ledger.sync_sites)
    assert sum(syncs.values()) == 1 and all("train/step_metrics.py" in site for site in syncs), syncs
    assert not any(TRANSFORMERS_MASK_CHECKS in site or "beta_head.py" in site for site in syncs)
    assert ledger.counts["logging", "host"] > 0  # the logging phase was counted at all


# ---- the step's read: the same numbers ----------------------------------------------------------------------


class TwoProcesses:
    """What read_step needs of an Accelerator, for 2 processes: this is process 1; process 0's vector is ours + 1000
    (so that its values are told apart)."""

    device, num_processes, process_index = torch.device("cpu"), 2, 1

    def gather(self, local):
        return torch.cat([local + 1000, local])


def test_read_step_gathers_in_process_order_and_keeps_every_value(tmp_path):
    head = types.SimpleNamespace(current_w=lambda: torch.tensor(0.25), batch_level=None)
    per_pair = {"losses": [torch.tensor([0.5, 1.5]), torch.tensor([2.5])], "beta": [torch.tensor([0.1, 0.2, 0.3])],
                "kept": []}
    result = read_step(TwoProcesses(), head, torch.tensor(0.0), torch.tensor([3.0, 4.0, 5.0]),
                       torch.tensor(17), per_pair, DeferredChecks(), ["a", "b", "c"])
    assert result.values["losses"].tolist() == [1000.5, 1001.5, 1002.5, 0.5, 1.5, 2.5]
    assert result.values["beta"].dtype == torch.float32
    beta = torch.tensor([0.1, 0.2, 0.3])
    assert result.values["beta"].tolist() == [*(beta.double() + 1000).float().tolist(), *beta.tolist()]
    assert "kept" not in result.values
    assert result.tokens == 1017 + 17 and (result.policy_grad_norm, result.head_grad_norm, result.grad_norm) == (3, 4, 5)
    assert result.skip  # process 0's flag is 1000
    assert result.w == 0.25


def test_read_step_reads_a_trainable_w_with_the_rest():
    w = torch.nn.Parameter(torch.tensor([0.125]))  # a trainable w: its value in the forward, before any update
    head = types.SimpleNamespace(current_w=lambda: w, batch_level=None)
    result = read_step(TwoProcesses(), head, torch.tensor(0.0), torch.zeros(3), torch.tensor(1),
                       {"losses": [torch.tensor([0.5])]}, DeferredChecks(), ["a"])
    assert result.w == 0.125 and result.values["losses"].tolist() == [1000.5, 0.5]


def test_read_step_raises_a_deferred_check_of_any_process():
    head = types.SimpleNamespace(current_w=lambda: torch.tensor(0.25), batch_level=None)
    checks = DeferredChecks()
    with checks:
        masked_mean_nll(torch.zeros(2, 3), torch.tensor([[True, True, False, False], [False] * 4]))  # row 2: none
    with pytest.raises(LbdpoError, match="perplexity needs at least two tokens"):
        read_step(TwoProcesses(), head, torch.tensor(0.0), torch.zeros(3), torch.tensor(1), {}, checks, [])


def test_deferred_checks_raise_what_the_check_raises_at_once():
    token_lp, bad = torch.zeros(2, 3), torch.tensor([[True, True, False, False], [False] * 4])
    with pytest.raises(LbdpoError) as at_once:
        masked_mean_nll(token_lp, bad)
    checks = DeferredChecks()
    with checks:
        masked_mean_nll(token_lp, bad)  # no read, no error yet
        masked_mean_nll(token_lp, torch.tensor([[True, True, False, False]] * 2))
    assert len(checks) == 1 and checks.flags("cpu").tolist() == [1.0]
    with pytest.raises(LbdpoError) as deferred:
        checks.raise_failed(checks.flags("cpu").tolist())
    assert str(deferred.value) == str(at_once.value)
    fine = DeferredChecks()
    with fine:
        masked_mean_nll(token_lp, torch.tensor([[True, True, False, False]] * 2))
    fine.raise_failed(fine.flags("cpu").tolist())  # nothing failed


def test_pad_rows_equals_padding_one_row_at_a_time():
    rng = random.Random(0)
    for _ in range(50):
        rows = [[rng.randrange(100) for _ in range(rng.randint(0, 9))] for _ in range(rng.randint(1, 6))]
        side, width = rng.choice(["left", "right"]), max(len(r) for r in rows) + rng.randint(0, 3)
        ids, mask = pad_rows(rows, -7, side, width)
        for i, row in enumerate(rows):  # each row by itself: its ids on its side, the pad value elsewhere
            pad = [-7] * (width - len(row))
            assert ids[i].tolist() == (row + pad if side == "right" else pad + row)
            assert mask[i].tolist() == ([1] * len(row) + [0] * len(pad) if side == "right" else
                                        [0] * len(pad) + [1] * len(row))
    with pytest.raises(LbdpoError, match="does not fit width=2"):
        pad_rows([[1, 2, 3]], 0, width=2)


def test_pair_rows_reads_each_value_as_before():
    values = {k: torch.randn(5) for k in ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps",
                                          "reference_rejected_logps", "beta", "log_ppl", "f", "losses")}
    rows = pair_rows(values, list("abcde"))
    margin = (values["policy_chosen_logps"] - values["reference_chosen_logps"]) - \
        (values["policy_rejected_logps"] - values["reference_rejected_logps"])
    for i, row in enumerate(rows):
        assert row["margin"] == round(float(margin[i]), 6) and row["loss"] == round(float(values["losses"][i]), 6)
        assert row["beta"] == round(float(values["beta"][i]), 6) and row["domain"] == "abcde"[i]


# ---- few shapes on the packed block mask ----------------------------------------------------------------------


def test_width_buckets_are_few_and_tight():
    seen = {width_bucket(n) for n in range(1, 5000)}
    assert seen == {64 * 2 ** k for k in range(7)} | {96 * 2 ** k for k in range(7)}
    for n in range(65, 5000):
        assert n <= width_bucket(n) <= 1.5 * n  # at most 1.5× the longest segment


def random_batch(tokenizer, seed, n_pairs=5):
    rng = random.Random(seed)

    def ids(lo, hi):
        return [rng.randrange(3, len(tokenizer)) for _ in range(rng.randint(lo, hi))]

    feats = [{"prompt_input_ids": ids(2, 30), "chosen_input_ids": ids(1, 25), "rejected_input_ids": ids(1, 25)}
             for _ in range(n_pairs)]
    return PreferenceCollator(tokenizer.pad_token_id)(feats)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bucketed_block_mask_gives_the_unbucketed_numbers(tiny_model, tiny_model_and_tokenizer, seed):
    model, tokenizer = tiny_model, tiny_model_and_tokenizer[1]
    batch = random_batch(tokenizer, seed)
    args = (batch["input_ids"], batch["attention_mask"], batch["prompt_lengths"], 64)
    results = {}
    for bucketed in (False, True):
        model.zero_grad()
        token_lp, h = packed_pair_token_logps(model, *args, bucketed=bucketed)
        (token_lp.sum() + h.square().sum()).backward()
        results[bucketed] = token_lp.detach(), h.detach(), [p.grad for p in model.parameters()]
        model.zero_grad(set_to_none=True)
    (plain_lp, plain_h, plain_g), (lp, h, grads) = results[False], results[True]
    torch.testing.assert_close(lp, plain_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, plain_h, rtol=1e-5, atol=1e-5)
    assert sum(g is not None for g in grads) > 10
    for g, g0 in zip(grads, plain_g):
        assert (g is None) == (g0 is None)
        if g is not None:
            torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-5 * max(float(g0.abs().max()), 1.0))
    # and one unpadded sequence at a time (the rows path with full logits on each pair's own rows)
    rows = Scorer(ForwardPlan("rows", None, None))
    for i in range(len(batch["prompt_lengths"])):
        for r in (i, len(batch["prompt_lengths"]) + i):
            real = batch["attention_mask"][r].bool()
            one_lp, _ = rows.token_logps(model, batch["input_ids"][r:r + 1, real], batch["attention_mask"][r:r + 1, real],
                                         batch["labels"][r:r + 1, real], batch["prompt_lengths"][i:i + 1])
            scored = (batch["labels"][r, real] != IGNORE_INDEX)[1:]
            packed_row = lp[r, :real.sum() - 1]
            torch.testing.assert_close(packed_row[scored], one_lp[0, scored].detach(), rtol=1e-4, atol=1e-4)


def first_fit_rows(lengths: list[int], capacity: int) -> int:
    """Rows that first fit by decreasing length needs (brute force, as a reference)."""
    free: list[int] = []
    for n in sorted(lengths, reverse=True):
        row = next((i for i, f in enumerate(free) if f >= n), None)
        if row is None:
            free.append(capacity - n)
        else:
            free[row] -= n
    return len(free)


def test_bucketed_packing_shapes():
    rng = random.Random(0)
    for _ in range(30):
        n = rng.randint(1, 12)
        parts = [[torch.arange(rng.randint(2, 90)) for _ in range(n)] for _ in range(3)]
        lengths = [sum(len(part[i]) for part in parts) for i in range(n)]
        plain, packed = pack_pairs(*parts), pack_pairs(*parts, bucketed=True, multiple_of=8)
        rows, width = packed.input_ids.shape
        assert plain.input_ids.shape == (first_fit_rows(lengths, max(lengths)), max(lengths))
        assert width == width_bucket(max(lengths))
        needed = first_fit_rows(lengths, width)
        assert rows >= needed and rows & (rows - 1) == 0 and rows < 2 * needed  # the next power of two
        assert int((packed.pair >= 0).sum()) == sum(lengths)  # every token placed once
        assert (packed.pair[needed:] == -1).all()  # the added rows are padding


def test_the_block_mask_is_bucketed_on_a_gpu_or_compiled_only(tiny_model):
    from lbdpo.scoring import plan_forward

    def plan(device, compiled=False, attention="block_mask"):
        return plan_forward(tiny_model, "packed", attention, device=device, compiled=compiled)

    assert not plan("cpu").bucket_shapes and plan("cpu").describe() == "packed pairs, rows under a block mask"
    assert plan("cuda").bucket_shapes and plan("cpu", compiled=True).bucket_shapes
    assert plan("cuda").describe() == "packed pairs, rows under a block mask, bucketed shapes"
    assert not plan_forward(tiny_model, "rows", device="cuda").bucket_shapes


# ---- the chunked lm_head under autocast -----------------------------------------------------------------------


def chunked_case(seed=0, m=37, h=24, v=300):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(m, h, generator=g, requires_grad=True)
    weight = (torch.randn(v, h, generator=g) * 0.3).requires_grad_()
    targets = torch.randint(0, v, (m,), generator=g)
    grad_out = torch.randn(m, generator=g)
    return hidden, weight, targets, grad_out


class MatmulDtypes(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("mm", "addmm", "bmm", "matmul"):
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("autocast", [False, True])
def test_chunked_lm_head_runs_in_the_autocast_dtype(autocast):
    hidden, weight, targets, grad_out = chunked_case()
    # float32 reference: the full logits
    ref = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[:, None]).squeeze(-1)
    ref_gh, ref_gw = torch.autograd.grad((ref * grad_out).sum(), (hidden, weight))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), MatmulDtypes() as forward_mm:
        logps = ChunkedTokenLogps.apply(hidden, weight, None, targets, 8)
    with MatmulDtypes() as backward_mm:
        gh, gw = torch.autograd.grad((logps * grad_out).sum(), (hidden, weight))
    assert logps.dtype == gh.dtype == gw.dtype == torch.float32
    want = torch.bfloat16 if autocast else torch.float32
    assert forward_mm.dtypes and set(forward_mm.dtypes) == {want}
    assert backward_mm.dtypes and set(backward_mm.dtypes) == {want}
    if autocast:  # bf16's 8-bit mantissa: errors of a few parts in a thousand of the logits' scale
        torch.testing.assert_close(logps, ref.detach(), rtol=0, atol=0.05)
        torch.testing.assert_close(gh, ref_gh, rtol=0, atol=0.03 * float(ref_gh.abs().max()))
        torch.testing.assert_close(gw, ref_gw, rtol=0, atol=0.03 * float(ref_gw.abs().max()))
    else:
        torch.testing.assert_close(logps, ref.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gh, ref_gh, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-6)
