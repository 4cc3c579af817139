"""Named contrasts of an experiment: two arms compared directly, seed by seed (``contrasts:`` in its YAML file).

The schedule control (issue 38) is one: ``schedule_design`` replays, step by step, the mean β that seed s of
``learn_design`` logged, as one global β(t); ``learn_design − schedule_design`` over the seeds both arms have asks
whether the learned, per-prompt β is anything more than its own schedule. Both arms' seed s train on the same data
order (and hold out the same pairs), so seeds are blocks and the test is the paired t over them (n − 1 df,
:func:`lbdpo.eval.significance.paired`).

Per contrast A − B:

- the two decision measures, Holm-adjusted together (one family per contrast) and judged by the project's rule
  (:func:`lbdpo.eval.significance.verdict`): held-out accuracy (margin ±0.03) and the frontier gap, each seed's run
  against the concave fit to the same seed's fixed-β runs (margin ±0.01 reward; :func:`lbdpo.eval.frontier.seed_gaps`);
- reward and KL, described (mean difference and 95 % CI, unadjusted p), not judged: at a different KL a different
  reward is expected, which is what the gap accounts for;
- the power of the verdict *matches* at the number of seeds the contrast has: the probability that a true difference
  of 0 gets it, from the sd of the paired differences (:func:`lbdpo.eval.power.matches_power`).
"""

from __future__ import annotations

import statistics
from typing import Sequence

from .frontier import seed_gaps
from .oracle import oracle_section
from .power import first_n, matches_power
from .significance import ACC_MARGIN, GAP_MARGIN, _by_seed, _fmt_test, paired, verdict, with_holm

ACC, REWARD, KL = "held-out acc", "reward", "KL"  # compare.COLUMNS headers of the run values used here


def _power(diffs: Sequence[float], margin: float) -> str:
    """P(*matches*) at a true difference of 0 with this many seeds and the observed sd; the seeds 80 % needs."""
    sd = statistics.stdev(diffs) if len(diffs) >= 2 else None
    if not sd:
        return "–"
    need = first_n(lambda k: matches_power(sd, k, margin, paired=True))
    return f"{matches_power(sd, len(diffs), margin, paired=True):.2f} (80 %: {need or '> 400'} seeds)"


def contrast(a: dict, b: dict, fixed: Sequence[dict]) -> dict:
    """The contrast a − b of two arms (compare.group_arms entries), over the seeds both have.

    Returns {"seeds": [...], "acc"/"gap": paired test dicts (with ``p_holm``) or None, "reward"/"kl": paired test
    dicts or None, "acc_diffs"/"gap_diffs": the per-seed differences}."""
    acc_a, acc_b = _by_seed(a, ACC), _by_seed(b, ACC)
    gap_a, gap_b = (seed_gaps(a, fixed), seed_gaps(b, fixed)) if fixed else ({}, {})
    acc, gap = with_holm([paired(acc_a, acc_b), paired(gap_a, gap_b)])
    seeds = sorted(set(acc_a) & set(acc_b))
    return {"seeds": seeds, "acc": acc, "gap": gap,
            "reward": paired(_by_seed(a, REWARD), _by_seed(b, REWARD)), "kl": paired(_by_seed(a, KL), _by_seed(b, KL)),
            "acc_diffs": [acc_a[s] - acc_b[s] for s in seeds],
            "gap_diffs": [gap_a[s] - gap_b[s] for s in sorted(set(gap_a) & set(gap_b))]}


def _describe(t: dict | None) -> str:
    return "–" if t is None else f"{t['diff']:+.4f} [{t['low']:+.4f}, {t['high']:+.4f}] p={t['p']:.2g}"


def contrasts_section(arms: Sequence[dict], pairs: Sequence[Sequence[str]]) -> str:
    """Markdown: one row per named contrast (A, B) of arms present in ``arms``; contrasts whose arms have no run yet
    are listed as waiting."""
    by_name = {a["arm"]: a for a in arms}
    fixed = [a for a in arms if a["kind"] == "fixed"]
    lines = ["Each contrast A − B pairs A's seed s with B's seed s (same data order, same held-out pairs): paired t "
             "over the seeds both have. Accuracy and the frontier gap (each seed against the concave fit to that "
             "seed's fixed-β runs) are one family per contrast, Holm-adjusted; *beats* / *worse* need Holm p < 0.05, "
             f"*matches* the 95 % CI within ±{ACC_MARGIN} accuracy / ±{GAP_MARGIN} reward. Reward and KL are "
             "described, not judged. Power: the probability that a true difference of 0 gets *matches* at these "
             "seeds, from the sd of the paired differences.", "",
             "| A − B | seeds | accuracy | frontier gap | reward | KL | P(matches) acc | P(matches) gap |",
             "|---|---|---|---|---|---|---|---|"]
    waiting = []
    for pair in pairs:
        a, b = (by_name.get(name) for name in pair)
        if a is None or b is None:
            waiting.append(f"{pair[0]} − {pair[1]}")
            continue
        c = contrast(a, b, fixed)
        lines.append(f"| {pair[0]} − {pair[1]} | {len(c['seeds'])} | {_fmt_test(c['acc'], ACC_MARGIN)} | "
                     f"{_fmt_test(c['gap'], GAP_MARGIN)} | {_describe(c['reward'])} | {_describe(c['kl'])} | "
                     f"{_power(c['acc_diffs'], ACC_MARGIN)} | {_power(c['gap_diffs'], GAP_MARGIN)} |")
    if waiting:
        lines += ["", "Waiting for runs of both arms: " + "; ".join(waiting) + "."]
    return "\n".join(lines)


def design_sections(arms: Sequence[dict], oracle: Sequence[str] | None = None,
                    contrasts: Sequence[Sequence[str]] | None = None) -> list[str]:
    """compare.md's sections that an experiment file asks for: the out-of-sample oracle of an arm family
    (:mod:`lbdpo.eval.oracle`) and the named contrasts; [] for neither."""
    md: list[str] = []
    if oracle:
        md += ["## The best of an arm family, chosen out of sample", "", oracle_section(arms, oracle), ""]
    if contrasts:
        md += ["## Named contrasts, paired by seed", "", contrasts_section(arms, contrasts), ""]
    return md


__all__ = ["contrast", "contrasts_section", "design_sections", "verdict"]
