"""How far does "pick the longer reply" get on a data config's held-out pairs? A floor for held-out accuracy.

    python -m lbdpo.eval.length_baseline mix_hh_zh hh_helpful_test --seeds 0 1 2

For each data group (``conf/data/<name>.yaml``) and seed: the held-out pairs that evaluate.py scores for a run of
that seed (:func:`lbdpo.eval.pair_sample.held_out_dataset`: the ``eval`` sources, else the seeded split of
``train``; all of them, as ``max_pairs=1000`` evaluates), and per domain the fraction whose chosen reply is the longer
one, in characters (a tie counts one half). A policy whose held-out accuracy sits at this level has learnt no more
than reply length; DPO is known to pick up length (Park et al., 2024, "Disentangling length from quality in DPO").
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..cli import one_line_errors
from ..errors import LbdpoError
from ..paths import project
from .pair_sample import held_out_dataset


def reply_text(reply) -> str:
    """A reply's text: the string itself, or the contents of a conversation's messages joined."""
    if isinstance(reply, str):
        return reply
    if isinstance(reply, (list, tuple)):
        return "\n".join(reply_text(m.get("content", "") if isinstance(m, dict) else m) for m in reply)
    return "" if reply is None else str(reply)


def longer_wins(chosen, rejected) -> float:
    """1 when the chosen reply is longer (characters), 0 when shorter, ½ for a tie."""
    a, b = len(reply_text(chosen)), len(reply_text(rejected))
    return 1.0 if a > b else 0.0 if a < b else 0.5


def data_config(name: str, seed: int) -> dict:
    """The resolved ``data`` group ``name`` as a run of ``seed`` composes it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    conf = project(Path.cwd(), needed_for="python -m lbdpo.eval.length_baseline") / "conf"
    if not (conf / "data" / f"{name}.yaml").is_file():
        options = sorted(p.stem for p in (conf / "data").glob("*.yaml"))
        raise LbdpoError(f"data={name}: no conf/data/{name}.yaml; options: {', '.join(options)}")
    with initialize_config_dir(config_dir=str(conf.resolve()), version_base="1.3"):
        cfg = compose("config", [f"data={name}", f"seed={seed}"])
    return OmegaConf.to_container(cfg.data, resolve=True)


def baseline(name: str, seeds: list[int]) -> dict[str, dict]:
    """domain → {"acc": [per seed], "pairs": [per seed]} of the longer-reply rule ("all" = every pair)."""
    out: dict[str, dict] = {}
    for seed in seeds:
        held = held_out_dataset(data_config(name, seed), seed)
        if held is None:
            raise LbdpoError(f"data={name}: no held-out pairs (no eval sources and no eval_fraction / eval_size), "
                             "or its files cannot be read here")
        domains = held["domain"] if "domain" in held.column_names else ["all"] * len(held)
        wins = np.array([longer_wins(c, r) for c, r in zip(held["chosen"], held["rejected"])])
        for domain in ["all", *sorted(set(domains) - {"all"})]:
            mask = np.ones(len(wins), bool) if domain == "all" else np.array([d == domain for d in domains])
            entry = out.setdefault(domain, {"acc": [], "pairs": []})
            entry["acc"].append(float(wins[mask].mean()))
            entry["pairs"].append(int(mask.sum()))
    return out


def markdown(results: dict[str, dict[str, dict]], seeds: list[int]) -> str:
    lines = [f"Longer reply (characters) chosen, held-out pairs of seeds {seeds}: mean over seeds [min, max].", "",
             "| data | domain | pairs per seed | longer-reply accuracy |", "|---|---|---:|---|"]
    for name, by_domain in results.items():
        for domain, v in by_domain.items():
            acc = v["acc"]
            lines.append(f"| {name} | {domain} | {round(np.mean(v['pairs']))} | {np.mean(acc):.3f} "
                         f"[{min(acc):.3f}, {max(acc):.3f}] |")
    return "\n".join(lines)


@one_line_errors()
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lbdpo.eval.length_baseline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="+", help="data group names (conf/data/<name>.yaml)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args(argv)
    print(markdown({name: baseline(name, args.seeds) for name in args.data}, args.seeds))


if __name__ == "__main__":
    main()
