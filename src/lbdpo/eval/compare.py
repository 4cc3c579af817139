"""Compare the arms of a Hydra multirun: mean ± std over seeds, the reward-vs-KL frontier, overlaid curves.

    python -m lbdpo.eval.compare outputs/multirun/<experiment>/<date>              # writes <dir>/compare/
    python -m lbdpo.eval.compare outputs/multirun/<experiment>/<date> --out figs/

A run is a subdirectory holding ``metrics.jsonl``. Its arm is its Hydra overrides
(``.hydra/overrides.yaml``) without the ``seed=…`` entry, so the seeds of one arm are grouped. Per arm,
``compare.md`` shows the number of seeds and, for each metric, the mean ± **population** std over the
seeds that have it (ddof=0, as in :mod:`lbdpo.metrics`; "–" as the std with one value, "–" alone with
none). Metrics: the last logged ``eval/rewards/accuracies``, ``eval/rewards/margins``, ``eval/loss`` and
``beta_head/w`` of ``metrics.jsonl``, and from ``eval.json`` (run dir, else ``checkpoints/final/``) the
held-out accuracy (at the common β, which is the accuracy at any β), the policy's mean reward, its win rate over
the reference and the KL. Below the table: the same per domain, the extra evaluation sets (``eval_<name>/``, whole
and per domain), each non-fixed arm tested against the best fixed β and β-DPO (:mod:`lbdpo.eval.significance`), and
the same test for every per-domain and per-set accuracy. Run folders named ``<arm>__seed-<S>`` (an experiment's, see
:mod:`lbdpo.experiment`) are grouped by that arm name.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import yaml

from ..train.run_logging import is_seed_override, is_sweep_override
from .frontier import plot_frontier_fit
from .contrasts import design_sections
from .pair_sample import read_held_out
from .plots import plot_frontier, plot_overlaid_curves, read_metrics_jsonl
from .significance import accuracy_table, blocked_table, moonshot_table, pair_sampling_note
from ..errors import LbdpoError

# (column header, where the value comes from, key path)
COLUMNS = [
    ("train-eval acc", "eval", ("eval/rewards/accuracies",)),
    ("train-eval margin", "eval", ("eval/rewards/margins",)),
    ("train-eval loss", "eval", ("eval/loss",)),
    ("held-out acc", "eval.json", ("preference", "common_beta", "rewards/accuracies")),
    ("reward", "eval.json", ("generation", "reward", "policy_mean")),
    ("win rate", "eval.json", ("generation", "reward", "win_rate")),
    ("KL", "eval.json", ("generation", "kl", "mean")),
    ("w", "train", ("beta_head/w",)),
]
CURVES = [("curves_loss.png", "loss"), ("curves_beta_mean.png", "beta/mean"),
          ("curves_eval_accuracy.png", "eval/rewards/accuracies")]


# ---------------------------------------------------------------- one run

def _number(value) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _get(tree, path: tuple[str, ...]):
    """``tree[path[0]][path[1]]…``, or None when any level is missing or not a mapping."""
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _last(lines: list[dict], key: str) -> float | None:
    """The value of ``key`` in the last line that logged it as a finite number."""
    return next((v for v in (_number(line.get(key)) for line in reversed(lines)) if v is not None), None)


def _read_yaml(path: Path):
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def shown_path(path: Path) -> str:
    """``path`` relative to the working directory when inside it (as the reports show it), else as given."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def arm_name(overrides: list[str], run_name: str) -> str:
    """The run's overrides without its seed, sweep name and ``trainer.resume_from``, joined with spaces
    (``run_name`` when nothing is left)."""
    kept = [o for o in overrides if not (is_seed_override(o) or is_sweep_override(o)
                                         or o.lstrip("+~").startswith("trainer.resume_from="))]
    return " ".join(kept) or run_name


def find_eval_json(run_dir: Path) -> Path | None:
    """``eval.json`` of a run: in the run dir first, else in ``checkpoints/final/``; None when neither."""
    return next((c for c in (run_dir / "eval.json", run_dir / "checkpoints" / "final" / "eval.json") if c.is_file()),
                None)


def read_run(run_dir: Path) -> dict | None:
    """Arm, label, metric values and β-head mode of one run dir (None when it has no ``metrics.jsonl``).

    An unreadable ``eval.json`` is treated as absent (its columns show "–").
    """
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        return None
    train, evals = read_metrics_jsonl(metrics_path)
    overrides = [str(o) for o in (_read_yaml(run_dir / ".hydra" / "overrides.yaml") or [])]
    config = _read_yaml(run_dir / ".hydra" / "config.yaml") or {}
    eval_json_path = find_eval_json(run_dir)
    eval_json = {}
    if eval_json_path is not None:
        try:
            eval_json = json.loads(eval_json_path.read_text())
        except json.JSONDecodeError:
            eval_json = {}
    values = {}
    for header, source, key in COLUMNS:
        if source == "eval":
            values[header] = _last(evals, key[0])
        elif source == "train":
            values[header] = _last(train, key[0])
        else:
            values[header] = _number(_get(eval_json, key))
    mode = _get(config, ("beta_head", "mode"))
    fixed = mode == "fixed"
    run = {
        "run": run_dir.name,
        "label": " ".join(overrides) or run_dir.name,
        "arm": arm_name(overrides, run_dir.name),
        "overrides": overrides,
        "metrics_path": metrics_path,
        "eval_json": eval_json_path,
        "kind": "fixed" if fixed else "rule" if mode in ("per_domain", "schedule") else "learnable",  # rule: β set
        # by the config per domain or per step, not learned (compared with the fixed-β frontier as learnable arms are)
        "beta": _number(_get(config, ("beta_head", "beta"))) if fixed else None,
        "values": values,
        "mode": mode,
        "seed": _number(_get(config, ("seed",))),  # arms that share a seed share its data order (blocked tests)
        "pairs_correct": read_held_out(eval_json_path, config, eval_json),  # {pair key: ranked right}
        "per_domain": domain_values(eval_json),
        "extra_evals": {path.parent.name[len("eval_"):]: extra_eval_values(path)
                        for path in sorted(run_dir.glob("eval_*/eval.json"))},
    }
    run["accuracies"] = accuracy_measures(run)
    return run


def extra_eval_values(path: Path) -> dict[str, float | None]:
    """Accuracy and the margin at the common β of an extra evaluation set (``eval_<name>/eval.json``): ``acc`` and
    ``margin`` over all its pairs, and ``<domain> acc`` / ``<domain> margin`` when its pairs come from two or more
    domains (e.g. HH's online and rejection-sampled test files)."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    common = _get(data, ("preference", "common_beta")) or {}
    out = {"acc": _number(common.get("rewards/accuracies")), "margin": _number(common.get("rewards/margins"))}
    domains = _get(data, ("preference", "per_domain")) or {}
    for domain, d in sorted(domains.items()) if len(domains) > 1 else ():
        out[f"{domain} acc"] = _number(_get(d, ("common_beta", "rewards/accuracies")))
        out[f"{domain} margin"] = _number(_get(d, ("common_beta", "rewards/margins")))
    return out


def accuracy_measures(run: dict) -> dict[str, float]:
    """Every held-out accuracy of one run beside the main one, by name: ``held-out <domain>`` for each domain of the
    held-out pairs (when there are two or more), ``<set>`` and ``<set> <domain>`` for each extra evaluation set."""
    domains = run.get("per_domain", {})
    out = {f"held-out {d}": domains[d].get("acc") for d in sorted(domains)} if len(domains) > 1 else {}
    for name, values in sorted(run.get("extra_evals", {}).items()):
        out[name] = values.get("acc")
        out.update({f"{name} {k[:-len(' acc')]}": v for k, v in values.items() if k.endswith(" acc")})
    return {k: v for k, v in out.items() if v is not None}


def domain_values(eval_json: dict) -> dict[str, dict[str, float | None]]:
    """domain → held-out accuracy (``acc``) and margin at the common β (``margin``), policy reward and KL of that
    domain's prompts (from eval.json)."""
    out: dict[str, dict[str, float | None]] = {}
    for domain, d in (_get(eval_json, ("preference", "per_domain")) or {}).items():
        out.setdefault(domain, {})["acc"] = _number(_get(d, ("common_beta", "rewards/accuracies")))
        out[domain]["margin"] = _number(_get(d, ("common_beta", "rewards/margins")))
    for domain, d in (_get(eval_json, ("generation", "per_domain")) or {}).items():
        out.setdefault(domain, {}).update(reward=_number(_get(d, ("reward", "policy_mean"))),
                                          KL=_number(_get(d, ("kl",))))
    return out


# ---------------------------------------------------------------- runs → arms

def _natural_key(name: str):
    """Sort "2_…" before "10_…"."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def collect_runs(multirun_dir: Path) -> list[dict]:
    """Every run (subdirectory with ``metrics.jsonl``) of a multirun dir, in natural order of the dir names. Arms and
    labels name only what differs between the runs: overrides that every run shares are left out."""
    dirs = sorted((d for d in Path(multirun_dir).iterdir() if d.is_dir()), key=lambda d: _natural_key(d.name))
    runs = [r for r in (read_run(d) for d in dirs) if r is not None]
    named = [re.fullmatch(r"(.+)__seed-\d+", r["run"]) for r in runs]
    if runs and all(named):  # an experiment's run folders (lbdpo.experiment): <arm>__seed-<S>
        for r, m in zip(runs, named):
            r["arm"] = r["label"] = m.group(1)
    elif len(runs) > 1:
        shared = set.intersection(*(set(r["overrides"]) for r in runs))
        for r in runs:
            own = [o for o in r["overrides"] if o not in shared]
            r["arm"], r["label"] = arm_name(own, "(the shared options)"), " ".join(own) or r["run"]
    return runs


def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and population std (ddof=0) of the non-None values; std None with fewer than two, both None with none."""
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    mean = sum(present) / len(present)
    if len(present) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in present) / len(present))


def fmt_mean_std(mean: float | None, std: float | None) -> str:
    """``0.7000 ± 0.1000``; ``0.7000 ± –`` with one value; ``–`` with none."""
    if mean is None:
        return "–"
    return f"{mean:.4f} ± " + ("–" if std is None else f"{std:.4f}")


def group_arms(runs: list[dict]) -> list[dict]:
    """One entry per arm (first-appearance order): its runs, kind, β and (mean, std) of every column."""
    arms: dict[str, list[dict]] = {}
    for run in runs:
        arms.setdefault(run["arm"], []).append(run)
    out = []
    for arm, members in arms.items():
        out.append({
            "arm": arm,
            "runs": members,
            "n_seeds": len(members),
            "kind": members[0]["kind"],
            "beta": members[0]["beta"],
            "stats": {header: mean_std([r["values"][header] for r in members]) for header, _, _ in COLUMNS},
        })
    return out


def frontier_points(arms: list[dict]) -> list[dict]:
    """One plot_frontier point per arm that has both a mean KL and a mean reward."""
    points = []
    for a in arms:
        (kl, kl_std), (reward, reward_std) = a["stats"]["KL"], a["stats"]["reward"]
        if kl is None or reward is None:
            continue
        points.append({"kl": kl, "reward": reward, "kl_std": kl_std, "reward_std": reward_std,
                       "label": a["arm"], "kind": a["kind"], "beta": a["beta"]})
    return points


def _nested_table(arms: list[dict], field: str, columns: list[tuple[str, str]]) -> str:
    """Markdown: per arm, mean ± std over seeds of ``run[field][group][key]`` for each (group, key) column that some
    run has; "" when none has any."""
    present = [(g, k) for g, k in columns
               if any(r.get(field, {}).get(g, {}).get(k) is not None for a in arms for r in a["runs"])]
    if not present:
        return ""
    header = ["arm", *(f"{g} {k}" for g, k in present)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for a in arms:
        cells = [fmt_mean_std(*mean_std([r.get(field, {}).get(g, {}).get(k) for r in a["runs"]])) for g, k in present]
        lines.append("| " + " | ".join([a["arm"], *cells]) + " |")
    return "\n".join(lines)


def per_domain_table(arms: list[dict]) -> str:
    """Markdown: per arm and domain, held-out accuracy, margin at the common β, reward and KL (mean ± std over
    seeds; columns no run has are left out); "" without two domains."""
    domains = sorted({d for a in arms for r in a["runs"] for d in r.get("per_domain", {})})
    if len(domains) < 2:
        return ""
    return _nested_table(arms, "per_domain", [(d, k) for d in domains for k in ("acc", "margin", "reward", "KL")])


def extra_evals_table(arms: list[dict]) -> str:
    """Markdown: per arm and extra evaluation set, accuracy and margin at the common β, over the whole set and per
    domain of it; "" when there is none."""
    seen = dict.fromkeys((n, k) for a in arms for r in a["runs"] for n, values in r.get("extra_evals", {}).items()
                         for k in values)  # each set's keys in first-seen order: acc, margin, then per domain
    return _nested_table(arms, "extra_evals", sorted(seen, key=lambda column: column[0]))


def markdown_table(arms: list[dict]) -> str:
    header = ["arm", "seeds", *(h for h, _, _ in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for a in arms:
        cells = [a["arm"], str(a["n_seeds"]), *(fmt_mean_std(*a["stats"][h]) for h, _, _ in COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- outputs

def write_comparison(multirun_dir: Path, out_dir: Path, arm_order: list[str] | None = None,
                     oracle: list[str] | None = None, contrasts: list[list[str]] | None = None,
                     ) -> tuple[str, dict[str, Path | None]]:
    """Write ``compare.md`` and the figures into ``out_dir``; return the table and {name: path or None if skipped}.
    ``arm_order``: arm names listed first, in this order (an experiment's order); the rest follow. ``oracle``: arms
    whose leave-one-seed-out best is compared with the best fixed β (:mod:`lbdpo.eval.oracle`); ``contrasts``: arm
    pairs (A, B) compared seed by seed (:mod:`lbdpo.eval.contrasts`).

    Raises ValueError when ``multirun_dir`` holds no run.
    """
    multirun_dir, out_dir = Path(multirun_dir), Path(out_dir)
    runs = collect_runs(multirun_dir)
    if not runs:
        raise LbdpoError(f"no run with a metrics.jsonl under {multirun_dir}")
    arms = group_arms(runs)
    if arm_order:
        rank = {name: i for i, name in enumerate(arm_order)}
        arms.sort(key=lambda a: rank.get(a["arm"], len(rank)))  # stable: unlisted arms keep their order
    table = markdown_table(arms)
    out_dir.mkdir(parents=True, exist_ok=True)

    outputs: dict[str, Path | None] = {}
    outputs["frontier.png"] = plot_frontier(frontier_points(arms), out_dir / "frontier.png")
    outputs["frontier_fit.png"] = plot_frontier_fit(arms, out_dir / "frontier_fit.png")
    labels = {}
    for r in runs:
        label = r["label"] if r["label"] not in labels else f"{r['label']} ({r['run']})"
        labels[label] = r["metrics_path"]
    for name, key in CURVES:
        outputs[name] = plot_overlaid_curves(labels, key, out_dir / name)

    notes = ["Mean ± population std (ddof=0) over the seeds that have the value; \"± –\" = one value, "
             "\"–\" = none. train-eval acc/margin/loss: the last eval of metrics.jsonl (the training run's eval "
             "split, own β); held-out acc (the sign of the β-free margin, so the same at every β), reward, win rate, "
             "KL: eval.json of evaluate.py; w: last train step."]
    md = [f"# Comparison of {shown_path(multirun_dir)}", "", table, "", *notes, ""]
    by_domain = per_domain_table(arms)
    if by_domain:
        md += ["## Per domain", "", by_domain, "", "acc, margin (at the common β): held-out pairs of the domain; "
               "reward, KL: its generation prompts (eval.json per_domain; runs evaluated before it was recorded "
               "show –).", ""]
    extra = extra_evals_table(arms)
    if extra:
        md += ["## Other evaluation sets", "", extra, "", "Each set's eval.json (an experiment's `eval_<name>/`), "
               "over all its pairs and per domain of them; the margin is at the common β, which compares runs on "
               "one scale.", ""]
    tests = moonshot_table(arms)
    if tests:
        md += ["## Against the best fixed β and β-DPO", "", tests, ""]
    md += design_sections(arms, oracle, contrasts)  # what the experiment file asks for: oracle:, contrasts:
    blocked = blocked_table(arms)
    if blocked:
        md += ["## The same, blocked by seed (secondary analysis)", "", blocked, ""]
    sampling = pair_sampling_note(arms)
    if sampling:
        md += [sampling, ""]
    by_set = accuracy_table(arms)
    if by_set:
        md += ["## Accuracy per domain and evaluation set, against the best fixed β and β-DPO", "", by_set, ""]
    if outputs["frontier.png"] is None:
        md += ["Frontier figure skipped: no run has both generation KL and reward in eval.json.", ""]
    else:
        md += ["![reward vs KL](frontier.png)", ""] + (["![the concave fit](frontier_fit.png)", ""]
                                                          if outputs["frontier_fit.png"] else [])
    for name, key in CURVES:
        md += [f"![{key}]({name})", ""] if outputs[name] else [f"{name} skipped: no run logged {key}.", ""]
    md_path = out_dir / "compare.md"
    md_path.write_text("\n".join(md))
    return table, {"compare.md": md_path, **outputs}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lbdpo.eval.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("multirun_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: MULTIRUN_DIR/compare)")
    args = parser.parse_args(argv)
    if not args.multirun_dir.is_dir():
        parser.error(f"{args.multirun_dir} is not a directory")
    try:
        table, outputs = write_comparison(args.multirun_dir, args.out or args.multirun_dir / "compare")
    except ValueError as err:
        parser.error(str(err))
    print(table)
    print()
    for name, path in outputs.items():
        print(f"{name}: {path if path is not None else 'skipped (no data)'}")


if __name__ == "__main__":
    main()
