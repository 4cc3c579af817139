"""Export a training checkpoint as a self-contained, ready-to-use model folder (or hub repo).

    python -m lbdpo.export outputs/lbdpo/<date>/checkpoints/final exported/my-model
    python -m lbdpo.export CHECKPOINT OUT_DIR --merge-lora          # LoRA: plain merged weights, no peft needed
    python -m lbdpo.export CHECKPOINT OUT_DIR --push-to-hub me/my-model

The folder loads with ``AutoModelForCausalLMWithBetaHead.from_pretrained(OUT_DIR)`` (policy + β head) and the
policy alone with ``transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)``. Its ``README.md`` model card
gives the base model, the data, the β configuration, the training configuration and the evaluation numbers
found beside the checkpoint (``eval.json`` of ``evaluate.py``, else the last held-out eval of ``metrics.jsonl``).
No optimizer state, no Hydra logs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .modeling import AutoModelForCausalLMWithBetaHead
from .errors import LbdpoError, MissingFileError

EVAL_JSON_KEYS = {  # model-card row → path in eval.json
    "held-out accuracy (own β)": ("preference", "own_beta", "rewards/accuracies"),
    "held-out margin (own β)": ("preference", "own_beta", "rewards/margins"),
    "held-out accuracy (common β)": ("preference", "common_beta", "rewards/accuracies"),
    "reward of samples": ("generation", "reward", "policy_mean"),
    "reward of reference samples": ("generation", "reward", "reference_mean"),
    "win rate vs reference": ("generation", "reward", "win_rate"),
    "KL(π‖π_ref), nats": ("generation", "kl", "mean"),
}
METRICS_KEYS = {"held-out accuracy": "eval/rewards/accuracies", "held-out margin": "eval/rewards/margins",
                "held-out DPO loss": "eval/loss", "mean β (held-out)": "eval/beta/mean"}


def eval_numbers(checkpoint: Path) -> dict[str, float]:
    """The evaluation numbers found beside a checkpoint (empty when there are none)."""
    run_dir = checkpoint.parent.parent
    for path in (checkpoint / "eval.json", run_dir / "eval.json"):
        if path.is_file():
            data, out = json.loads(path.read_text()), {}
            for label, keys in EVAL_JSON_KEYS.items():
                value = data
                for k in keys:
                    value = value.get(k) if isinstance(value, dict) else None
                if isinstance(value, (int, float)):
                    out[label] = float(value)
            return out
    if (run_dir / "metrics.jsonl").is_file():
        from .eval.plots import read_metrics_jsonl

        _, evals = read_metrics_jsonl(run_dir / "metrics.jsonl")
        if evals:
            return {label: float(evals[-1][key]) for label, key in METRICS_KEYS.items() if key in evals[-1]}
    return {}


def training_section(config: dict[str, Any]) -> str:
    """The model card's data and training paragraphs, from the run's resolved config."""
    data, t = config.get("data", {}), config.get("trainer", {})
    sources = [s.get("path") if isinstance(s, dict) else s for s in (data.get("train") or [])]
    return "\n".join([
        "## Training", "",
        f"- data: {', '.join(map(str, sources)) or 'unknown'} (max_length {data.get('max_length')}, "
        f"max_prompt_length {data.get('max_prompt_length')}, prompt_format {data.get('prompt_format')})",
        f"- {t.get('max_steps') or t.get('num_epochs')} {'steps' if t.get('max_steps') else 'epochs'} × "
        f"{t.get('batch_size')} pairs × {t.get('gradient_accumulation_steps')} accumulation, policy_lr "
        f"{t.get('policy_lr')}, beta_head_lr {t.get('beta_head_lr')}, reference {t.get('reference')}, "
        f"LoRA {'on' if (t.get('lora') or {}).get('enabled') else 'off'}, seed {config.get('seed')}",
        "- full configuration: `lbdpo_config.json` → `training_config`", ""])


def export(checkpoint: str | Path, out_dir: str | Path, merge_lora: bool = False) -> AutoModelForCausalLMWithBetaHead:
    """Write the export folder; returns the loaded model (for ``push_to_hub``)."""
    import yaml

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not checkpoint.is_dir():
        raise MissingFileError(f"{checkpoint}: no such checkpoint folder")
    lm = AutoModelForCausalLMWithBetaHead.from_pretrained(checkpoint)
    if merge_lora:
        if not hasattr(lm.policy, "merge_and_unload"):
            raise LbdpoError(f"--merge-lora: {checkpoint} holds full weights, not a LoRA adapter")
        lm.policy = lm.policy.merge_and_unload()
    config = yaml.safe_load((checkpoint / "config.yaml").read_text()) if (checkpoint / "config.yaml").is_file() else {}
    card = lm.model_card(eval_numbers(checkpoint), extra="\n" + training_section(config))
    lm.save_pretrained(out_dir, model_card=card, provenance={"exported_from": str(checkpoint), "training_config": config})
    return lm


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lbdpo.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a training checkpoint (checkpoints/final or step-N)")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--merge-lora", action="store_true", help="merge a LoRA adapter into full weights")
    parser.add_argument("--push-to-hub", metavar="REPO", default=None, help="also upload to this hub repo")
    args = parser.parse_args(argv)
    try:
        lm = export(args.checkpoint, args.out_dir, merge_lora=args.merge_lora)
        print(f"wrote {args.out_dir}")
        if args.push_to_hub:
            lm.push_to_hub(args.push_to_hub, folder=args.out_dir)
            print(f"pushed to {args.push_to_hub}")
    except (FileNotFoundError, ValueError, ConnectionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
