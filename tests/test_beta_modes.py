"""The fixed-rule β modes (src/lbdpo/beta_modes.py): per_domain (a β per domain) and schedule (one β(t) in the step),
from the head alone, through the DPO forward, training (resume included), evaluate.py, and two processes."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import REPO_ROOT, random_pairs
from test_train import make_cfg, pairs_file  # noqa: F401  (the fixture: the same 48 pairs)
from lbdpo.beta_head import BetaHead, BetaHeadConfig, DynamicBetaDPOModel
from lbdpo.beta_modes import interpolate, read_beta_schedule
from lbdpo.data.collator import PreferenceCollator
from lbdpo.errors import LbdpoError, MissingFileError
from lbdpo.train.trainer import train

CONF = str(REPO_ROOT / "conf")
H = 8
KNOTS = [[1, 0.1], [5, 0.5]]  # β(t) = 0.1·t on steps 1..5, 0.1 before, 0.5 after


def head(**kwargs) -> BetaHead:
    return BetaHead(BetaHeadConfig(hidden_size=H, **kwargs))


def call(h: BetaHead, n: int, domains=None) -> torch.Tensor:
    return h(torch.randn(n, H), log_ppl=torch.rand(n) + 1, domains=domains)


# ---------------------------------------------------------------------------------------------------- the head alone


def test_per_domain_beta_is_the_map_per_pair_and_the_default_elsewhere():
    h = head(mode="per_domain", beta=0.1, domain_betas={"fr": 0.5, "zh": 2.0})
    beta, details = h(torch.randn(5, H), log_ppl=torch.rand(5) + 1, domains=["en", "fr", "zh", "fr", "de"],
                      return_details=True)
    torch.testing.assert_close(beta, torch.tensor([0.1, 0.5, 2.0, 0.5, 0.1]))
    assert beta.dtype == torch.float32 and not beta.requires_grad and list(h.parameters()) == []
    assert torch.equal(details["f"], torch.ones(5))
    with pytest.raises(LbdpoError, match="needs each pair's domain"):
        call(h, 3)
    with pytest.raises(LbdpoError, match="2 domains for 3 pairs"):
        call(h, 3, ["en", "fr"])
    # the other modes ignore domains: a fixed head gives its β whatever they are
    torch.testing.assert_close(call(head(mode="fixed", beta=0.3), 2, ["fr", "zh"]), torch.tensor([0.3, 0.3]))


@pytest.mark.parametrize("step, expected", [(0, 0.1), (1, 0.1), (2, 0.2), (3.5, 0.35), (5, 0.5), (6, 0.5), (10**6, 0.5)])
def test_interpolate_is_piecewise_linear_and_constant_outside(step, expected):
    assert interpolate(KNOTS, step) == pytest.approx(expected)
    assert interpolate([[0, 0.1], [10, 0.3], [20, 0.2]], 15) == pytest.approx(0.25)  # on the second segment
    assert interpolate([[7, 0.4]], 0) == interpolate([[7, 0.4]], 100) == 0.4  # one knot: constant


def test_schedule_head_follows_set_step_and_its_state_carries_the_step():
    h = head(mode="schedule", schedule=KNOTS)
    torch.testing.assert_close(call(h, 3), torch.full((3,), 0.1))  # before any step: β(0)
    for step, expected in ((2, 0.2), (4, 0.4), (9, 0.5)):
        h.set_step(step)
        torch.testing.assert_close(call(h, 4), torch.full((4,), expected))
        assert float(h.current_w()) == pytest.approx(expected)
    h.set_step(3)
    again = head(mode="schedule", schedule=KNOTS)  # e.g. evaluate.py loading the checkpoint
    again.load_state_dict(h.state_dict())
    assert int(again.schedule_step) == 3 and float(call(again, 1)) == pytest.approx(0.3)
    head(mode="learnable").set_step(3)  # a no-op for the other modes


@pytest.mark.parametrize("kwargs, key", [
    ({"mode": "learnable", "domain_betas": {"fr": 1.0}}, "beta_head.domain_betas is read only by beta_head=per_domain"),
    ({"mode": "fixed", "schedule": KNOTS}, "beta_head.schedule is read only by beta_head=schedule"),
    ({"mode": "per_domain", "schedule_from": "x"}, "beta_head.schedule_from is read only"),
    ({"mode": "per_domain", "domain_betas": {"fr": 0.0}}, "beta_head.domain_betas"),
    ({"mode": "per_domain", "domain_betas": None}, "beta_head.domain_betas"),
    ({"mode": "per_domain", "domain_betas": {"fr": 0.5}, "beta": -1.0}, "beta_head.beta"),
    ({"mode": "schedule"}, "beta_head=schedule needs"),
    ({"mode": "schedule", "schedule": [[3, 0.1], [1, 0.2]]}, "beta_head.schedule"),
    ({"mode": "schedule", "schedule": [[0, 0.1], [4, float("nan")]]}, "beta_head.schedule"),
    ({"mode": "schedule", "schedule": []}, "beta_head.schedule"),
])
def test_bad_mode_options_name_their_key(kwargs, key):
    with pytest.raises(LbdpoError, match=key.replace(".", r"\.").replace("(", r"\(")):
        BetaHeadConfig(hidden_size=H, **kwargs)


def write_metrics(folder: Path, finished: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [{"step": 1, "loss": 0.7, "beta/mean": 0.10}, {"step": 2, "loss": 0.6, "beta/mean": 0.12},
             {"step": 3, "loss": 0.6, "beta/mean": 0.99},  # written by a run later resumed from step 2 …
             {"step": 2, "eval/loss": 0.6, "eval/beta/mean": 0.5},  # an eval line: not a training β
             {"step": 3, "loss": 0.5, "beta/mean": 0.13}, {"step": 4, "loss": float("nan")}]  # … and its NaN step
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 5, "be'  # a line cut by a kill
    (folder / "metrics.jsonl").write_text(text)
    if finished:
        (folder / "eval.json").write_text("{}")
    return folder


def test_read_beta_schedule_takes_each_steps_last_mean_beta(tmp_path):
    expected = [[1, 0.10], [2, 0.12], [3, 0.13]]
    assert read_beta_schedule(write_metrics(tmp_path / "run")) == expected
    assert read_beta_schedule(tmp_path / "run" / "metrics.jsonl") == expected  # the file itself, read as is
    h = head(mode="schedule", schedule_from=str(tmp_path / "run"))  # read once, into the config the head saves
    assert h.config.schedule == expected and h.config.schedule_from == str(tmp_path / "run")
    h.set_step(2)
    assert float(call(h, 1)) == pytest.approx(0.12)
    with pytest.raises(LbdpoError, match="has not finished"):
        read_beta_schedule(write_metrics(tmp_path / "running", finished=False))
    with pytest.raises(MissingFileError, match="does not exist"):
        read_beta_schedule(tmp_path / "nowhere.jsonl")
    (tmp_path / "empty.jsonl").write_text('{"step": 1, "eval/beta/mean": 0.1}\n')
    with pytest.raises(LbdpoError, match="no training line"):
        read_beta_schedule(tmp_path / "empty.jsonl")


def test_dpo_forward_gives_each_pair_its_domains_beta(tiny_model):
    """The batch's `domain` list reaches the head: β per pair in the loss, the rewards and the per-pair output."""
    h = BetaHead(BetaHeadConfig(hidden_size=tiny_model.config.hidden_size, mode="per_domain", beta=0.1,
                                domain_betas={"fr": 0.7}))
    reference = copy.deepcopy(tiny_model)
    with torch.no_grad():  # a policy a step away from its reference: margins ≠ 0
        for p in tiny_model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model = DynamicBetaDPOModel(tiny_model, h, ref_model=reference)
    feats = random_pairs(4, tiny_model.config.vocab_size, seed=3)
    for f, d in zip(feats, ["en", "fr", "fr", "zh"]):
        f["domain"] = d
    out = model(PreferenceCollator(0)(feats))
    torch.testing.assert_close(out.beta, torch.tensor([0.1, 0.7, 0.7, 0.1]))
    margin = (out.policy_chosen_logps - out.reference_chosen_logps).detach()
    assert bool((margin.abs() > 1e-4).all())
    torch.testing.assert_close(out.chosen_rewards, out.beta * margin)
    with pytest.raises(LbdpoError, match="domain"):
        model(PreferenceCollator(0)([{k: v for k, v in f.items() if k != "domain"} for f in feats]))


# --------------------------------------------------------------------------------------------- training, evaluation


def read_lines(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


def steps_of(run_dir: Path) -> list[dict]:
    return [r for r in read_lines(run_dir) if "loss" in r]


def evaluate(checkpoint: Path, out_dir: Path) -> list[dict]:
    """evaluate.py's preference pass on a checkpoint; its eval_pairs.jsonl rows."""
    from lbdpo.eval.evaluate import evaluate_checkpoint

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"checkpoint={checkpoint}", f"output_dir={out_dir}",
                                             "generation.enabled=false", "plots=false", "reference_cache=false"])
    evaluate_checkpoint(cfg)
    return read_lines(out_dir, "eval_pairs.jsonl")


def test_per_domain_run_trains_and_evaluates_each_pair_at_its_domains_beta(pairs_file, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    train(make_cfg(pairs_file, "beta_head=per_domain", "beta_head.domain_betas={fr: 0.5}", "trainer.max_steps=4",
                   "trainer.eval_every=2"), run)
    pairs = read_lines(run, "pairs.jsonl")
    assert {r["domain"] for r in pairs} == {"en", "fr"} and len(pairs) == 16
    assert all(r["beta"] == pytest.approx(0.5 if r["domain"] == "fr" else 0.1) for r in pairs)
    evals = [r for r in read_lines(run) if "eval/loss" in r]
    assert [e["step"] for e in evals] == [2, 4]
    assert all(e["eval/fr/beta/mean"] == pytest.approx(0.5) and e["eval/en/beta/mean"] == pytest.approx(0.1)
               for e in evals)
    rows = evaluate(run / "checkpoints" / "final", tmp_path / "eval")
    assert len(rows) == 8 and all(r["beta"] == pytest.approx(0.5 if r["domain"] == "fr" else 0.1) for r in rows)
    with pytest.raises(LbdpoError, match=r"beta_head\.domain_betas names \['de'\]"):
        train(make_cfg(pairs_file, "beta_head=per_domain", "beta_head.domain_betas={de: 0.5}"), tmp_path / "typo")


@pytest.fixture(scope="module")
def schedule_run(pairs_file, tmp_path_factory):  # noqa: F811
    run = tmp_path_factory.mktemp("schedule")
    train(make_cfg(pairs_file, "beta_head=schedule", "beta_head.schedule=[[1, 0.1], [5, 0.5]]", "trainer.max_steps=6",
                   "trainer.save_every=3", "trainer.keep_last=0", "trainer.eval_every=3"), run)
    return run


def test_schedule_run_uses_beta_of_each_step_and_evaluates_at_the_last(schedule_run, tmp_path):
    steps = steps_of(schedule_run)
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6]
    for s in steps:  # every pair of step t at β(t)
        assert s["beta/min"] == pytest.approx(s["beta/max"]) == pytest.approx(interpolate(KNOTS, s["step"]))
    evals = [r for r in read_lines(schedule_run) if "eval/loss" in r]
    assert [(e["step"], round(e["eval/beta/mean"], 6)) for e in evals] == [(3, 0.3), (6, 0.5)]
    step3 = BetaHead(BetaHeadConfig.from_mapping(json.loads(
        (schedule_run / "checkpoints" / "step-3" / "beta_head_config.json").read_text())))
    from safetensors.torch import load_file

    step3.load_state_dict(load_file(schedule_run / "checkpoints" / "step-3" / "beta_head.safetensors"))
    assert int(step3.schedule_step) == 3 and float(step3.current_w()) == pytest.approx(0.3)
    rows = evaluate(schedule_run / "checkpoints" / "final", tmp_path / "eval")
    assert len(rows) == 8 and all(r["beta"] == pytest.approx(0.5) for r in rows)


def test_resumed_schedule_run_continues_on_the_curve(schedule_run, pairs_file, tmp_path):  # noqa: F811
    shutil.copytree(schedule_run / "checkpoints" / "step-3", tmp_path / "checkpoints" / "step-3")
    train(make_cfg(pairs_file, "beta_head=schedule", "beta_head.schedule=[[1, 0.1], [5, 0.5]]", "trainer.max_steps=6",
                   "trainer.save_every=3", "trainer.eval_every=3", "trainer.resume_from=auto"), tmp_path)
    resumed, whole = steps_of(tmp_path), steps_of(schedule_run)
    assert [s["step"] for s in resumed] == [4, 5, 6]
    for a, b in zip(whole[3:], resumed):
        for key in ("beta/mean", "loss", "rewards/margins"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)


def test_schedule_from_replays_another_runs_mean_beta(schedule_run, pairs_file, tmp_path):  # noqa: F811
    """A learnable run, then a schedule run replaying it: at every step the replay's β is the source's mean β."""
    source = tmp_path / "learnable"
    train(make_cfg(pairs_file, "beta_head.w_init=0.05", "trainer.max_steps=4", "trainer.eval_every=0"), source)
    replay = tmp_path / "replay"
    train(make_cfg(pairs_file, "beta_head=schedule", f"beta_head.schedule_from={source}", "trainer.max_steps=4",
                   "trainer.eval_every=0"), replay)
    src, rep = steps_of(source), steps_of(replay)
    assert len({round(s["beta/mean"], 7) for s in src}) == 4  # the source's β moved every step
    assert [r["beta/mean"] for r in rep] == pytest.approx([s["beta/mean"] for s in src], rel=1e-6)
    assert all(r["beta/std"] == pytest.approx(0, abs=1e-9) for r in rep)  # one global β per step
    saved = json.loads((replay / "checkpoints" / "final" / "beta_head_config.json").read_text())
    assert saved["schedule"] == [[s["step"], s["beta/mean"]] for s in src]  # evaluation needs no source run
    shutil.rmtree(source / "checkpoints" / "final")  # as if the source run were still training
    with pytest.raises(LbdpoError, match="has not finished"):
        train(make_cfg(pairs_file, "beta_head=schedule", f"beta_head.schedule_from={source}"), tmp_path / "too_early")


@pytest.mark.parametrize("overrides, key", [
    (["beta_head=schedule"], "beta_head=schedule needs"),
    (["beta_head=schedule", "beta_head.schedule=[[1, 0.1]]", "beta_head.schedule_from=/x"], "both set"),
    (["beta_head=schedule", "beta_head.schedule_from=/nonexistent/run"], "beta_head.schedule_from"),
    (["beta_head.domain_betas={fr: 0.5}"], "beta_head.domain_betas is read only"),
])
def test_bad_mode_options_fail_before_anything_loads(pairs_file, tmp_path, monkeypatch, overrides, key):  # noqa: F811
    import lbdpo.train.setup as setup_module

    monkeypatch.setattr(setup_module, "build_model_and_data", lambda *a, **k: pytest.fail("loaded before checking"))
    with pytest.raises(LbdpoError, match=key.replace(".", r"\.")):
        train(make_cfg(pairs_file, *overrides), tmp_path / "run")


@pytest.mark.parametrize("mode", [["beta_head=per_domain", "beta_head.domain_betas={fr:0.5}",
                                   "data.label_noise={domain:fr,fraction:0.5}"],
                                  ["beta_head=schedule", "beta_head.schedule=[[1,0.1],[3,0.4]]"]],
                         ids=["per_domain+label_noise", "schedule"])
def test_two_processes_match_one(pairs_file, tmp_path, mode):  # noqa: F811
    """DDP on 2 CPU processes (torchrun) = 1 process with the same global batch: losses, β per step and per pair."""
    common = ["model=tiny_random", "trainer=tiny", "logger=none", "data=jsonl", f"data.path={pairs_file}",
              "data.max_length=48", "data.max_prompt_length=32", "data.eval_size=8", "data.eval_fraction=null",
              "trainer.max_steps=3", "trainer.eval_every=3", *mode]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, launch, batch in (("one", [], 4), ("two", ["-m", "torch.distributed.run", "--nproc_per_node", "2"], 2)):
        done = subprocess.run([sys.executable, *launch, str(REPO_ROOT / "train.py"), *common,
                               f"trainer.batch_size={batch}", f"hydra.run.dir={tmp_path / name}"],
                              capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = steps_of(tmp_path / "one"), steps_of(tmp_path / "two")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        for key in ("loss", "rewards/margins", "beta/mean", "beta/std"):
            assert b[key] == pytest.approx(a[key], abs=1e-4), (a["step"], key)
    key = lambda r: (r["step"], r["domain"], round(r["beta"], 6), round(r["margin"], 3))  # noqa: E731
    assert sorted(map(key, read_lines(tmp_path / "two", "pairs.jsonl"))) == \
        sorted(map(key, read_lines(tmp_path / "one", "pairs.jsonl")))
    e1, e2 = ([r for r in read_lines(tmp_path / n) if "eval/loss" in r][-1] for n in ("one", "two"))
    assert e2["eval/loss"] == pytest.approx(e1["eval/loss"], abs=1e-4)
    assert e2["eval/beta/mean"] == pytest.approx(e1["eval/beta/mean"], abs=1e-6)
