"""What FlexAttention's BlockMask (``trainer.packed_attention=flex``) saves and costs on real batches, no model forward.

    python benchmarks/flex_mask.py                                      # 20 HH batches of 8 pairs, max_length 256
    python benchmarks/flex_mask.py --pairs 16 --max-length 1024 --max-prompt-length 768

Tokenizes HH pairs as ``packing_stats.py`` does (SmolLM2's chat template), packs each batch as a GPU does (rows
bucketed: ``pack_pairs(bucketed=True)``) and prints, per batch on average: the rows' shape, the attention cells a dense
4D mask makes sdpa score (R·C², one layer and head) against those FlexAttention computes (the 128 × 128 tiles its
BlockMask keeps, partial or full, × 128²), and the host cost of building each mask on this CPU: aten ops (what a GPU
launches) and milliseconds (:func:`lbdpo.packed_flex.pair_block_mask` against
:meth:`lbdpo.packed_pairs.PackedPairs.attention_mask`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from dpo_speed import DATA, REPO, model_config
from torch.utils._python_dispatch import TorchDispatchMode


class OpCount(TorchDispatchMode):
    """Counts the aten ops run inside it."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def cost(build, packed) -> tuple[int, float]:
    """(aten ops, ms) of one ``build(packed)``, timed after an untimed call."""
    with OpCount() as count:
        build(packed)
    start = time.perf_counter()
    build(packed)
    return count.ops, (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-prompt-length", type=int, default=192)
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir

    from lbdpo.build import build_datasets
    from lbdpo.models import load_tokenizer
    from lbdpo.packed_flex import TILE, pair_block_mask
    from lbdpo.packed_pairs import pack_pairs

    tokenizer = load_tokenizer(model_config("smollm2_135m"))
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[
            "data=jsonl", f"data.path={args.data}", "data.eval_size=null", "data.eval_fraction=null",
            f"data.max_length={args.max_length}", f"data.max_prompt_length={args.max_prompt_length}",
            f"data.max_train_pairs={args.batches * args.pairs}"])
    train_ds = build_datasets(cfg.data, tokenizer, seed=0)[0]
    stats: dict[str, list[float]] = {}
    for b in range(len(train_ds) // args.pairs):
        pairs = train_ds.select(range(b * args.pairs, (b + 1) * args.pairs))
        parts = [[torch.tensor(ids) for ids in pairs[f"{key}_input_ids"]] for key in ("prompt", "chosen", "rejected")]
        packed = pack_pairs(*parts, bucketed=True)
        rows, width = packed.pair.shape
        block = pair_block_mask(packed)
        tiles = int(block.kv_num_blocks.sum()) + int(block.full_kv_num_blocks.sum())
        (flex_ops, flex_ms), (dense_ops, dense_ms) = cost(pair_block_mask, packed), cost(
            lambda p: p.attention_mask(), packed)
        for key, value in (("rows", rows), ("width", width), ("dense cells", rows * width ** 2),
                           ("flex cells", tiles * TILE ** 2), ("flex ops", flex_ops), ("flex ms", flex_ms),
                           ("dense ops", dense_ops), ("dense ms", dense_ms)):
            stats.setdefault(key, []).append(value)
    m = {k: statistics.mean(v) for k, v in stats.items()}
    print(f"{len(stats['rows'])} batches × {args.pairs} pairs from {args.data.name}, max_length {args.max_length} "
          f"(prompt ≤ {args.max_prompt_length}), rows bucketed; means per batch: rows × width {m['rows']:.1f} × "
          f"{m['width']:.0f}\n")
    print("| mask | attention cells (one layer, head) | build: aten ops | build: ms on this CPU |")
    print("|---|---:|---:|---:|")
    print(f"| dense 4D (block_mask) | {m['dense cells'] / 1e6:.2f} M | {m['dense ops']:.0f} | {m['dense ms']:.1f} |")
    print(f"| BlockMask (flex) | {m['flex cells'] / 1e6:.2f} M ({m['flex cells'] / m['dense cells']:.0%}) | "
          f"{m['flex ops']:.0f} | {m['flex ms']:.1f} |")


if __name__ == "__main__":
    main()
