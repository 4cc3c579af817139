"""Figures of a run or a sweep: β distributions, training curves, the reward-vs-KL frontier.

Every plot function writes one PNG (creating its parent folder) and returns its path. On empty input
(no values, no points, no metrics lines, no run that logged the key) it writes **nothing and returns
None**, so callers can skip a figure without a try/except. Non-finite values (NaN, ±inf) are dropped
before plotting. A panel of :func:`plot_training_curves` whose keys are absent says "not logged".
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure  # figures without pyplot: no backend chosen, no global state touched
from ..errors import LbdpoError, MissingFileError

KL_LABEL = "KL(π‖π_ref) (sequence-level, nats)"
LOG_PPL_LABEL = "log PPL(x) under the policy"
BETA_LABEL = "β(x)"
MARKERS = ["o", "s", "D", "^", "v", "P", "X", "*", "<", ">", "h"]
# Fonts that draw CJK text (matplotlib's default DejaVu Sans has none of its glyphs): the first installed one is the
# fallback of a text with characters the default font lacks (fix_fonts); without any, those characters are escaped.
CJK_FAMILIES = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans CJK TC", "Noto Sans CJK KR", "Noto Sans SC",
                "Source Han Sans SC", "Source Han Sans", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei",
                "Droid Sans Fallback", "AR PL UMing CN", "Microsoft YaHei", "SimHei", "PingFang SC",
                "Hiragino Sans GB", "Arial Unicode MS")


# ---------------------------------------------------------------- helpers

def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@functools.lru_cache(maxsize=None)
def _charmap(font_path: str) -> frozenset[int]:
    """The code points a font file has glyphs for."""
    from matplotlib import ft2font

    return frozenset(ft2font.FT2Font(font_path).get_charmap())


@functools.lru_cache(maxsize=None)
def fallback_font(candidates: tuple[str, ...] = CJK_FAMILIES) -> tuple[str, str] | None:
    """(family, file) of the first installed font among ``candidates``, or None."""
    from matplotlib import font_manager

    installed = {f.name: f.fname for f in font_manager.fontManager.ttflist}
    return next(((name, installed[name]) for name in candidates if name in installed), None)


def fix_fonts(fig, candidates: tuple[str, ...] = CJK_FAMILIES) -> None:
    """Make every text of ``fig`` drawable: a text with characters its font lacks (a CJK domain name in a legend or
    title) gets the first installed font of ``candidates`` as a fallback family when that font has them all, else
    those characters written as escapes (``数据`` → ``\\u6570\\u636e``), never boxes. Per text object: no global
    matplotlib setting changes. Tick labels a formatter writes at draw time are not seen (lbdpo's are numbers)."""
    from matplotlib import font_manager
    from matplotlib.text import Text

    fallback = fallback_font(candidates)
    for text in fig.findobj(Text):
        content = text.get_text()
        have = _charmap(font_manager.findfont(text.get_fontproperties()))
        missing = {c for c in content if ord(c) not in have and not c.isspace()}
        if not missing:
            continue
        if fallback and all(ord(c) in _charmap(fallback[1]) for c in missing):
            text.set_fontfamily([*text.get_fontfamily(), fallback[0]])
        else:  # U+XXXX inside mathtext ($…$), where a backslash would start a command
            math = content.replace(r"\$", "").count("$") >= 2
            text.set_text("".join((f"U+{ord(c):04X}" if math else c.encode("unicode_escape").decode())
                                  if c in missing else c for c in content))


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fix_fonts(fig)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def subplots(rows: int = 1, cols: int = 1, **kwargs):
    """(Figure, axes) like ``pyplot.subplots``, but a plain :class:`Figure` (saved with ``savefig``; nothing to close)."""
    fig = Figure(figsize=kwargs.pop("figsize", None))
    return fig, fig.subplots(rows, cols, **kwargs)


def _check_lengths(name: str, values: Sequence, expected: int) -> None:
    if values is not None and len(values) != expected:
        raise LbdpoError(f"{name} has {len(values)} entries but beta has {expected}")


def _group_by_domain(domains: Sequence[str] | None, n: int) -> dict[str, np.ndarray]:
    """Indices of each domain in first-appearance order (one "all" group when domains is None)."""
    if domains is None:
        return {"all": np.arange(n)}
    groups: dict[str, list[int]] = {}
    for i, d in enumerate(domains):
        groups.setdefault(str(d), []).append(i)
    return {d: np.asarray(idx) for d, idx in groups.items()}


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average of ``window`` points (fewer at the start), same length as ``values``."""
    if window < 1:
        raise LbdpoError(f"window={window} must be >= 1")
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return x
    csum = np.cumsum(np.insert(x, 0, 0.0))
    idx = np.arange(1, x.size + 1)
    start = np.maximum(idx - window, 0)
    return (csum[idx] - csum[start]) / (idx - start)


def _series(lines: Iterable[Mapping], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the lines that logged a finite ``key`` (the line index when it has no step)."""
    steps, values = [], []
    for i, line in enumerate(lines):
        value = line.get(key)
        if _is_number(value):
            step = line.get("step")
            steps.append(step if _is_number(step) else i)
            values.append(float(value))
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


# ---------------------------------------------------------------- β of a batch / an eval set

def plot_beta_hist_by_domain(beta: Sequence[float], domains: Sequence[str] | None, path) -> Path | None:
    """Overlaid histograms of β, one per domain, on shared bins (one "all" group when ``domains`` is None).

    Returns the PNG path, or None (nothing written) when there is no finite β.
    Raises ValueError when ``domains`` and ``beta`` differ in length.
    """
    b = np.asarray(beta, dtype=float).reshape(-1)
    _check_lengths("domains", domains, b.size)
    finite = np.isfinite(b)
    if not finite.any():
        return None
    bins = np.histogram_bin_edges(b[finite], bins=min(40, max(5, int(np.sqrt(finite.sum())) + 1)))
    fig, ax = subplots(figsize=(7, 4.5))
    for domain, idx in _group_by_domain(domains, b.size).items():
        values = b[idx][finite[idx]]
        if values.size:
            ax.hist(values, bins=bins, alpha=0.5, histtype="stepfilled", edgecolor="black", linewidth=0.5,
                    label=f"{domain} (n={values.size}, mean={values.mean():.3g})")
    ax.set_xlabel(BETA_LABEL)
    ax.set_ylabel("count")
    ax.set_title("β(x) by domain")
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_beta_vs_log_ppl(beta: Sequence[float], log_ppl: Sequence[float], domains: Sequence[str] | None,
                         path) -> Path | None:
    """Scatter of β(x) against log PPL(x), coloured by domain (one "all" group when ``domains`` is None).

    Returns the PNG path, or None (nothing written) when no pair has both values finite.
    Raises ValueError when the sequences differ in length.
    """
    b = np.asarray(beta, dtype=float).reshape(-1)
    p = np.asarray(log_ppl, dtype=float).reshape(-1)
    _check_lengths("log_ppl", p, b.size)
    _check_lengths("domains", domains, b.size)
    finite = np.isfinite(b) & np.isfinite(p)
    if not finite.any():
        return None
    fig, ax = subplots(figsize=(7, 4.5))
    for domain, idx in _group_by_domain(domains, b.size).items():
        keep = idx[finite[idx]]
        if keep.size:
            ax.scatter(p[keep], b[keep], s=12, alpha=0.6, label=f"{domain} (n={keep.size})")
    ax.set_xlabel(LOG_PPL_LABEL)
    ax.set_ylabel(BETA_LABEL)
    ax.set_title("β(x) vs log PPL(x)")
    ax.legend(fontsize="small")
    return _save(fig, path)


# ---------------------------------------------------------------- a run's metrics.jsonl

def read_metrics_jsonl(path) -> tuple[list[dict], list[dict]]:
    """(train lines, eval lines) of a run's ``metrics.jsonl``, in file order.

    A line is an eval line when it has a key starting with ``eval/``. Lines that do not parse as a
    JSON object (a last line cut by a kill, blank lines) are skipped. Raises FileNotFoundError when
    the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no metrics file at {path}")
    train, evals = [], []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict):
            continue
        (evals if any(k.startswith("eval/") for k in record) else train).append(record)
    return train, evals


def _not_logged(ax, title: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray", fontsize=14)
    ax.set_xticks([])
    ax.set_yticks([])


def _panel(ax, title: str, train: list[dict], evals: list[dict], train_key: str, eval_key: str | None = None,
           smooth: int = 1, std_key: str | None = None) -> None:
    """One panel: a train curve (raw faint + moving average when ``smooth`` > 1), optional ±std band, eval points."""
    steps, values = _series(train, train_key)
    eval_steps, eval_values = _series(evals, eval_key) if eval_key else (np.array([]), np.array([]))
    if not values.size and not eval_values.size:
        _not_logged(ax, title)
        return
    if values.size:
        window = min(smooth, values.size)
        if window > 1:
            ax.plot(steps, values, color="C0", alpha=0.25, linewidth=0.8)
            ax.plot(steps, moving_average(values, window), color="C0", label=f"train (avg {window})")
        else:
            ax.plot(steps, values, color="C0", label="train")
        if std_key:
            std_steps, std = _series(train, std_key)
            if std.size:
                mean_at = dict(zip(steps, values))
                both = [(s, mean_at[s], d) for s, d in zip(std_steps, std) if s in mean_at]
                if both:
                    s, m, d = (np.asarray(c) for c in zip(*both))
                    ax.fill_between(s, m - d, m + d, color="C0", alpha=0.2, label="± std")
    if eval_values.size:
        ax.plot(eval_steps, eval_values, "o-", color="C1", markersize=4, label="eval")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.legend(fontsize="small")


def plot_training_curves(metrics_path, path, smooth: int = 20) -> Path | None:
    """2×3 grid of a run's curves: loss, reward accuracy, reward margin, β mean ± std, w, log PPL.

    Train keys ``loss``, ``rewards/accuracies`` (moving average of ``smooth`` points over the raw curve),
    ``rewards/margins``, ``beta/mean`` with a ``beta/std`` band, ``beta_head/w``, ``log_ppl/mean``; eval
    points ``eval/loss``, ``eval/rewards/accuracies``, ``eval/rewards/margins``, ``eval/beta/mean``,
    ``eval/log_ppl/mean`` where logged. A panel with none of its keys says "not logged".

    Returns the PNG path, or None (nothing written) when the file holds no parsable line.
    """
    train, evals = read_metrics_jsonl(metrics_path)
    if not train and not evals:
        return None
    fig, axes = subplots(2, 3, figsize=(15, 8))
    _panel(axes[0, 0], "loss", train, evals, "loss", "eval/loss")
    _panel(axes[0, 1], "reward accuracy", train, evals, "rewards/accuracies", "eval/rewards/accuracies",
           smooth=smooth)
    _panel(axes[0, 2], "reward margin", train, evals, "rewards/margins", "eval/rewards/margins")
    _panel(axes[1, 0], "β mean ± std", train, evals, "beta/mean", "eval/beta/mean", std_key="beta/std")
    _panel(axes[1, 1], "beta_head/w", train, evals, "beta_head/w")
    _panel(axes[1, 2], "log PPL mean", train, evals, "log_ppl/mean", "eval/log_ppl/mean")
    fig.suptitle(str(Path(metrics_path).parent.name or metrics_path))
    fig.tight_layout()
    return _save(fig, path)


def plot_overlaid_curves(runs: Mapping[str, Path], key: str, path, smooth: int = 1) -> Path | None:
    """One line per run (label → its ``metrics.jsonl``) of ``key`` against step.

    ``key`` is read from the eval lines when it starts with ``eval/`` (drawn with markers), else from
    the train lines (a trailing moving average of ``smooth`` points when ``smooth`` > 1). Runs whose file
    is missing or lacks the key are left out.

    Returns the PNG path, or None (nothing written) when ``runs`` is empty or no run logged ``key``.
    """
    is_eval = key.startswith("eval/")
    fig, ax = subplots(figsize=(8, 5))
    drawn = 0
    for label, metrics_path in runs.items():
        try:
            train, evals = read_metrics_jsonl(metrics_path)
        except FileNotFoundError:
            continue
        steps, values = _series(evals if is_eval else train, key)
        if not values.size:
            continue
        if smooth > 1 and not is_eval:
            values = moving_average(values, smooth)
        ax.plot(steps, values, "o-" if is_eval else "-", markersize=3, label=label)
        drawn += 1
    if not drawn:
        return None
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(key if smooth <= 1 or is_eval else f"{key} (moving average of {smooth})")
    ax.legend(fontsize="x-small", loc="best")
    return _save(fig, path)


# ---------------------------------------------------------------- sweep: reward vs KL

def plot_frontier(points: list[dict], path) -> Path | None:
    """Reward-vs-KL frontier (DPO paper, Fig. 2): fixed-β points joined by a curve, learnable variants as markers.

    Each point: ``kl``, ``reward``, ``label``, ``kind`` ("fixed" | "learnable" | "rule": β set per domain or per step
    by the config, drawn hollow), optional ``beta`` (fixed
    points are annotated "β=<beta>", else with their label) and optional ``kl_std`` / ``reward_std``
    (error bars). Fixed points are sorted by KL before they are joined.

    Returns the PNG path, or None (nothing written) when no point has finite ``kl`` and ``reward``.
    Raises ValueError on an unknown ``kind``.
    """
    fixed, learnable = [], []
    for p in points:
        kind = p.get("kind")
        if kind not in ("fixed", "learnable", "rule"):
            raise LbdpoError(f"point {p.get('label')!r} has kind={kind!r}; expected 'fixed', 'learnable' or 'rule'")
        if _is_number(p.get("kl")) and _is_number(p.get("reward")):
            (fixed if kind == "fixed" else learnable).append(p)
    if not fixed and not learnable:
        return None

    def err(p, key):
        return p[key] if _is_number(p.get(key)) else 0.0

    fig, ax = subplots(figsize=(8, 5.5))
    if fixed:
        fixed = sorted(fixed, key=lambda p: p["kl"])
        ax.errorbar([p["kl"] for p in fixed], [p["reward"] for p in fixed],
                    xerr=[err(p, "kl_std") for p in fixed], yerr=[err(p, "reward_std") for p in fixed],
                    fmt="o-", color="black", capsize=3, label="fixed β")
        for p in fixed:
            text = f"β={p['beta']:g}" if _is_number(p.get("beta")) else str(p.get("label", ""))
            ax.annotate(text, (p["kl"], p["reward"]), textcoords="offset points", xytext=(5, -12), fontsize=8)
    for i, p in enumerate(learnable):
        ax.errorbar([p["kl"]], [p["reward"]], xerr=[err(p, "kl_std")], yerr=[err(p, "reward_std")],
                    fmt=MARKERS[i % len(MARKERS)], color=f"C{i % 10}", markersize=8, capsize=3,
                    markerfacecolor="none" if p["kind"] == "rule" else f"C{i % 10}",
                    label=str(p.get("label", f"learnable {i}")) + (" (rule)" if p["kind"] == "rule" else ""))
        ax.annotate(str(p.get("label", "")), (p["kl"], p["reward"]), textcoords="offset points", xytext=(5, 5),
                    fontsize=8, color=f"C{i % 10}")
    ax.set_xlabel(KL_LABEL)
    kls = [p["kl"] for p in fixed + learnable if p["kl"] > 0]
    if kls and max(kls) > 10 * min(kls):  # a β sweep spans decades of KL
        ax.set_xscale("log")
    ax.set_ylabel("mean reward")
    ax.set_title("reward vs KL frontier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    return _save(fig, path)
