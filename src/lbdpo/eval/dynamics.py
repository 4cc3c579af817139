"""What β did during training and where it ended: the dynamics analysis of issue 14 (experiment 3).

    python -m lbdpo.eval.dynamics results/sentiment_v1            # writes results/sentiment_v1/compare/dynamics.md

Reads, per run folder: ``pairs.jsonl`` (each training pair of each logged step: domain, β, log PPL, f, margin Δ;
``trainer.log_pairs``), ``metrics.jsonl`` (w) and ``eval_pairs.jsonl`` (the held-out pairs at the end, from
evaluate.py). Training is cut into ``windows`` equal spans of steps; per span it reports, over the pairs seen in it:

    β mean, β per domain (mean)  where β went (drift), does it separate the domains, and in which direction?
    f spread (std of f)          does the context factor f(h) = 1 + ε·tanh(NN(h)) still vary across prompts,
                                 or did it saturate at a bound (std → 0)?
    ρ(β, log PPL), ρ(β, Δ)       Spearman correlations: how much of β is log PPL, and whether β tracks how well
                                 the pair is already learned
    ρ(f, log PPL), f by domain   whether f learned something about the prompt beyond log PPL

and at the end, on the held-out pairs, the same numbers plus the share of f's variance explained by the domain
(between-domain variance / total), and the share of training steps whose β sat at β-DPO's floor 1e-3. Arms are summarised as mean ± std over their seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import stats

from ..beta_dpo import BETA_FLOOR
from .compare import mean_std, shown_path


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a file, skipping a last line cut by a kill; [] when the file is absent."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's ρ; None with fewer than 3 pairs or a constant input (ρ undefined, e.g. a fixed β)."""
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(stats.spearmanr(x, y).statistic)


def between_domain_share(values: Sequence[float], domains: Sequence[str]) -> float | None:
    """Σ_d n_d (mean_d − mean)² / Σ (v − mean)²: the share of the variance that the domain explains (η²)."""
    v = np.asarray(values, dtype=float)
    total = float(((v - v.mean()) ** 2).sum())
    if total <= 1e-12 * max(1.0, len(v)) or len(set(domains)) < 2:
        return None
    between = 0.0
    for d in set(domains):
        sub = v[[i for i, x in enumerate(domains) if x == d]]
        between += len(sub) * (sub.mean() - v.mean()) ** 2
    return float(between / total)


def summarize(rows: list[dict]) -> dict[str, float | None]:
    """The statistics above for one set of pair rows (keys: beta/<domain>, f_std, rho_*, f_domain_share, n)."""
    out: dict[str, float | None] = {"n": len(rows)}
    if not rows:
        return out
    col = {k: [float(r[k]) for r in rows] for k in ("beta", "log_ppl", "f", "margin") if k in rows[0]}
    domains = [str(r.get("domain")) for r in rows]
    for d in sorted(set(domains)):
        out[f"beta/{d}"] = float(np.mean([b for b, x in zip(col["beta"], domains) if x == d]))
    for d in sorted(set(domains)) if "f" in col else ():  # where f sits per domain: a bound, or spread
        f_d = [f for f, x in zip(col["f"], domains) if x == d]
        out[f"f/{d}"], out[f"f_min/{d}"], out[f"f_max/{d}"] = float(np.mean(f_d)), min(f_d), max(f_d)
    out["beta/mean"] = float(np.mean(col["beta"]))
    out["beta/cv"] = float(np.std(col["beta"]) / np.mean(col["beta"])) if np.mean(col["beta"]) > 0 else None
    out["f_std"] = float(np.std(col["f"])) if "f" in col else None
    out["f_mean"] = float(np.mean(col["f"])) if "f" in col else None
    out["rho_beta_logppl"] = spearman(col["beta"], col["log_ppl"])
    out["rho_beta_margin"] = spearman(col["beta"], col["margin"]) if "margin" in col else None
    out["rho_f_logppl"] = spearman(col["f"], col["log_ppl"]) if "f" in col else None
    out["f_domain_share"] = between_domain_share(col["f"], domains) if "f" in col else None
    return out


def windows_of(pairs: list[dict], windows: int) -> list[tuple[int, int, dict]]:
    """Training cut into ``windows`` equal spans of steps: (first step, last step, :func:`summarize`) each."""
    if not pairs:
        return []
    last = max(int(r["step"]) for r in pairs)
    edges = [round(i * last / windows) for i in range(windows + 1)]
    out = []
    for lo, hi in zip(edges, edges[1:]):
        rows = [r for r in pairs if lo < int(r["step"]) <= hi]
        if rows:  # labelled by the steps it holds (a resumed run's file may start late)
            out.append((min(int(r["step"]) for r in rows), max(int(r["step"]) for r in rows), summarize(rows)))
    return out


def run_dynamics(run_dir: Path, windows: int = 8) -> dict | None:
    """One run: its windows, its held-out summary and w at the first and last step; None without pairs.jsonl or
    when β never varied (a fixed β)."""
    pairs = read_jsonl(run_dir / "pairs.jsonl")
    if len({r.get("beta") for r in pairs}) < 2:  # no file, or a fixed β: nothing to analyse
        return None
    ws = [r["beta_head/w"] for r in read_jsonl(run_dir / "metrics.jsonl") if "beta_head/w" in r]
    steps = {int(r["step"]) for r in pairs}
    floored = {int(r["step"]) for r in pairs if float(r["beta"]) <= BETA_FLOOR * (1 + 1e-6)}
    return {"windows": windows_of(pairs, windows), "held_out": summarize(read_jsonl(run_dir / "eval_pairs.jsonl")),
            "w_first": ws[0] if ws else None, "w_last": ws[-1] if ws else None, "steps": max(steps),
            "floor_share": len(floored) / len(steps)}


def _arm_of(run_dir: Path) -> str:
    m = re.fullmatch(r"(.+)__seed-\d+", run_dir.name)
    return m.group(1) if m else run_dir.name


def _fmt(values: list[float | None], digits: int = 3) -> str:
    """Mean ± population std of the finite values (compare.py's convention); the mean alone for one, "–" for none."""
    mean, std = mean_std([v for v in values if v is not None and math.isfinite(v)])
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def _domains(summary: dict) -> list[str]:
    """The domains a :func:`summarize` result has a β for."""
    return sorted(k[5:] for k in summary if k.startswith("beta/") and k not in ("beta/mean", "beta/cv"))


def collect(results_dir: Path, windows: int = 8) -> dict[str, list[tuple[Path, dict]]]:
    """arm → [(run folder, :func:`run_dynamics`)] for every run folder with β dynamics, each run read once."""
    by_arm: dict[str, list[tuple[Path, dict]]] = {}
    for run_dir in sorted(p for p in Path(results_dir).iterdir() if p.is_dir()):
        dyn = run_dynamics(run_dir, windows)
        if dyn is not None:
            by_arm.setdefault(_arm_of(run_dir), []).append((run_dir, dyn))
    return by_arm


def dynamics_report(by_arm: dict[str, list[tuple[Path, dict]]], windows: int,
                    arm_order: list[str] | None = None) -> str:
    """Markdown: per arm (mean ± std over seeds) the held-out summary and the first vs last training window."""
    if not by_arm:
        return ""
    rank = {a: i for i, a in enumerate(arm_order or [])}
    arms = sorted(by_arm, key=lambda a: (rank.get(a, len(rank)), a))
    domains = sorted({d for runs in by_arm.values() for _, r in runs for d in _domains(r["held_out"])})
    keys = ["beta/mean", *(f"beta/{d}" for d in domains), "beta/cv", "f_mean", "f_std", "f_domain_share", "rho_beta_logppl",
            "rho_f_logppl", "rho_beta_margin"]
    heads = ["β mean", *(f"β {d}" for d in domains), "β CV", "f mean", "f std", "f: domain share", "ρ(β, log PPL)",
             "ρ(f, log PPL)", "ρ(β, Δ)"]
    md = ["### Held-out pairs at the end of training", "",
          "| arm | seeds | w first → last | steps at β ≤ 0.001 | " + " | ".join(heads) + " |",
          "|" + "---|" * (len(heads) + 4)]
    for arm in arms:
        runs = [r for _, r in by_arm[arm]]
        w = f"{_fmt([r['w_first'] for r in runs], 4)} → {_fmt([r['w_last'] for r in runs], 4)}"
        cells = [_fmt([r["held_out"].get(k) for r in runs]) for k in keys]
        md.append(f"| {arm} | {len(runs)} | {w} | {_fmt([r['floor_share'] for r in runs])} | " + " | ".join(cells)
                  + " |")
    md += ["", f"### Training: first vs last of {windows} windows (pairs.jsonl)", "",
           "| arm | window | " + " | ".join(heads) + " |", "|" + "---|" * (len(heads) + 2)]
    for arm in arms:
        runs = [r for _, r in by_arm[arm] if r["windows"]]
        for which, label in ((0, "first"), (-1, "last")) if runs else ():
            lo, hi, _ = runs[0]["windows"][which]
            cells = [_fmt([r["windows"][which][2].get(k) for r in runs]) for k in keys]
            md.append(f"| {arm} | {label} (steps {lo}–{hi}) | " + " | ".join(cells) + " |")
    md += ["", "### Per run: β and f by domain on the held-out pairs at the end", "",
           "f by domain: mean [min, max]; each seed on its own (a seed-dependent f is hidden by the mean ± std above).",
           "", "| run | w first → last | β mean | " + " | ".join(f"β {d} | f {d}" for d in domains)
           + " | f: domain share | ρ(f, log PPL) |", "|" + "---|" * (2 * len(domains) + 5)]
    for arm in arms:
        for run_dir, r in by_arm[arm]:
            h = r["held_out"]
            cells = [f"{_fmt([h.get(f'beta/{d}')])} | " + (f"{h[f'f/{d}']:.3f} [{h[f'f_min/{d}']:.3f}, "
                     f"{h[f'f_max/{d}']:.3f}]" if f"f/{d}" in h else "–") for d in domains]
            md.append(f"| {run_dir.name} | {_fmt([r['w_first']], 4)} → {_fmt([r['w_last']], 4)} | "
                      f"{_fmt([h.get('beta/mean')])} | " + " | ".join(cells) + f" | {_fmt([h.get('f_domain_share')])} | "
                      f"{_fmt([h.get('rho_f_logppl')])} |")
    return "\n".join(md)


def plot_dynamics(by_arm: dict[str, list[tuple[Path, dict]]], path: Path) -> Path | None:
    """One figure: per arm with pairs.jsonl (seed 0 drawn, others faint), β per domain, f spread and ρ(β, log PPL)
    over the training windows."""

    from .plots import fix_fonts, subplots

    arms = sorted(a for a, runs in by_arm.items() if any(r["windows"] for _, r in runs))
    if not arms:
        return None
    fig, axes = subplots(len(arms), 3, figsize=(14, 2.6 * len(arms)), squeeze=False)
    for row, arm in enumerate(arms):
        for d, r in by_arm[arm]:
            if not r["windows"]:
                continue
            alpha = 1.0 if d.name.endswith("seed-0") else 0.3
            mid = [(lo + hi) / 2 for lo, hi, _ in r["windows"]]
            for i, dom in enumerate(sorted({d for _, _, s in r["windows"] for d in _domains(s)})):
                axes[row][0].plot(mid, [s.get(f"beta/{dom}") for _, _, s in r["windows"]], color=f"C{i}",
                                  alpha=alpha, label=dom if alpha == 1.0 else None)
            axes[row][1].plot(mid, [s.get("f_std") for _, _, s in r["windows"]], color="C0", alpha=alpha)
            axes[row][2].plot(mid, [s.get("rho_beta_logppl") or np.nan for _, _, s in r["windows"]], color="C1",
                              alpha=alpha)
        axes[row][0].set_ylabel(arm, fontsize=8)
        axes[row][0].legend(fontsize=6)
    for ax, title in zip(axes[0], ("β per domain", "std of f across pairs", "Spearman ρ(β, log PPL)")):
        ax.set_title(title, fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel("training step")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fix_fonts(fig)  # CJK domain names: a CJK font if installed, else escaped (plots.py)
    fig.savefig(path, dpi=90)
    return path


def write_dynamics(results_dir: Path, out_dir: Path, windows: int = 8, arm_order: list[str] | None = None) -> str:
    """Write ``dynamics.md`` (and ``dynamics.png``) into ``out_dir``; returns the markdown ("" without pairs.jsonl)."""
    by_arm = collect(results_dir, windows)
    md = dynamics_report(by_arm, windows, arm_order)
    if not md:
        for stale in ("dynamics.md", "dynamics.png"):  # from an earlier build with other runs
            (out_dir / stale).unlink(missing_ok=True)
        return ""
    figure = plot_dynamics(by_arm, out_dir / "dynamics.png")
    text = [f"# β dynamics of {shown_path(results_dir)}", "", "Mean ± population std over seeds. β CV: std/mean of β across pairs; "
            "f: domain share: the share of f's variance between domains (η²); ρ: Spearman; Δ: the β-free log-ratio "
            "margin. What each number asks: `python -m lbdpo.eval.dynamics --help`.", "", md, ""]
    if figure is not None:
        text += ["![β dynamics](dynamics.png)", ""]
    (out_dir / "dynamics.md").write_text("\n".join(text))
    return md


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lbdpo.eval.dynamics", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results_dir", type=Path, help="a folder of run folders (results/<experiment>)")
    parser.add_argument("--out", type=Path, default=None, help="default: RESULTS_DIR/compare")
    parser.add_argument("--windows", type=int, default=8)
    args = parser.parse_args(argv)
    if not args.results_dir.is_dir():
        parser.error(f"{args.results_dir} is not a directory")
    md = write_dynamics(args.results_dir, args.out or args.results_dir / "compare", args.windows)
    print(md or f"no run under {args.results_dir} has a pairs.jsonl (trainer.log_pairs=true writes it)")


if __name__ == "__main__":
    main()
