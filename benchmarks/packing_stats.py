"""How much padding and attention work each packed layout carries on real batches (no model forward).

    python benchmarks/packing_stats.py                    # 40 HH batches of 8 pairs, max_length 256 (dpo_speed.py's)
    python benchmarks/packing_stats.py --batches 100 --pairs 4 --data <pairs.jsonl>

Tokenizes the pairs through the real pipeline (SmolLM2's chat template, prompt ≤ 192 tokens), takes them in
batches of ``--pairs``, and packs each with :func:`lbdpo.packed_pairs.pack_pairs` three ways: one padded row per response
(the standard forward: every prompt twice), rows under one block mask (``trainer.packed_attention=block_mask``),
and one row with attention per segment (``segments``). Prints, per batch on average: positions through the linear
layers, real tokens, padding, and attention cells (query × key pairs scored by SDPA: a row's C² under a dense
mask, each segment's L² per segment), for one layer and head.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from dpo_speed import DATA, REPO, model_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-prompt-length", type=int, default=192)
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir

    from lbdpo.build import build_datasets
    from lbdpo.models import load_tokenizer
    from lbdpo.packed_pairs import pack_pairs

    tokenizer = load_tokenizer(model_config("smollm2_135m"))
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):  # dpo_speed.py's data settings
        cfg = compose("config", overrides=[
            "data=jsonl", f"data.path={args.data}", "data.eval_size=null", "data.eval_fraction=null",
            f"data.max_length={args.max_length}", f"data.max_prompt_length={args.max_prompt_length}",
            f"data.max_train_pairs={args.batches * args.pairs}"])
    train_ds = build_datasets(cfg.data, tokenizer, seed=0)[0]
    stats: dict[str, list[float]] = {}
    for b in range(len(train_ds) // args.pairs):
        pairs = train_ds.select(range(b * args.pairs, (b + 1) * args.pairs))
        parts = [[torch.tensor(ids) for ids in pairs[f"{key}_input_ids"]] for key in ("prompt", "chosen", "rejected")]
        n, width = args.pairs, max(len(p) + max(len(c), len(r)) for p, c, r in zip(*parts))  # padded rows: 2n × width
        block, flat = pack_pairs(*parts), pack_pairs(*parts, one_row=True)
        for key, value in (("rows: positions", 2 * n * width), ("rows: attention cells", 2 * n * width ** 2),
                           ("block mask: positions", block.input_ids.numel()),
                           ("block mask: rows", block.input_ids.shape[0]),
                           ("block mask: attention cells", block.input_ids.shape[0] * block.input_ids.shape[1] ** 2),
                           ("segments: positions", flat.input_ids.numel()),
                           ("segments: attention cells", sum((e - s) ** 2 for s, e, _ in flat.segments())),
                           ("real tokens (prompt once)", int((flat.pair >= 0).sum()))):
            stats.setdefault(key, []).append(value)
    mean = {k: statistics.mean(v) for k, v in stats.items()}
    real = mean["real tokens (prompt once)"]
    print(f"{len(stats[next(iter(stats))])} batches × {args.pairs} pairs from {args.data.name}, max_length "
          f"{args.max_length} (prompt ≤ {args.max_prompt_length}); means per batch\n")
    print("| layout | positions | padding + repeated prompts | attention cells (one layer, head) |")
    print("|---|---:|---:|---:|")
    for layout in ("rows", "block mask", "segments"):
        pos = mean[f"{layout}: positions"]
        print(f"| {layout} | {pos:,.0f} | {1 - real / pos:.1%} | {mean[f'{layout}: attention cells'] / 1e6:.2f} M |")
    print(f"\nreal tokens (each prompt once): {real:,.0f}; block mask rows per batch: {mean['block mask: rows']:.1f}")


if __name__ == "__main__":
    main()
