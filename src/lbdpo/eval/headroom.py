"""Headroom for a per-domain β, out of sample, from an experiment's fixed-β runs.

    python -m lbdpo.eval.headroom results/<experiment>     # writes results/<experiment>/compare/headroom.{md,png}

One global β already solves "most reward at a mean KL"; a per-prompt β can only help through finite-sample or
optimisation effects (e.g. domains whose labels differ in noise), and at this scale the learnt f(h) only separates
languages, so a per-domain β is the function class the design realises. Does a per-domain choice among the fixed-β
arms beat the best single β on data it was not chosen on? **Accuracy**: choose on a random half of each domain's
held-out pairs, score on the other half, over many seeded splits (:func:`accuracy_headroom`); pairs are aligned
across seeds by identity (:mod:`lbdpo.eval.pair_sample`; each seed shuffles its held-out pairs). **Frontier**
(generation reward and KL in ``samples.jsonl``): per KL budget, the per-domain assignment chosen on some seeds,
scored on the others against the single-β frontier (:func:`frontier_splits`). Every random choice is seeded.
"""

from __future__ import annotations

import argparse
import json
import math
from itertools import combinations, product
from pathlib import Path

import numpy as np
import yaml

from ..cli import one_line_errors
from ..errors import LbdpoError
from .compare import collect_runs, shown_path
from .pair_sample import held_out_keys

def _jsonl(path: Path | None) -> list[dict]:
    if path is None or not path.is_file():
        return []
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise LbdpoError(f"{path}: not JSON lines ({err})") from None


def held_out_pairs(run: dict) -> dict[str, tuple[str, bool]]:
    """key → (domain, correct) of one run's held-out pairs ({} without ``eval_pairs.jsonl``). The key is the pair's
    identity (:mod:`lbdpo.eval.pair_sample`): the file's ``key`` field, else rebuilt from the run's data config and
    seed and checked row by row; a key seen twice gets ``#2``, ``#3``…"""
    path = run["eval_json"].parent / "eval_pairs.jsonl" if run["eval_json"] else None
    if not (rows := _jsonl(path)):
        return {}
    keys = [r.get("key") for r in rows]
    if not all(keys):
        config = run["metrics_path"].parent / ".hydra" / "config.yaml"
        keys = held_out_keys(yaml.safe_load(config.read_text()) if config.is_file() else {},
                             json.loads(run["eval_json"].read_text()), rows)
    if keys is None:
        raise LbdpoError(f"{path}: its pairs have no identity: no 'key' field, and the pairs rebuilt from the run's "
                         "data config and seed do not match them (or the data cannot be read here)")
    out, seen = {}, {}
    for key, row in zip(keys, rows):
        seen[key] = seen.get(key, 0) + 1
        out[key if seen[key] == 1 else f"{key}#{seen[key]}"] = (str(row.get("domain") or "all"), bool(row["correct"]))
    return out


def fixed_arms(exp_dir: Path) -> list[dict]:
    """The fixed-β arms of an experiment, smallest β first: {arm, beta, runs: {seed: run}}."""
    runs = [r for r in collect_runs(exp_dir) if r["kind"] == "fixed" and r["beta"] is not None]
    arms: dict[str, dict] = {}
    for r in runs:
        arm = arms.setdefault(r["arm"], {"arm": r["arm"], "beta": r["beta"], "runs": {}})
        arm["runs"][int(r["seed"] if r["seed"] is not None else len(arm["runs"]))] = r
    out = sorted(arms.values(), key=lambda a: (a["beta"], a["arm"]))
    if len(out) < 2:
        raise LbdpoError(f"{exp_dir}: headroom needs two or more fixed-β arms (beta_head.mode=fixed), found {len(out)}")
    return out


def _common_seeds(table: dict, n_arms: int) -> list[int]:
    return sorted(set.intersection(*({s for (j, s), v in table.items() if j == i and v} for i in range(n_arms))))


def accuracy_data(arms: list[dict]) -> dict:
    """Arrays of the fixed arms' held-out correctness, pairs aligned by key: ``correct`` (arm, seed, key) 0/1,
    ``mask`` (seed, key) whether the seed held the pair out, ``dom`` (key,) domain index; and the names."""
    pairs = {(i, s): held_out_pairs(r) for i, a in enumerate(arms) for s, r in a["runs"].items()}
    seeds = _common_seeds(pairs, len(arms))
    if not seeds:
        raise LbdpoError("no seed has eval_pairs.jsonl for every fixed-β arm")
    for s in seeds:
        if len({frozenset(pairs[i, s]) for i in range(len(arms))}) > 1:
            raise LbdpoError(f"the fixed-β arms of seed {s} hold out different pairs")
    domain_of = {k: d for s in seeds for k, (d, _) in pairs[0, s].items()}
    keys, domains = sorted(domain_of), sorted(set(domain_of.values()))
    col = {k: j for j, k in enumerate(keys)}
    correct, mask = np.zeros((len(arms), len(seeds), len(keys))), np.zeros((len(seeds), len(keys)))
    for (si, s), i in product(enumerate(seeds), range(len(arms))):
        for k, (_, ok) in pairs[i, s].items():
            correct[i, si, col[k]], mask[si, col[k]] = ok, 1
    return {"correct": correct, "mask": mask, "dom": np.array([domains.index(domain_of[k]) for k in keys]),
            "domains": domains, "seeds": seeds, "keys": keys}


def make_splits(dom: np.ndarray, n_splits: int, rng: np.random.Generator) -> np.ndarray:
    """(n_splits, key) bool: the choosing half, ⌊n/2⌋ random keys of each domain per split."""
    halves = np.zeros((n_splits, len(dom)), dtype=bool)
    for d in np.unique(dom):
        idx = np.flatnonzero(dom == d)
        ranks = rng.random((n_splits, len(idx))).argsort(1).argsort(1)
        halves[:, idx] = ranks < len(idx) // 2
    return halves


def split_choose_score(hits: np.ndarray, obs: np.ndarray, dom: np.ndarray, halves: np.ndarray,
                       rng: np.random.Generator) -> dict:
    """Choose on each split's half, score on the other. ``hits`` (arm, key): integer count of correct observations;
    ``obs`` (key,): observations. Returns per split ``single`` (R,), ``choice`` (R, D) arm indices and ``gain``
    (R, D + 1): per domain and (last) overall, the oracle's accuracy minus the single β's on the scoring half."""
    n_arms, onehot = hits.shape[0], np.eye(int(dom.max()) + 1)[dom]
    choose = np.einsum("ak,rk,kd->rad", hits, halves, onehot)
    score = np.einsum("ak,rk,kd->rad", hits, ~halves, onehot)
    n_score = np.einsum("k,rk,kd->rd", obs, ~halves, onehot)
    jitter = rng.uniform(0.0, 0.4, choose.shape)  # counts differ by ≥ 1: random ties, strict orders unchanged
    single = np.argmax(choose.sum(2) + jitter[:, :, 0], axis=1)
    keep = 0.5 * (np.arange(n_arms)[None, :, None] == single[:, None, None])  # a tie keeps the single β
    choice = np.argmax(choose + jitter + keep, axis=1)
    diff = np.take_along_axis(score, choice[:, None, :], 1)[:, 0, :] - score[np.arange(len(halves)), single, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        gain = np.concatenate([diff / n_score, (diff.sum(1) / n_score.sum(1))[:, None]], axis=1)
    return {"single": single, "choice": choice, "gain": gain}


def _counts(data: dict, seed_w: np.ndarray, key_w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    weight = seed_w[:, None] * data["mask"] * key_w[None, :]
    return np.einsum("ask,sk->ak", data["correct"], weight), weight.sum(0)


def accuracy_headroom(data: dict, n_splits: int = 1000, n_boot: int = 1000, boot_splits: int = 20,
                      seed: int = 0) -> dict:
    """Per split, the best single β and each domain's best β are chosen on the choosing half (every seed's
    observations of those pairs; a tie keeps the single β) and scored on the other: ``gain`` (D + 1,), per domain and
    overall, is the mean over ``n_splits`` splits. ``ci`` (D + 1, 2): percentile bootstrap, ``n_boot`` replicates of
    ``boot_splits`` splits, resampling seeds and, within domain, pairs (a pair's observations in every seed stay
    together; halves are drawn over distinct pairs, so no copy of a pair is on both sides). ``split_range``: the
    middle 95 % of split gains; ``choice_share`` (D, arm), ``single_share`` (arm,): how often each arm was chosen."""
    rng = np.random.default_rng(seed)
    dom, n_arms, n_dom = data["dom"], data["correct"].shape[0], len(data["domains"])
    hits, obs = _counts(data, np.ones(len(data["seeds"])), np.ones(len(dom)))
    point = split_choose_score(hits, obs, dom, make_splits(dom, n_splits, rng), rng)
    boots = np.full((n_boot, n_dom + 1), np.nan)
    by_domain = [np.flatnonzero(dom == d) for d in range(n_dom)]
    for b in range(n_boot):
        seed_w = np.bincount(rng.integers(0, len(data["seeds"]), len(data["seeds"])), minlength=len(data["seeds"]))
        key_w = np.zeros(len(dom))
        for idx in by_domain:
            np.add.at(key_w, rng.choice(idx, len(idx)), 1)
        hits, obs = _counts(data, seed_w.astype(float), key_w)
        boots[b] = np.nanmean(split_choose_score(hits, obs, dom, make_splits(dom, boot_splits, rng), rng)["gain"], 0)
    return {"gain": np.nanmean(point["gain"], 0), "ci": np.nanpercentile(boots, [2.5, 97.5], axis=0).T,
            "split_range": np.nanpercentile(point["gain"], [2.5, 97.5], axis=0).T,
            "choice_share": np.stack([np.bincount(point["choice"][:, d], minlength=n_arms) / n_splits
                                      for d in range(n_dom)]),
            "single_share": np.bincount(point["single"], minlength=n_arms) / n_splits,
            "n_pairs": np.bincount(dom, minlength=n_dom)}


def frontier_data(arms: list[dict], domains: list[str] | None = None) -> dict | None:
    """Per common seed, the fixed arms' per-prompt KL and reward (``samples.jsonl``), prompts aligned by text:
    ``seeds``, ``domains``, ``per_seed`` [(dom (P,), kl (arm, P), reward (arm, P))]; None without reward and KL."""
    def samples(run):
        rows = _jsonl(run["eval_json"].parent / "samples.jsonl" if run["eval_json"] else None)
        rows = [r for r in rows if all(isinstance(r.get(k), (int, float)) for k in ("kl", "reward_policy_sample"))]
        return {str(r.get("prompt")): r for r in rows}

    table = {(i, s): samples(r) for i, a in enumerate(arms) for s, r in a["runs"].items()}
    seeds = _common_seeds(table, len(arms))
    if len(seeds) < 2:
        return None
    prompts = {s: sorted(set.intersection(*(set(table[i, s]) for i in range(len(arms))))) for s in seeds}
    domains = domains or []
    domains += sorted({str(table[0, s][p].get("domain") or "all") for s in seeds for p in prompts[s]} - set(domains))
    rows = {s: [[table[i, s][p] for p in prompts[s]] for i in range(len(arms))] for s in seeds}
    per_seed = [(np.array([domains.index(str(r.get("domain") or "all")) for r in rows[s][0]]),
                 np.array([[r["kl"] for r in arm] for arm in rows[s]]),
                 np.array([[r["reward_policy_sample"] for r in arm] for arm in rows[s]])) for s in seeds]
    return {"seeds": seeds, "domains": domains, "per_seed": per_seed}


def upper_frontier(kl: np.ndarray, reward: np.ndarray, at: np.ndarray) -> np.ndarray:
    """The single-β frontier at ``at``: upper concave envelope of the points in log KL, made non-decreasing, linear
    between its vertices and flat beyond the end points."""
    hull: list[tuple[float, float]] = []
    for p in sorted(zip(np.log(np.maximum(kl, 1e-6)), reward)):
        while len(hull) >= 2 and ((hull[-1][0] - hull[-2][0]) * (p[1] - hull[-2][1])
                                  - (hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0])) >= 0:
            hull.pop()
        hull.append(p)
    x, y = np.array(hull).T
    return np.interp(np.log(np.maximum(at, 1e-6)), x, np.maximum.accumulate(y))


def _domain_means(per_seed: list, n_dom: int, weights: list | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(arm, seed, domain) mean KL and reward, and (seed, domain) prompt weights."""
    out = ([], [], [])
    for i, (dom, kl, reward) in enumerate(per_seed):
        w = np.ones(len(dom)) if weights is None else weights[i]
        n = np.bincount(dom, w, n_dom)
        for j, values in enumerate((kl, reward)):
            out[j].append(np.stack([np.bincount(dom, w * row, n_dom) for row in values]) / np.where(n > 0, n, np.nan))
        out[2].append(n)
    return np.stack(out[0], 1), np.stack(out[1], 1), np.array(out[2])


def frontier_splits(kl: np.ndarray, reward: np.ndarray, share: np.ndarray, splits: list, rng=None) -> dict:
    """``kl``/``reward`` (arm, seed, domain), ``share`` (domain,) domain weights. An assignment (β_d) is taken to act
    on domain d as the fixed-β run at β_d (no transfer between domains). Per split and per single β as the KL
    budget, the assignment with most reward within it on the choosing seeds is chosen; its ``gain`` on the scoring
    seeds is its reward above their single-β frontier (:func:`upper_frontier`) at its KL, minus the single β's (0 when
    the single β is chosen). With ``rng``, each role's seeds are resampled with replacement (the bootstrap)."""
    n_arms, _, n_dom = kl.shape
    assign = np.array(list(product(range(n_arms), repeat=n_dom)))  # (N, D)
    constant = np.array([np.flatnonzero((assign == a).all(1))[0] for a in range(n_arms)])
    gains, choices = np.zeros((len(splits), n_arms)), np.zeros((len(splits), n_arms, n_dom), dtype=int)
    for j, (choose, score) in enumerate(splits):
        if rng is not None:
            choose, score = rng.choice(choose, len(choose)), rng.choice(score, len(score))
        means = [(np.nanmean(kl[:, list(s)], 1), np.nanmean(reward[:, list(s)], 1)) for s in (choose, score)]
        (kl_c, r_c), (kl_s, r_s) = [(np.nansum(k[assign, np.arange(n_dom)] * share, 1),
                                     np.nansum(r[assign, np.arange(n_dom)] * share, 1)) for k, r in means]
        above = r_s - upper_frontier(kl_s[constant], r_s[constant], kl_s)  # each assignment's height above
        for g in range(n_arms):
            feasible = kl_c <= kl_c[constant[g]] * (1 + 1e-12)
            best = np.argmax(np.where(feasible, r_c, -np.inf) + 1e-12 * (np.arange(len(assign)) == constant[g]))
            gains[j, g], choices[j, g] = above[best] - above[constant[g]], assign[best]
    return {"gain": gains, "choice": choices}


def frontier_headroom(data: dict, choose_seeds: int | None = None, n_boot: int = 1000, seed: int = 0) -> dict:
    """:func:`frontier_splits` over every combination of ``choose_seeds`` seeds (default all but two): ``gain``
    (arm,), ``ci`` (bootstrap over prompts within seed and domain, and seeds within each role) and ``split_range``
    (arm, 2), ``choice_share`` (arm, domain, arm): how often each β was chosen for each domain per budget."""
    rng = np.random.default_rng(seed)
    seeds, n_dom = list(range(len(data["seeds"]))), len(data["domains"])
    c = choose_seeds or max(1, len(seeds) - 2)
    if not 1 <= c < len(seeds):
        raise LbdpoError(f"--choose-seeds={c}: needs 1 ≤ it < the {len(seeds)} seeds with samples")
    splits = [(list(ch), [s for s in seeds if s not in ch]) for ch in combinations(seeds, c)]
    kl, reward, count = _domain_means(data["per_seed"], n_dom, None)
    share = count.sum(0) / count.sum()
    point = frontier_splits(kl, reward, share, splits)
    boots = []
    for _ in range(n_boot):
        weights = [np.zeros(len(dom)) for dom, _, _ in data["per_seed"]]
        for w, (dom, _, _) in zip(weights, data["per_seed"]):
            for d in np.unique(dom):
                np.add.at(w, rng.choice(np.flatnonzero(dom == d), int((dom == d).sum())), 1)
        kl_b, reward_b, _ = _domain_means(data["per_seed"], n_dom, weights)
        boots.append(frontier_splits(kl_b, reward_b, share, splits, rng)["gain"].mean(0))
    return {"gain": point["gain"].mean(0), "ci": np.percentile(boots, [2.5, 97.5], axis=0).T,
            "split_range": np.stack([point["gain"].min(0), point["gain"].max(0)], 1), "share": share,
            "choice_share": np.stack([[np.bincount(point["choice"][:, g, d], minlength=kl.shape[0]) / len(splits)
                                       for d in range(n_dom)] for g in range(kl.shape[0])]), "splits": splits}


def _f(x: float) -> str:
    return "–" if not math.isfinite(x) else f"{x:+.3f}"


def _row(*cells) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def _modal(share: np.ndarray, betas: list[float]) -> str:
    return f"{betas[int(np.argmax(share))]:g} ({np.max(share):.0%})"


def markdown(exp_dir: Path, arms: list[dict], acc: dict, data: dict, front: dict | None, fdata: dict | None,
             args) -> str:
    betas, ci = [a["beta"] for a in arms], lambda pair: f"[{_f(pair[0])}, {_f(pair[1])}]"
    lines = [f"# Headroom for a per-domain β: {shown_path(exp_dir)}", "",
             f"Fixed-β arms: {', '.join(a['arm'] + f' (β = {b:g})' for a, b in zip(arms, betas))}; seeds "
             f"{', '.join(map(str, data['seeds']))}; {len(data['keys'])} held-out pairs, aligned by identity "
             f"({int((data['mask'].sum(0) > 1).sum())} held out by several seeds). Method: the command's `--help`.", "",
             "## Accuracy: β chosen per domain on half of each domain's pairs, scored on the other half", "",
             _row("domain", "pairs", "β chosen (share of splits)", "gain over the best single β", "95 % CI",
                  "middle 95 % of splits"), "|---|---|---|---|---|---|"]
    lines += [_row(name, acc["n_pairs"][d], _modal(acc["choice_share"][d], betas), _f(acc["gain"][d]),
                   ci(acc["ci"][d]), ci(acc["split_range"][d])) for d, name in enumerate(data["domains"])]
    lines += [_row("**all**", len(data["keys"]), "single β: " + _modal(acc["single_share"], betas),
                   f"**{_f(acc['gain'][-1])}**", ci(acc["ci"][-1]), ci(acc["split_range"][-1])), "",
              f"{args.splits} seeded splits (seed {args.seed}); 95 % CI: percentile bootstrap, {args.boot} replicates "
              f"of {args.boot_splits} splits, resampling seeds and pairs within domain. A domain's gain is the "
              "oracle's accuracy minus the single β's on that domain's scoring half; *all* weighs domains by pairs.",
              ""]
    if front is None:
        return "\n".join(lines + ["## Frontier", "", "Not estimated: fewer than two seeds whose fixed-β runs all "
                                   "have reward and KL in samples.jsonl.", "", "![headroom](headroom.png)", ""])
    c = len(front["splits"][0][0])
    lines += [f"## Frontier: β per domain chosen on {c} seeds, scored on {len(fdata['seeds']) - c}", "",
              _row("KL budget of", "β chosen per domain (share of splits)", "reward gain over the single β", "95 % CI",
                   "range over splits"), "|---|---|---|---|---|"]
    lines += [_row(f"β = {arm['beta']:g}", ", ".join(f"{name} {_modal(front['choice_share'][g, d], betas)}"
                                                    for d, name in enumerate(fdata["domains"])),
                   _f(front["gain"][g]), ci(front["ci"][g]), " to ".join(map(_f, front["split_range"][g])))
              for g, arm in enumerate(arms)]
    lines += ["", f"Seeds {', '.join(map(str, fdata['seeds']))}, all {len(front['splits'])} splits; domain weights "
              f"{', '.join(f'{n} {w:.2f}' for n, w in zip(fdata['domains'], front['share']))}; {args.boot} bootstrap "
              "replicates. Gain: reward above the scoring seeds' single-β frontier (upper concave envelope in log KL; "
              "a truly concave frontier lies above its chords, so this favours the oracle) at the assignment's KL, "
              "minus the single β's; each domain assumed to behave as in its β's fixed run.", "",
              "![headroom](headroom.png)", ""]
    return "\n".join(lines)


def plot(path: Path, arms: list[dict], acc: dict, data: dict) -> Path:
    """Per domain: held-out accuracy vs β of the fixed arms (each seed, and the mean), the β chosen most often
    (star) and the single β chosen most often (dashed line)."""
    from matplotlib.figure import Figure

    betas, n_dom = np.array([a["beta"] for a in arms]), len(data["domains"])
    fig = Figure(figsize=(3.2 * n_dom, 3.2))
    axes = np.atleast_1d(fig.subplots(1, n_dom, sharey=True))
    x, single = np.arange(len(betas)), int(np.argmax(acc["single_share"]))  # arms evenly spaced, labelled by β
    for d, ax in enumerate(axes):
        in_d = (data["dom"] == d)[None, :] * data["mask"]
        per_seed = (data["correct"] * in_d[None]).sum(2) / np.maximum(in_d.sum(1), 1)[None]  # (arm, seed)
        ax.plot(x, per_seed, color="0.75", lw=0.8)
        ax.plot(x, per_seed.mean(1), "o-", color="k", label="mean over seeds")
        pick = int(np.argmax(acc["choice_share"][d]))
        label = data["domains"][d].encode("ascii", "backslashreplace").decode()  # DejaVu has no CJK glyphs
        ax.plot([pick], [per_seed.mean(1)[pick]], "*", color="C3", ms=14, label="chosen for the domain")
        ax.axvline(single, ls="--", color="C0", label="single β chosen")
        ax.set(xticks=x, xticklabels=[f"{b:g}" for b in betas], xlabel="β", title=f"{label} ({acc['n_pairs'][d]})")
    axes[0].set_ylabel("held-out accuracy")
    axes[0].legend(fontsize="x-small")
    fig.suptitle(f"out-of-sample gain of a per-domain β over the best single β: {acc['gain'][-1]:+.3f} "
                 f"[{acc['ci'][-1, 0]:+.3f}, {acc['ci'][-1, 1]:+.3f}]", y=1.04)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lbdpo.eval.headroom", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment_dir", type=Path, help="results/<experiment> (run folders <arm>__seed-<S>)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: EXPERIMENT_DIR/compare)")
    parser.add_argument("--splits", type=int, default=1000, help="random half splits for the accuracy estimate")
    parser.add_argument("--boot", type=int, default=1000, help="bootstrap replicates for the intervals")
    parser.add_argument("--boot-splits", type=int, default=20, help="splits per accuracy bootstrap replicate")
    parser.add_argument("--choose-seeds", type=int, default=None, help="frontier: seeds to choose on (default: n − 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    args = parser.parse_args(argv)
    if not args.experiment_dir.is_dir() or min(args.splits, args.boot, args.boot_splits) < 1:
        raise LbdpoError(f"{args.experiment_dir} is not a directory" if not args.experiment_dir.is_dir() else
                         "--splits, --boot and --boot-splits must be ≥ 1")
    arms = fixed_arms(args.experiment_dir)
    data = accuracy_data(arms)
    acc = accuracy_headroom(data, args.splits, args.boot, args.boot_splits, args.seed)
    fdata = frontier_data(arms, list(data["domains"]))
    front = frontier_headroom(fdata, args.choose_seeds, args.boot, args.seed) if fdata else None
    out = args.out or args.experiment_dir / "compare"
    plot(out / "headroom.png", arms, acc, data)  # creates ``out``
    (out / "headroom.md").write_text(markdown(args.experiment_dir, arms, acc, data, front, fdata, args))
    frontier = "" if front is None else "; frontier, per KL budget: " + ", ".join(
        f"β={a['beta']:g}: {g:+.4f}" for a, g in zip(arms, front["gain"]))
    print(f"accuracy: per-domain oracle − best single β = {acc['gain'][-1]:+.4f} [{acc['ci'][-1, 0]:+.4f}, "
          f"{acc['ci'][-1, 1]:+.4f}]{frontier}\nwrote {shown_path(out)}/headroom.*")


if __name__ == "__main__":
    with one_line_errors():
        main()
