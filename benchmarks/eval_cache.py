"""What ``evaluate.py``'s reference caches save: the same checkpoint evaluated with ``reference_cache=false`` (the
reference model scores every held-out pair and generates its own continuations) and with it on, the caches warm.

    python benchmarks/eval_cache.py CHECKPOINT                        # ~10 min on 2 cores; run it alone
    python benchmarks/eval_cache.py CHECKPOINT --sets sentiment      # one set

Sets (each an ``evaluate.py`` call): ``hh`` — 300 HH helpful test pairs, preference pass only (experiment 2's
``hh_test`` evaluation, halved); ``sentiment`` — the 259 held-out sentiment pairs and 64 prompts' generations
(experiment 1's evaluation). Per set: one call with the caches off, one with them on that fills whatever is missing
(not timed), one more with them on (timed): wall seconds of each timed call and their ratio. The numbers the two
timed calls write are compared too (preference metrics to 1e-5; reference continuations identical).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETS = {
    "hh": ["data=hh_helpful_test", "max_pairs=300", "generation.enabled=false"],
    "sentiment": ["data=sentiment"],
}


def evaluate(checkpoint: str, out: Path, overrides: list[str], cache: bool) -> float:
    start = time.time()
    subprocess.run([sys.executable, str(REPO / "evaluate.py"), f"checkpoint={checkpoint}", f"output_dir={out}",
                    "plots=false", f"reference_cache={str(cache).lower()}", *overrides], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.time() - start


def same_numbers(a: Path, b: Path) -> bool:
    ea, eb = (json.loads((d / "eval.json").read_text()) for d in (a, b))
    pa, pb = ea["preference"]["common_beta"], eb["preference"]["common_beta"]
    close = all(abs(pa[k] - pb[k]) <= 1e-5 * max(1.0, abs(pb[k])) for k in pb)
    if (a / "samples.jsonl").is_file():
        ra, rb = ([(r["reference_greedy"], r["reference_sample"])
                   for r in map(json.loads, (d / "samples.jsonl").open())] for d in (a, b))
        close = close and ra == rb
    return close


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--sets", nargs="*", default=list(SETS), choices=list(SETS))
    args = parser.parse_args()
    print("| set | reference_cache=false (s) | reference_cache=true, warm (s) | speed-up | same numbers |")
    print("|---|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sets:
            off, on = Path(tmp) / f"{name}_off", Path(tmp) / f"{name}_on"
            t_off = evaluate(args.checkpoint, off, SETS[name], cache=False)
            evaluate(args.checkpoint, on, SETS[name], cache=True)  # fills what is missing
            t_on = evaluate(args.checkpoint, on, SETS[name], cache=True)
            print(f"| {name} | {t_off:.1f} | {t_on:.1f} | {t_off / t_on:.2f}× | {same_numbers(on, off)} |",
                  flush=True)


if __name__ == "__main__":
    main()
