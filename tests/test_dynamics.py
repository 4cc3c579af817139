"""lbdpo.eval.dynamics on synthetic runs whose answers are known: β ∝ log PPL gives ρ = 1, a saturated f has no
spread, an f set by the domain has domain share 1, windows cover the steps, and the report groups seeds by arm."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from lbdpo.eval.dynamics import between_domain_share, main, run_dynamics, summarize, windows_of, write_dynamics

DOMAINS = ("en", "zh")


def pair_rows(steps: int, saturated: bool, rng: random.Random) -> list[dict]:
    rows = []
    for step in range(1, steps + 1):
        for _ in range(4):
            domain = rng.choice(DOMAINS)
            log_ppl = (4.5 if domain == "en" else 3.5) + rng.uniform(-0.3, 0.3)
            f = 1.1 if saturated else (1.05 if domain == "en" else 0.95)
            rows.append({"step": step, "domain": domain, "log_ppl": log_ppl, "f": f, "beta": 0.02 * log_ppl * f,
                         "margin": rng.gauss(1.0, 1.0), "loss": 0.5})
    return rows


def write_run(folder, rows, ws=(0.02, 0.03)):
    folder.mkdir(parents=True)
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 99, "be')
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "beta_head/w": w}) + "\n"
                                                  for i, w in enumerate(ws)))
    held_out = [{k: v for k, v in r.items() if k != "step"} for r in rows[-40:]]
    (folder / "eval_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held_out))


def test_summary_statistics_have_their_known_values():
    rng = random.Random(0)
    saturated = summarize(pair_rows(20, saturated=True, rng=rng))
    assert saturated["rho_beta_logppl"] == pytest.approx(1.0)  # β = 0.022·log PPL exactly
    assert saturated["f_std"] == pytest.approx(0.0, abs=1e-12) and saturated["rho_f_logppl"] is None
    assert saturated["f_domain_share"] is None  # no variance to explain
    assert saturated["beta/en"] > saturated["beta/zh"]  # the larger log PPL gets the larger β
    assert saturated["beta/zh"] < saturated["beta/mean"] < saturated["beta/en"]  # the mean over both domains
    by_domain = summarize(pair_rows(20, saturated=False, rng=rng))
    assert by_domain["f_domain_share"] == pytest.approx(1.0) and by_domain["f_std"] == pytest.approx(0.05, abs=0.01)
    assert (by_domain["f/en"], by_domain["f_min/en"], by_domain["f_max/en"]) == pytest.approx((1.05, 1.05, 1.05))
    assert by_domain["f/zh"] == pytest.approx(0.95)
    spread = summarize([{"domain": "en", "log_ppl": 1.0 + i, "beta": 0.1, "margin": 0.0, "f": 0.9 + 0.1 * i}
                        for i in range(3)])  # one domain, f 0.9 / 1.0 / 1.1: its mean and range
    assert (spread["f/en"], spread["f_min/en"], spread["f_max/en"]) == pytest.approx((1.0, 0.9, 1.1))
    assert abs(by_domain["rho_beta_margin"]) < 0.3  # margins drawn independently of β
    assert between_domain_share([1.0, 3.0, 1.0, 3.0], ["a", "b", "a", "b"]) == pytest.approx(1.0)
    assert between_domain_share([1.0, 3.0, 3.0, 1.0], ["a", "a", "b", "b"]) == pytest.approx(0.0)


def test_windows_split_the_steps_evenly():
    rows = pair_rows(16, saturated=True, rng=random.Random(1))
    spans = windows_of(rows, 4)
    assert [(lo, hi) for lo, hi, _ in spans] == [(1, 4), (5, 8), (9, 12), (13, 16)]
    assert all(s["n"] == 16 for _, _, s in spans)


def test_report_groups_seeds_by_arm_and_skips_runs_without_pairs(tmp_path, capsys):
    for seed in (0, 1):
        write_run(tmp_path / f"learn__seed-{seed}", pair_rows(16, False, random.Random(seed)), ws=(0.02, 0.02 + seed))
        write_run(tmp_path / f"saturated__seed-{seed}", pair_rows(16, True, random.Random(seed)))
    (tmp_path / "fixed__seed-0").mkdir()  # an archived run from before pairs.jsonl existed
    assert run_dynamics(tmp_path / "fixed__seed-0") is None
    constant = [{**r, "beta": 0.1} for r in pair_rows(16, True, random.Random(0))]
    write_run(tmp_path / "fixed__seed-1", constant)
    assert run_dynamics(tmp_path / "fixed__seed-1") is None  # a fixed β has no dynamics
    floored = pair_rows(8, True, random.Random(0))
    for r in floored:
        r["beta"] = 0.001 if r["step"] % 4 == 0 else 0.1 + 0.01 * r["step"]  # one step in four at the floor
    write_run(tmp_path / "floored__seed-0", floored)
    assert run_dynamics(tmp_path / "floored__seed-0")["floor_share"] == pytest.approx(0.25)
    shutil.rmtree(tmp_path / "floored__seed-0")
    late = [r for r in pair_rows(16, True, random.Random(0)) if r["step"] > 6]  # a file resumed at step 6
    assert windows_of(late, 4)[0][:2] == (7, 8)
    md = write_dynamics(tmp_path, tmp_path / "compare", windows=4, arm_order=["saturated", "learn"])
    rows = [line for line in md.splitlines() if line.startswith("| learn") or line.startswith("| saturated")]
    assert rows[0].startswith("| saturated | 2 |") and rows[1].startswith("| learn | 2 |")  # experiment order
    assert "0.0200 ± 0.0000 → 0.5200 ± 0.5000" in rows[1]  # w first → last over the two seeds
    assert "(steps 1–4)" in md and "(steps 13–16)" in md and "fixed" not in md
    assert md.count("| β mean | β en | β zh |") == 2  # both tables: overall mean β (drift), then per domain
    per_run = [line for line in md.split("### Per run")[1].splitlines() if line.startswith("| ") and "__seed-" in line]
    assert [line.split(" | ")[0] for line in per_run] == [
        "| saturated__seed-0", "| saturated__seed-1", "| learn__seed-0", "| learn__seed-1"]  # every seed, in order
    assert per_run[2].startswith("| learn__seed-0 | 0.0200 → 0.0200 |") and "| 0.0200 → 1.0200 |" in per_run[3]
    assert "1.050 [1.050, 1.050]" in per_run[2] and "0.950 [0.950, 0.950]" in per_run[2]  # f per domain
    share, rho = per_run[2].rstrip(" |").split(" | ")[-2:]
    assert share == "1.000" and float(rho) > 0.8  # f is the domain; en has the higher log PPL and the higher f
    assert "1.100 [1.100, 1.100]" in per_run[0] and per_run[0].endswith("| – | – |")  # saturated: no variance
    assert (tmp_path / "compare" / "dynamics.md").is_file()
    assert (tmp_path / "compare" / "dynamics.png").read_bytes()[:4] == b"\x89PNG"
    for run in ("learn__seed-0", "learn__seed-1", "saturated__seed-0", "saturated__seed-1"):
        (tmp_path / run / "pairs.jsonl").unlink()
    assert write_dynamics(tmp_path, tmp_path / "compare") == ""
    assert not (tmp_path / "compare" / "dynamics.md").exists()  # no stale report left behind
    main([str(tmp_path / "fixed__seed-0")])
    assert "no run under" in capsys.readouterr().out
