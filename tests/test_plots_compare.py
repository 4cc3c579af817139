"""Plots write valid PNGs (None on empty input); the compare tool groups seeds into arms and averages them."""

import json
from pathlib import Path

import pytest

from lbdpo.eval.compare import arm_name, main, mean_std, write_comparison
from lbdpo.eval.plots import (moving_average, plot_beta_hist_by_domain, plot_beta_vs_log_ppl, plot_frontier,
                         plot_overlaid_curves, plot_training_curves, read_metrics_jsonl)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    assert path is not None and path.is_file()
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


def write_metrics(path, acc=0.7, w=0.02, truncated=True, beta=True):
    lines = []
    for step in range(1, 9):
        line = {"step": step, "loss": 0.7 - 0.02 * step, "rewards/accuracies": 0.5 + 0.02 * step,
                "rewards/margins": 0.1 * step, "log_ppl/mean": 2.0, "beta_head/w": w}
        if beta:
            line.update({"beta/mean": 0.1 + 0.001 * step, "beta/std": 0.01})
        lines.append(line)
        if step % 4 == 0:
            lines.append({"step": step, "eval/loss": 0.6, "eval/rewards/accuracies": acc if step == 8 else 0.5,
                          "eval/rewards/margins": 0.3, "eval/beta/mean": 0.1})
    text = "".join(json.dumps(l) + "\n" for l in lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + ('{"step": 9, "lo' if truncated else ""))
    return path


# ---------------------------------------------------------------- plots

def test_beta_plots(tmp_path):
    beta = [0.1, 0.12, 0.08, 0.2, 0.22, 0.3, float("nan")]
    domains = ["en", "en", "en", "zh", "zh", "zh", "zh"]
    log_ppl = [1.0, 1.2, 0.8, 2.0, 2.2, 3.0, 1.0]
    assert_png(plot_beta_hist_by_domain(beta, domains, tmp_path / "hist.png"))
    assert_png(plot_beta_hist_by_domain(beta, None, tmp_path / "hist_all.png"))
    assert_png(plot_beta_vs_log_ppl(beta, log_ppl, domains, tmp_path / "sub" / "scatter.png"))
    assert_png(plot_beta_vs_log_ppl(beta, log_ppl, None, tmp_path / "scatter_all.png"))
    # empty input: nothing written, None returned
    assert plot_beta_hist_by_domain([], None, tmp_path / "empty_hist.png") is None
    assert plot_beta_vs_log_ppl([], [], [], tmp_path / "empty_scatter.png") is None
    assert not (tmp_path / "empty_hist.png").exists() and not (tmp_path / "empty_scatter.png").exists()
    with pytest.raises(ValueError, match="domains"):
        plot_beta_hist_by_domain([0.1, 0.2], ["en"], tmp_path / "bad.png")


def test_read_metrics_jsonl_truncated(tmp_path):
    path = write_metrics(tmp_path / "metrics.jsonl")
    train, evals = read_metrics_jsonl(path)
    assert len(train) == 8 and len(evals) == 2
    assert evals[-1]["eval/rewards/accuracies"] == 0.7 and train[-1]["step"] == 8
    with pytest.raises(FileNotFoundError):
        read_metrics_jsonl(tmp_path / "missing.jsonl")


def test_moving_average():
    assert moving_average([1, 2, 3, 4], 2).tolist() == [1.0, 1.5, 2.5, 3.5]
    assert moving_average([], 3).size == 0


def test_training_and_overlaid_curves(tmp_path):
    a = write_metrics(tmp_path / "a" / "metrics.jsonl")
    b = write_metrics(tmp_path / "b" / "metrics.jsonl", acc=0.8, beta=False)  # β panel: "not logged"
    assert_png(plot_training_curves(a, tmp_path / "curves_a.png"))
    assert_png(plot_training_curves(b, tmp_path / "curves_b.png"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"step": 1, "lo')
    assert plot_training_curves(empty, tmp_path / "curves_empty.png") is None
    runs = {"a": a, "b": b}
    assert_png(plot_overlaid_curves(runs, "loss", tmp_path / "loss.png"))
    assert_png(plot_overlaid_curves(runs, "eval/rewards/accuracies", tmp_path / "acc.png"))
    assert_png(plot_overlaid_curves(runs, "beta/mean", tmp_path / "beta.png", smooth=3))  # only run a has it
    assert plot_overlaid_curves({}, "loss", tmp_path / "none.png") is None
    assert plot_overlaid_curves(runs, "never/logged", tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_frontier(tmp_path):
    points = [
        {"kl": 5.0, "reward": 0.8, "label": "fixed_b01", "kind": "fixed", "beta": 0.1, "kl_std": 0.5},
        {"kl": 2.0, "reward": 0.6, "label": "fixed_b03", "kind": "fixed", "beta": 0.3},
        {"kl": 3.0, "reward": 0.75, "label": "learn_eps01", "kind": "learnable", "reward_std": 0.02},
        {"kl": 3.5, "reward": 0.7, "label": "learn_eps0", "kind": "learnable"},
        {"kl": 4.0, "reward": 0.72, "label": "noisy_b03", "kind": "rule"},
    ]
    assert_png(plot_frontier(points, tmp_path / "frontier.png"))
    assert_png(plot_frontier(points[2:], tmp_path / "learnable_only.png"))
    assert plot_frontier([], tmp_path / "empty.png") is None
    assert plot_frontier([{"kl": None, "reward": 1.0, "label": "x", "kind": "fixed"}], tmp_path / "e.png") is None
    with pytest.raises(ValueError, match="kind"):
        plot_frontier([{"kl": 1.0, "reward": 1.0, "label": "x", "kind": "other"}], tmp_path / "bad.png")


# ---------------------------------------------------------------- compare

def fake_run(root, name, arm, seed, mode, acc, w, kl=None, reward=None, eval_json_in_final=False):
    d = root / name
    write_metrics(d / "metrics.jsonl", acc=acc, w=w)
    (d / ".hydra").mkdir()
    (d / ".hydra" / "overrides.yaml").write_text(f"- +arm={arm}\n- seed={seed}\n")
    (d / ".hydra" / "config.yaml").write_text(f"seed: {seed}\nbeta_head:\n  mode: {mode}\n  beta: 0.1\n")
    if kl is not None:
        result = {"preference": {"common_beta": {"rewards/accuracies": acc}, "common_beta_value": 0.1},
                  "generation": {"reward": {"policy_mean": reward, "reference_mean": 0.0, "win_rate": 0.5},
                                 "kl": {"mean": kl, "std": 1.0, "n": 8}}}
        target = d / "checkpoints" / "final" if eval_json_in_final else d
        target.mkdir(parents=True, exist_ok=True)
        (target / "eval.json").write_text(json.dumps(result))


def test_arms_are_named_by_what_differs(tmp_path):
    from lbdpo.eval.compare import collect_runs, group_arms

    for i, (arm, seed) in enumerate([("a", 0), ("b", 0), ("a", 1), ("b", 1)]):
        fake_run(tmp_path, f"run{i}", arm, seed, "learnable", 0.7, 0.02)
        path = tmp_path / f"run{i}" / ".hydra" / "overrides.yaml"
        path.write_text("- data=sentiment\n- trainer.num_epochs=1\n" + path.read_text())
    arms = group_arms(collect_runs(tmp_path))
    assert sorted(a["arm"] for a in arms) == ["+arm=a", "+arm=b"] and all(a["n_seeds"] == 2 for a in arms)
    seeds_only = tmp_path / "seeds"
    seeds_only.mkdir()
    for seed in (0, 1):
        fake_run(seeds_only, f"run{seed}", "a", seed, "learnable", 0.7, 0.02)
    (arm,) = group_arms(collect_runs(seeds_only))  # runs that differ only by seed are one arm
    assert arm["n_seeds"] == 2


def test_arm_name_drops_seed():
    overrides = ["+arm=fixed_b01", "seed=1", "beta_head.epsilon=0.1"]
    assert arm_name(overrides, "x") == "+arm=fixed_b01 beta_head.epsilon=0.1"
    assert arm_name(["+seed=3"], "run_dir") == "run_dir"
    assert arm_name(["data.seed=3"], "run_dir") == "data.seed=3"
    assert arm_name(["+arm=learn_eps01", "+sweep=cpu_small", "seed=0"], "x") == "+arm=learn_eps01"


def test_mean_std_population():
    mean, std = mean_std([0.6, 0.8, None])
    assert mean == pytest.approx(0.7) and std == pytest.approx(0.1)
    assert mean_std([0.5]) == (0.5, None) and mean_std([None]) == (None, None)


def test_compare_multirun(tmp_path, capsys):
    fake_run(tmp_path, "0_+arm=fixed_b01,seed=0", "fixed_b01", 0, "fixed", 0.6, 0.1, kl=4.0, reward=1.0)
    fake_run(tmp_path, "1_+arm=fixed_b01,seed=1", "fixed_b01", 1, "fixed", 0.8, 0.1, kl=6.0, reward=2.0,
             eval_json_in_final=True)
    fake_run(tmp_path, "2_+arm=learn_eps01,seed=0", "learn_eps01", 0, "learned", 0.5, 0.02, kl=2.0, reward=0.5)
    fake_run(tmp_path, "10_+arm=learn_eps01,seed=1", "learn_eps01", 1, "learned", 0.7, 0.04)  # no eval.json
    (tmp_path / "not_a_run").mkdir()
    main([str(tmp_path)])
    out = tmp_path / "compare"
    md = (out / "compare.md").read_text()
    rows = {}
    for line in md.splitlines():  # the main table's row of each arm (the first; later sections list arms again)
        if line.startswith("| +arm="):
            rows.setdefault(line.split(" | ")[0].strip("| "), line)
    fixed, learn = rows["+arm=fixed_b01"], rows["+arm=learn_eps01"]
    assert "| 2 |" in fixed and "| 2 |" in learn
    assert "0.7000 ± 0.1000" in fixed            # eval acc of 0.6 and 0.8 (population std)
    assert "5.0000 ± 1.0000" in fixed            # KL of 4 and 6 (one eval.json in checkpoints/final)
    assert "1.5000 ± 0.5000" in fixed            # reward
    assert "0.1000 ± 0.0000" in fixed            # w
    assert "0.6000 ± 0.1000" in learn and "0.0300 ± 0.0100" in learn
    assert "2.0000 ± –" in learn                 # KL from one seed only
    assert_png(out / "frontier.png")
    for name in ("curves_loss.png", "curves_beta_mean.png", "curves_eval_accuracy.png"):
        assert_png(out / name)
    printed = capsys.readouterr().out
    assert "+arm=learn_eps01" in printed and str(out / "compare.md") in printed


def test_compare_without_generation_skips_frontier(tmp_path):
    fake_run(tmp_path, "0", "fixed_b01", 0, "fixed", 0.6, 0.1)
    table, outputs = write_comparison(tmp_path, tmp_path / "cmp")
    assert outputs["frontier.png"] is None and not (tmp_path / "cmp" / "frontier.png").exists()
    assert "skipped" in (tmp_path / "cmp" / "compare.md").read_text()
    assert "| 1 |" in table and "0.6000 ± –" in table


def test_compare_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path)])  # empty directory
    assert "no run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing")])
    assert "not a directory" in capsys.readouterr().err


def test_reports_show_paths_relative_to_the_working_directory(tmp_path, monkeypatch):
    from lbdpo.eval.compare import shown_path

    monkeypatch.chdir(tmp_path)
    assert shown_path(tmp_path / "results" / "x") == "results/x"  # no machine-specific prefix in committed files
    assert shown_path(Path("/elsewhere/y")) == "/elsewhere/y"


@pytest.mark.parametrize("mode, kind", [("fixed", "fixed"), ("per_domain", "rule"), ("schedule", "rule"),
                                        ("learnable", "learnable"), ("beta_dpo", "learnable"),
                                        ("per_domain_learned", "learnable")])
def test_a_runs_kind_follows_its_beta_mode(tmp_path, mode, kind):
    """β set by the config per domain or per step is a "rule", not "learnable"; only a single fixed β is "fixed" (the
    frontier is built from those alone); the plot accepts every kind compare gives."""
    from lbdpo.eval.compare import read_run

    fake_run(tmp_path, "run", "a", 0, mode, 0.7, 0.02, kl=2.0, reward=0.5)
    run = read_run(tmp_path / "run")
    assert run["kind"] == kind and (run["beta"] == 0.1) == (kind == "fixed")
    assert_png(plot_frontier([{"kl": 2.0, "reward": 0.5, "label": "a", "kind": run["kind"]}], tmp_path / "f.png"))
