"""What a run shows and writes: the start banner, the eval line, and where metrics go: ``metrics.jsonl`` in the
run dir (always), ``pairs.jsonl`` (one line per training pair, ``trainer.log_pairs``), W&B (default, offline
without credentials), TensorBoard (optional). Only the main process writes."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from ..beta_modes import RULE_MODES, describe as describe_rule_mode
from ..errors import LbdpoError

log = logging.getLogger(__name__)


def truncate_metrics_file(path: Path, last_step: int) -> None:
    """On resume from step k, drop lines the interrupted run wrote after k, so the file reads as one run."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, path)


def is_seed_override(override: str) -> bool:
    """True for ``seed=1``, ``+seed=1``, ``++seed=1`` (not for ``data.seed=…``)."""
    return override.split("=", 1)[0].lstrip("+~") == "seed"


def is_sweep_override(override: str) -> bool:
    """True for ``+sweep=NAME``: the named sweep, the same for every run of a multirun."""
    return override.split("=", 1)[0].lstrip("+~") == "sweep"


@dataclass(frozen=True)
class WandbIdentity:
    """Where a run lands on the W&B dashboard: the runs of one sweep share a group named after the sweep
    (``<experiment>/<sweep folder>``; a single run's group is ``experiment``), ``job_type`` is the arm (the
    ``arm=`` override, else the overrides without seed and sweep) and the seed is a tag, so the dashboard groups
    seeds by arm out of the box (Group by: job_type). The name is every override (``default`` when none)."""

    name: str
    group: str
    job_type: str
    tags: list[str]

    @classmethod
    def of(cls, overrides: list[str], experiment: str, sweep_dir: str | None) -> WandbIdentity:
        seeds = [o.split("=", 1)[1] for o in overrides if is_seed_override(o)]
        arm = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+~") == "arm"]
        rest = [o for o in overrides if not (is_seed_override(o) or is_sweep_override(o))]
        group = f"{experiment}/{Path(sweep_dir).name}" if sweep_dir else experiment
        job_type = (arm[0] if arm else ",".join(rest) or "default")[:64]  # W&B caps job_type at 64 characters
        return cls(name=",".join(overrides) or "default", group=group[:128], job_type=job_type,
                   tags=[f"seed={seeds[0] if seeds else 'default'}"])


class RunLogger:
    """Writes one JSON object per logged step to ``metrics.jsonl`` and mirrors it to W&B / TensorBoard;
    with ``log_pairs``, one object per training pair of each logged step to ``pairs.jsonl`` (:meth:`pairs`).

    Args:
        run_dir: the run directory.
        config: the resolved Hydra config (saved as the W&B run config).
        logger_cfg: the ``logger`` group: ``backend`` (wandb | tensorboard | none), ``project``,
            ``mode`` (auto | online | offline), ``histogram_every``.
        identity: the run's W&B name, group, job_type and tags (:class:`WandbIdentity`).
        enabled: False on non-main processes.
        resumed_step: on resume, lines after this step are dropped from both files (the interrupted run's tail).
        log_pairs: also write ``pairs.jsonl``.
    """

    def __init__(self, run_dir: Path, config: DictConfig, logger_cfg: Mapping[str, Any],
                 identity: WandbIdentity | None = None, enabled: bool = True, resumed_step: int | None = None,
                 log_pairs: bool = False):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.pairs_path = Path(run_dir) / "pairs.jsonl"
        self._pairs_file = None
        self.wandb = None
        self.tensorboard = None
        self.histogram_every = int(logger_cfg.get("histogram_every", 0) or 0)
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resumed_step is not None:
            truncate_metrics_file(self.path, resumed_step)
            truncate_metrics_file(self.pairs_path, resumed_step)
        self._file = open(self.path, "a", buffering=1)  # line buffered: every line reaches disk
        if log_pairs:
            self._pairs_file = open(self.pairs_path, "a")
        backend = logger_cfg.get("backend", "none")
        if backend == "wandb":
            self._init_wandb(run_dir, config, logger_cfg, identity or WandbIdentity.of([], "lbdpo", None))
        elif backend == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise LbdpoError("logger=tensorboard needs the tensorboard package: pip install tensorboard") from err

            self.tensorboard = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        elif backend != "none":
            raise LbdpoError(f"logger.backend={backend!r} must be one of wandb, tensorboard, none")

    def _init_wandb(self, run_dir, config, logger_cfg, identity: WandbIdentity) -> None:
        import wandb

        mode = logger_cfg.get("mode", "auto")
        if mode == "auto":
            # never block on the network: online only when credentials are present
            has_key = bool(os.environ.get("WANDB_API_KEY")) or Path("~/.netrc").expanduser().is_file()
            mode = "online" if has_key else "offline"
        self.wandb = wandb.init(
            project=logger_cfg.get("project", "lbdpo"),
            entity=logger_cfg.get("entity"),
            group=identity.group,
            job_type=identity.job_type,
            tags=identity.tags,
            name=identity.name,
            dir=str(run_dir),
            mode=mode,
            config=OmegaConf.to_container(config, resolve=True),
            resume="allow",
            id=logger_cfg.get("run_id") or None,
        )
        log.info("W&B run in %s mode (sync offline runs later with `wandb sync %s/wandb/offline-run-*`)",
                 mode, run_dir)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(dict(metrics), step=step)
        if self.tensorboard is not None:
            for k, v in metrics.items():
                self.tensorboard.add_scalar(k, v, step)

    def pairs(self, step: int, rows: list[dict[str, Any]]) -> None:
        """One line per pair of this step (``{"step", "domain", "beta", "log_ppl", ...}``), flushed per step."""
        if not self.enabled or self._pairs_file is None:
            return
        self._pairs_file.write("".join(json.dumps({"step": step, **row}) + "\n" for row in rows))
        self._pairs_file.flush()

    def histogram(self, step: int, name: str, values) -> None:
        """β (or other) histogram every ``histogram_every`` steps (W&B / TensorBoard only)."""
        if not self.enabled or not self.histogram_every or step % self.histogram_every:
            return
        values = values.detach().float().cpu()
        if self.wandb is not None:
            import wandb

            self.wandb.log({name: wandb.Histogram(values.numpy())}, step=step)
        if self.tensorboard is not None:
            self.tensorboard.add_histogram(name, values, step)

    def summary(self, values: Mapping[str, Any]) -> None:
        if self.enabled and self.wandb is not None:
            self.wandb.summary.update(dict(values))

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._pairs_file is not None:
            self._pairs_file.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()


def format_eval(step: int, metrics: Mapping[str, float]) -> str:
    """One console line with the headline held-out metrics."""
    keys = ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "eval/beta/mean", "eval/log_ppl/mean")
    return f"[eval step {step}] " + "  ".join(f"{k[5:]}={metrics[k]:.4f}" for k in keys if k in metrics)


def count_params(module) -> tuple[int, int]:
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def print_banner(cfg: DictConfig, model, data_report: dict[str, Any], total_steps: int,
                 pairs_per_step: int, run_dir: Path, distributed: str = "1 process") -> None:
    """Start-of-run summary: config essentials, parameter counts per group, data filter counts."""
    from rich.console import Console
    from rich.table import Table

    from ..data.tokenize import describe_truncation

    console = Console()
    table = Table(title=f"lbdpo run → {run_dir}", show_header=False)
    m, h, t = cfg.model, cfg.beta_head, cfg.trainer
    table.add_row("model", f"{m.name_or_path} ({m.source}, {m.dtype})")
    if h.mode in RULE_MODES:  # per_domain, schedule: from the head's config (the schedule as read)
        table.add_row("β", describe_rule_mode(model.beta_head.config))
    elif h.mode == "fixed":
        table.add_row("β", f"fixed β = {h.beta}")
    elif h.mode == "beta_dpo":
        table.add_row("β", f"β-DPO: β₀={h.beta}, α={h.beta_dpo_alpha}, filter ρ={h.beta_dpo_filter}, "
                           f"γ={h.beta_dpo_momentum}")
    else:
        table.add_row("β", f"w·{h.ppl_transform}·f, NN={h.context_net_type}, ε={h.epsilon}, w_init={h.w_init}, "
                           f"w_trainable={h.w_trainable}, normalize={h.normalize}")
    table.add_row("data", f"{data_report['train_pairs']} train / {data_report['eval_pairs']} eval pairs")
    if noise := data_report.get("label_noise"):
        table.add_row("label noise", f"{noise['flipped']} of {noise['domain_pairs']} {noise['domain']} training "
                                     f"pairs flipped (fraction {noise['fraction']:g}); eval pairs clean")
    if held := data_report.get("beta_val_pairs"):  # data.beta_val_fraction
        table.add_row("held out for β", f"{held} of the {data_report['train_pairs']} training pairs, never trained on")
    for split in ("train", "eval"):
        loader = data_report.get(f"{split}_loader") or {}
        skips = {**{k: v for k, v in loader.get("skipped", {}).items() if v}, **data_report[f"{split}_tokenizer_skips"]}
        if loader:
            table.add_row(f"skipped ({split})", ", ".join(f"{k}={v}" for k, v in skips.items()) or "none")
        if data_report[f"{split}_pairs"]:  # what truncation cut in the kept pairs (data/tokenize.py)
            cut = data_report.get(f"{split}_truncated") or {}
            table.add_row(f"truncated ({split})", describe_truncation(cut, data_report[f"{split}_pairs"]))
    for warning in data_report.get("truncation_warnings") or []:
        table.add_row("[bold red]!!! truncation[/]", warning)
    for name, module in (("policy", model.policy_model), ("beta head", model.beta_head)):
        total, trainable = count_params(module)
        table.add_row(f"params: {name}", f"{trainable:,} trainable / {total:,}")
    table.add_row("processes", distributed)
    table.add_row("forward", model.describe_forward())
    table.add_row("schedule", f"{total_steps} steps × {pairs_per_step} pairs, policy_lr={t.policy_lr}, "
                              f"beta_head_lr={t.beta_head_lr}, reference={getattr(model, 'reference_mode', t.reference)}")
    console.print(table)
    log.info("resolved config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
