"""The fixed-β reward-vs-KL frontier: a concave, increasing least-squares fit in log KL, its uncertainty, each gap.

The fit (:func:`fit_frontier`) is the least-squares concave increasing function of x = log KL over every fixed-β
run's (x, reward) — nonparametric (Hildreth's concave regression, with a slope ≥ 0): the best fit among all concave
nondecreasing functions, piecewise linear with its kinks at data points. Written as f(t_0) = a and slopes
s_l = Σ_{i ≥ l} u_i between sorted knots t_l with every u_i ≥ 0, it is a nonnegative least-squares problem
(scipy's nnls). It passes through each fixed arm's cloud of seeds (where straight chords between the arms' means
passed through their means of KL, not their runs), and it is not evaluated outside the fixed runs' KL range (None:
no extrapolation). Its mean residual per fixed arm (:func:`fixed_residuals`) shows any lack of fit; smooth
parametric concave families (a quadratic or saturating exponential in log KL) missed experiment 1's fixed arms by up
to 0.009, a nonparametric fit does not.

Between two fixed arms the data do not pin the frontier down: any concave curve through the arms' fitted points
lies between the fit (straight there) and the extensions of the neighbouring segments. :func:`concave_slack` gives
that room at a KL — how much lower an arm's gap would be against the most concave frontier the fixed arms allow.

Uncertainty (:func:`frontier_bootstrap`): the fixed runs are resampled by seed — seed s of every fixed arm together,
as they share the data order and the evaluation prompts (runs without a seed: within their arm) — and the fit
repeated. Each seed evaluates its own prompts
(the first ``num_prompts`` of its shuffled held-out set), so resampling seeds resamples prompt sets too; resampling
the prompts within a seed as well would count their variance twice. :func:`gap_test`: an arm's mean gap against 0
(on the frontier) or against another arm's, se² = (sd of its gaps)²/n [+ the other's] + the bootstrap variance of
the fitted frontier at the arms' KLs (× n/(n − 1) for n seeds; over the refits whose knots reach those KLs), a t
interval with Welch–Satterthwaite df.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import optimize, stats


def _concave_ls(x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(knots, fitted values) of the weighted least-squares concave nondecreasing fit; points of weight 0 are left
    out. Fewer than two distinct knots: one knot at the weighted mean."""
    w = np.ones_like(y) if w is None else np.asarray(w, dtype=float)
    keep = w > 0
    knots, point_knot = np.unique(x[keep], return_inverse=True)
    if len(knots) < 2:
        return knots, np.array([np.average(y[keep], weights=w[keep])] * len(knots))
    cum = knots - knots[0]
    # f(t_j) = a + Σ_i u_i · (t_{min(i+1, j)} − t_0), a = a⁺ − a⁻, all unknowns ≥ 0
    basis = cum[np.minimum(np.arange(1, len(knots))[None, :], np.arange(len(knots))[:, None])]
    design = np.hstack([np.ones((len(knots), 1)), -np.ones((len(knots), 1)), basis])
    sw = np.sqrt(w[keep])
    coef, _ = optimize.nnls(design[point_knot] * sw[:, None], y[keep] * sw)
    return knots, design @ coef


def _evaluate(knots: np.ndarray, values: np.ndarray, x) -> np.ndarray:
    """The piecewise-linear fit at ``x``; NaN outside its knots (a bootstrap refit that lacks the most extreme runs is
    not extended by extrapolation: its steep end segments would swamp the band)."""
    x = np.asarray(x, dtype=float)
    if not len(knots):
        return np.full(x.shape, np.nan)
    out = np.interp(x, knots, values)
    out[(x < knots[0] - 1e-12) | (x > knots[-1] + 1e-12)] = np.nan
    return out


def fit_frontier(points: Sequence[tuple[float, float]]) -> dict | None:
    """The concave increasing least-squares fit to (KL, reward) points: ``knots`` (log KL) and ``values``, and the
    KL range ``lo``/``hi`` it may be evaluated on; None with fewer than three distinct KLs > 0."""
    pts = [(k, r) for k, r in points if k is not None and r is not None and k > 0]
    if len({k for k, _ in pts}) < 3:
        return None
    knots, values = _concave_ls(np.log([k for k, _ in pts]), np.array([r for _, r in pts], dtype=float))
    return {"knots": knots, "values": values, "lo": float(min(k for k, _ in pts)),
            "hi": float(max(k for k, _ in pts))}


def frontier_at(fit: dict | None, kl: float | None) -> float | None:
    """R*(kl); None without a fit, for a KL ≤ 0 or outside the fitted KL range."""
    if fit is None or kl is None or kl <= 0 or not fit["lo"] * (1 - 1e-12) <= kl <= fit["hi"] * (1 + 1e-12):
        return None
    return float(_evaluate(fit["knots"], fit["values"], [math.log(kl)])[0])


def frontier_reward(points: Sequence[tuple[float, float]], kl: float | None) -> float | None:
    """R*(kl) of the concave fit to ``points`` (KL, reward) — what benchmarks/eval_noise.py asks of the arms' means;
    None as in :func:`frontier_at` or without a fit."""
    return frontier_at(fit_frontier(points), kl)


def frontier_bootstrap(fixed_arms: Sequence[dict], reps: int = 2000, seed: int = 0) -> dict | None:
    """The fit to the fixed arms' runs (``values`` with KL and reward, ``seed``) and ``reps`` refits on resamples:
    of the seeds when every run has one (seed s of every arm together), else of the runs within each arm. Returns
    ``fit``, ``refits`` (list of (knots, values); None with fewer than two seeds/runs per arm) and ``blocks`` (the
    seeds, or the fewest runs of an arm: the n of the n/(n − 1) correction); None without a fit."""
    pts = [(r["values"].get("KL"), r["values"].get("reward"), r.get("seed"), i)
           for i, a in enumerate(fixed_arms) for r in a["runs"]]
    pts = [p for p in pts if p[0] and p[0] > 0 and p[1] is not None]
    fit = fit_frontier([(k, rew) for k, rew, _, _ in pts])
    if fit is None:
        return None
    by_seed = all(s is not None for _, _, s, _ in pts)
    groups = ([[j for j, p in enumerate(pts) if p[2] == s] for s in sorted({p[2] for p in pts})] if by_seed
              else [[j for j, p in enumerate(pts) if p[3] == i] for i in sorted({p[3] for p in pts})])
    blocks = len(groups) if by_seed else min(len(g) for g in groups)
    out = {"fit": fit, "refits": None, "blocks": blocks}
    if blocks >= 2:
        rng = np.random.default_rng(seed)
        x, y = np.log([p[0] for p in pts]), np.array([p[1] for p in pts], dtype=float)
        weights = np.zeros((reps, len(pts)))
        for members in [list(range(len(groups)))] if by_seed else groups:  # seeds as units, or runs within arms
            counts = rng.multinomial(len(members), np.full(len(members), 1 / len(members)), size=reps)
            for col, m in enumerate(members):
                for j in (groups[m] if by_seed else [m]):
                    weights[:, j] = counts[:, col]
        out["refits"] = [_concave_ls(x, y, w) for w in weights]
    return out


def _refit_values(boot: dict, kls: Sequence[float]) -> np.ndarray:
    """(reps, len(kls)): every bootstrap refit at the KLs."""
    x = np.log(np.asarray(kls, dtype=float))
    return np.stack([_evaluate(k, v, x) for k, v in boot["refits"]])


def run_gaps(runs: Sequence[dict], fit: dict | None) -> list[tuple[float, float]]:
    """(reward − R*(KL), KL) of each run (``values`` with "reward" and "KL") inside the fit's KL range."""
    out = []
    for run in runs:
        reward, kl = run["values"].get("reward"), run["values"].get("KL")
        star = frontier_at(fit, kl) if reward is not None else None
        if star is not None:
            out.append((reward - star, kl))
    return out


def gap_test(runs: Sequence[dict], boot: dict | None, other: Sequence[dict] | None = None) -> dict | None:
    """The arm's mean gap (− ``other``'s when given), its 95 % CI and two-sided p, the frontier's uncertainty
    included (module docstring); the keys of :func:`lbdpo.eval.significance.welch` and ``frontier_var``. None
    without a bootstrap or with fewer than two gaps on either side."""
    if boot is None or boot["refits"] is None:
        return None
    sides = [run_gaps(runs, boot["fit"])] + ([run_gaps(other, boot["fit"])] if other is not None else [])
    if any(len(g) < 2 for g in sides):
        return None
    nb = boot["blocks"]
    frontier = [_refit_values(boot, [k for _, k in g]).mean(1) for g in sides]
    f_diff = frontier[0] - (frontier[1] if other is not None else 0.0)
    f_diff = f_diff[np.isfinite(f_diff)]  # the refits that reach every run's KL
    if len(f_diff) < 100:
        return None
    parts = [(float(np.var([g for g, _ in s], ddof=1)) / len(s), len(s) - 1) for s in sides]
    parts.append((float(np.var(f_diff, ddof=1)) * nb / (nb - 1), nb - 1))
    means = [float(np.mean([g for g, _ in s])) for s in sides]
    diff = means[0] - (means[1] if other is not None else 0.0)
    var = sum(v for v, _ in parts)
    if var <= 0:
        return None
    df = var ** 2 / sum(v ** 2 / d for v, d in parts if v > 0)
    se = math.sqrt(var)
    half = float(stats.t.ppf(0.975, df)) * se
    return {"diff": diff, "low": diff - half, "high": diff + half, "p": float(2 * stats.t.sf(abs(diff) / se, df)),
            "n_a": len(sides[0]), "n_b": len(sides[1]) if other is not None else nb, "frontier_var": parts[-1][0]}


def fixed_residuals(fixed_arms: Sequence[dict], fit: dict | None) -> dict[str, float]:
    """arm → mean of its runs' reward − R*(KL): how far the fit passes from each fixed arm (lack of fit)."""
    out = {}
    for a in fixed_arms:
        gaps = run_gaps(a["runs"], fit)
        if gaps:
            out[a["arm"]] = float(np.mean([g for g, _ in gaps]))
    return out


def concave_slack(fixed_arms: Sequence[dict], fit: dict | None, kl: float) -> float | None:
    """How far above the fit a concave frontier may pass at ``kl``: P_j = (mean log KL, fit) of each fixed arm,
    sorted; between P_j and P_{j+1} the most concave frontier through them is the lower of the lines through
    (P_{j−1}, P_j) and (P_{j+1}, P_{j+2}) (either may be missing at the ends). 0 at the arms' points; None without
    a fit or outside [P_first, P_last]."""
    xs = sorted(float(np.mean(np.log([r["values"]["KL"] for r in a["runs"] if r["values"].get("KL")])))
                for a in fixed_arms if any(r["values"].get("KL") for r in a["runs"]))
    if fit is None or len(xs) < 2 or kl is None or kl <= 0 or not xs[0] <= math.log(kl) <= xs[-1]:
        return None
    ys = list(_evaluate(fit["knots"], fit["values"], xs))
    x = math.log(kl)
    j = min(max(i for i in range(len(xs)) if xs[i] <= x), len(xs) - 2)
    chord = ys[j] + (x - xs[j]) * (ys[j + 1] - ys[j]) / (xs[j + 1] - xs[j])
    lines = [ys[j] + (x - xs[j]) * (ys[j] - ys[j - 1]) / (xs[j] - xs[j - 1])] if j >= 1 else []
    if j + 2 < len(xs):
        lines.append(ys[j + 1] + (x - xs[j + 1]) * (ys[j + 2] - ys[j + 1]) / (xs[j + 2] - xs[j + 1]))
    upper = min(lines) if lines else chord
    fitted = float(_evaluate(fit["knots"], fit["values"], [x])[0])
    return max(0.0, upper - fitted)


def seed_gaps(arm: dict, fixed: Sequence[dict]) -> dict[int, float]:
    """{seed s: reward − R*_s(KL)} of the arm's runs, R*_s the fit to the fixed arms' runs of seed s (three or more
    KLs); seeds without that fit, or whose KL falls outside its range, are left out."""
    out = {}
    for run in arm["runs"]:
        seed = run.get("seed")
        if seed is None:
            continue
        fit = fit_frontier([(f["values"].get("KL"), f["values"].get("reward")) for a in fixed for f in a["runs"]
                            if f.get("seed") == seed])
        gaps = run_gaps([run], fit)
        if gaps:
            out[int(seed)] = gaps[0][0]
    return out


def plot_frontier_fit(arms: Sequence[dict], path, boot: dict | None = None):
    """Reward vs KL (log scale): every fixed-β run, the concave fit with its pointwise 95 % bootstrap band, and each
    other arm's mean ± std over seeds. None (nothing written) without a fit."""
    from matplotlib.figure import Figure  # no pyplot: no backend, no global state

    from .plots import KL_LABEL, MARKERS, _save

    boot = boot or frontier_bootstrap([a for a in arms if a["kind"] == "fixed"])
    if boot is None:
        return None
    fit = boot["fit"]
    xs = np.linspace(math.log(fit["lo"]), math.log(fit["hi"]), 200)
    fig = Figure(figsize=(8, 5.5))
    ax = fig.subplots()
    if boot["refits"] is not None:
        low, high = np.nanpercentile(np.stack([_evaluate(k, v, xs) for k, v in boot["refits"]]), [2.5, 97.5], axis=0)
        ax.fill_between(np.exp(xs), low, high, color="0.85", label="95 % bootstrap band (seeds)")
    ax.plot(np.exp(xs), _evaluate(fit["knots"], fit["values"], xs), color="black",
            label="fixed-β frontier (concave least-squares fit)")
    for i, a in enumerate(arms):
        pts = [(r["values"].get("KL"), r["values"].get("reward")) for r in a["runs"]]
        pts = [(k, rew) for k, rew in pts if k and k > 0 and rew is not None]
        if not pts:
            continue
        k, rew = np.array(pts).T
        if a["kind"] == "fixed":
            ax.plot(k, rew, "o", color="0.4", markersize=4)
            ax.annotate(f"β={a['beta']:g}" if a.get("beta") is not None else a["arm"], (k.mean(), rew.mean()),
                        textcoords="offset points", xytext=(5, -12), fontsize=8)
            continue
        ax.errorbar([k.mean()], [rew.mean()], xerr=[k.std()], yerr=[rew.std()], fmt=MARKERS[i % len(MARKERS)],
                    color=f"C{i % 10}", markersize=7, capsize=3, label=a["arm"])
    ax.set_xscale("log")
    ax.set_xlabel(KL_LABEL)
    ax.set_ylabel("mean reward")
    ax.set_title("reward vs KL: fixed-β runs (grey), concave fit in log KL, other arms (mean ± std)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    return _save(fig, path)
