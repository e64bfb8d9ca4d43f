"""Result tables and plots: the deliverables of an evaluation run.

Record format (:class:`ResultRow`, or the equivalent dict): one row per evaluated method
and setting::

    {"task": "snli_ve" | "caption",
     "method": "full depth" | "MuE" | "DeeBERT" | "PABEE" | "static depth 3" | "shallower model",
     "model": "mue (decomposition + layer-wise loss)",   # which trained checkpoint
     "thresholds": {"image": 0.9, "text": 0.95, "decoder": 0.95},   # any settings, free form
     "metric_name": "accuracy" | "CIDEr",   # the headline metric
     "metric": 0.885,                       # its value, on the scale the evaluator reports
     "metrics": {"accuracy": 0.885},        # every metric (BLEU-4, METEOR, CIDEr, SPICE ...)
     "etr": 0.50,                           # expected time reduction, Eq. 14 (0.5 = -50%)
     "compute_reduction": 0.45,             # ExitStats.compute_weighted_reduction()
     "wallclock_s": 12.3,                   # measured generation time
     "wallclock_reduction": 0.30,           # 1 - wallclock_s / full depth's wallclock_s
     "exit_summary": {...}}                 # ExitStats.summary() (histograms etc.)

Reductions are fractions (0.5 = half the time); tables print them like the paper, "-50.0%".
Missing numbers are None and print as "n/a". Accuracy in [0, 1] is printed x100 as in the
paper; other metrics are printed as given. Plots use matplotlib's Agg backend (no display).
"""

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np


@dataclass
class ResultRow:
    """One evaluated method/setting; see the module docstring for the fields."""

    task: str
    method: str
    model: str = ""
    thresholds: Dict[str, Any] = field(default_factory=dict)
    metric_name: str = "accuracy"
    metric: Optional[float] = None
    metrics: Dict[str, float] = field(default_factory=dict)
    etr: Optional[float] = None
    compute_reduction: Optional[float] = None
    wallclock_s: Optional[float] = None
    wallclock_reduction: Optional[float] = None
    exit_summary: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ResultRow":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown result fields: {sorted(unknown)}")
        return cls(**dict(d))

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_exit_stats(cls, task: str, method: str, stats: Any, **kw: Any) -> "ResultRow":
        """A row whose etr / compute_reduction / wallclock_s / exit_summary come from an
        :class:`~mue_fairseq.exits.accounting.ExitStats` (or its ``summary()`` dict)."""
        s = stats.summary() if hasattr(stats, "summary") else dict(stats)
        kw.setdefault("etr", s.get("expected_time_reduction"))
        kw.setdefault("compute_reduction", s.get("compute_weighted_reduction"))
        kw.setdefault("wallclock_s", s.get("wall_clock_seconds"))
        return cls(task=task, method=method, exit_summary=s, **kw)


RowLike = Union[ResultRow, Mapping[str, Any]]


def as_rows(rows: Iterable[RowLike]) -> List[ResultRow]:
    return [r if isinstance(r, ResultRow) else ResultRow.from_dict(r) for r in rows]


def fill_wallclock_reductions(rows: Iterable[RowLike], baseline: str = "full depth"):
    """Set missing ``wallclock_reduction`` from the ``baseline`` method's row of the same task
    (same model preferred). Returns new rows."""
    out = as_rows(rows)
    for r in out:
        if r.wallclock_reduction is not None or r.wallclock_s is None:
            continue
        base = [b for b in out if b.task == r.task and b.method == baseline and b.wallclock_s]
        base = [b for b in base if b.model == r.model] or base
        if base:
            r.wallclock_reduction = 1.0 - r.wallclock_s / base[0].wallclock_s
    return out


# ---------------------------------------------------------------------------- formatting


def fmt_reduction(x: Optional[float]) -> str:
    """0.5 -> "-50.0%", 0 -> "0%", -0.03 (slower) -> "+3.0%", None -> "n/a"."""
    if x is None:
        return "n/a"
    if abs(x) < 5e-4:
        return "0%"
    return f"{-100 * x:+.1f}%"


def fmt_metric(name: str, value: Optional[float]) -> str:
    if value is None:
        return "n/a"
    if name.lower() in ("accuracy", "acc") and 0.0 <= value <= 1.0:
        value *= 100.0
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"


def fmt_thresholds(th: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in th.items())


def _tasks(rows: Sequence[ResultRow]) -> List[str]:
    return list(dict.fromkeys(r.task for r in rows))


def markdown_table(rows: Iterable[RowLike], extra_metrics: Sequence[str] = ()) -> str:
    """Markdown: per task a heading and a table, one line per row, in the given order."""
    rows = as_rows(rows)
    out = []
    for task in _tasks(rows):
        rs = [r for r in rows if r.task == task]
        names = list(dict.fromkeys(r.metric_name for r in rs))
        extras = [m for m in extra_metrics if m not in names and any(m in r.metrics for r in rs)]
        metric_col = " / ".join(names)
        head = ["Method", "Model", "Thresholds", metric_col, *extras,
                "ETR", "Compute-weighted", "Wall-clock"]
        out += [f"### {task}", "", "| " + " | ".join(head) + " |",
                "|" + "|".join([" --- "] * 3 + [" ---: "] * (len(head) - 3)) + "|"]
        for r in rs:
            cells = [r.method, r.model or "-", fmt_thresholds(r.thresholds) or "-",
                     fmt_metric(r.metric_name, r.metric),
                     *(fmt_metric(m, r.metrics.get(m)) for m in extras),
                     fmt_reduction(r.etr), fmt_reduction(r.compute_reduction),
                     fmt_reduction(r.wallclock_reduction)]
            out.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        out.append("")
    out.append("ETR: expected time reduction (Eq. 14); Compute-weighted: reduction of "
               "transformer-layer multiply-accumulates; Wall-clock: measured vs full depth.")
    return "\n".join(out) + "\n"


def write_table(
    rows: Iterable[RowLike],
    path_md: str,
    path_json: Optional[str] = None,
    extra_metrics: Sequence[str] = (),
) -> None:
    """Write the Markdown table (:func:`markdown_table`) and the rows as a JSON list."""
    rows = as_rows(rows)
    _mkdir(path_md)
    with open(path_md, "w") as f:
        f.write(markdown_table(rows, extra_metrics))
    if path_json:
        _mkdir(path_json)
        with open(path_json, "w") as f:
            json.dump([r.to_dict() for r in rows], f, indent=1)


def read_rows(path_json: str) -> List[ResultRow]:
    with open(path_json) as f:
        return as_rows(json.load(f))


def format_terminal_summary(rows: Iterable[RowLike]) -> str:
    """One line per row: task, method (model), metric, ETR, compute, wall clock."""
    lines = []
    for r in as_rows(rows):
        who = f"{r.method} ({r.model})" if r.model else r.method
        th = f" [{fmt_thresholds(r.thresholds)}]" if r.thresholds else ""
        lines.append(
            f"| {r.task}: {who}{th}: {r.metric_name} {fmt_metric(r.metric_name, r.metric)}, "
            f"ETR {fmt_reduction(r.etr)}, compute {fmt_reduction(r.compute_reduction)}, "
            f"wall clock {fmt_reduction(r.wallclock_reduction)}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- plots


def _mkdir(path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path_png: str) -> None:
    _mkdir(path_png)
    fig.tight_layout()
    fig.savefig(path_png, dpi=120)
    _pyplot().close(fig)


def plot_tradeoff(rows: Iterable[RowLike], path_png: str, metric: Optional[str] = None) -> None:
    """Metric against ETR (Fig. 1/4 analogue): one panel per task, one curve per method
    (per (method, model) when a method was run on several models), points sorted by ETR and
    joined. Full depth is a star with a dotted reference line. ``metric``: plot
    ``metrics[metric]`` instead of each row's headline metric."""
    rows = as_rows(rows)
    plt = _pyplot()
    tasks = _tasks(rows)
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(5.2 * max(1, len(tasks)), 4.2))
    axes = np.atleast_1d(axes)
    for ax, task in zip(axes, tasks):
        rs = [r for r in rows if r.task == task]
        models = {}
        for r in rs:
            models.setdefault(r.method, set()).add(r.model)
        curves: Dict[str, List] = {}
        ylabel = metric or rs[0].metric_name
        for r in rs:
            y = r.metrics.get(metric) if metric else r.metric
            if y is None or r.etr is None:
                continue
            if ylabel.lower() in ("accuracy", "acc") and 0 <= y <= 1:
                y *= 100
            key = r.method if len(models[r.method]) == 1 else f"{r.method} ({r.model})"
            curves.setdefault(key, []).append((100 * r.etr, y))
        for key, pts in curves.items():
            pts.sort()
            x, y = zip(*pts)
            if key.startswith("full depth"):
                ax.axhline(y[0], color="grey", ls=":", lw=1)
                ax.plot(x, y, "*", ms=13, color="black", label=key, zorder=5)
            else:
                ax.plot(x, y, "-o" if len(pts) > 1 else "s", ms=5, label=key)
        ax.set_xlabel("expected time reduction (%)")
        ax.set_ylabel(ylabel)
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path_png)


def plot_similarity_curves(
    similarities: Mapping[str, Any], path_png: str, title: str = "Layer-wise cosine similarity"
) -> None:
    """Per-layer mean cosine similarity of each layer's input and output, with a ±1 std band
    (Fig. 3 analogue). ``similarities``: name (e.g. "image encoder") -> (n_samples, n_layers)
    array; NaN entries (layers a sample did not run) are ignored."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, arr in similarities.items():
        a = np.asarray(arr, dtype=float)
        if a.ndim == 1:
            a = a[None, :]
        with np.errstate(invalid="ignore"), _quiet():
            mean, std = np.nanmean(a, axis=0), np.nanstd(a, axis=0)
        layers = np.arange(1, a.shape[1] + 1)
        (line,) = ax.plot(layers, mean, "-o", ms=4, label=f"{name} (n={a.shape[0]})")
        ax.fill_between(layers, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("layer")
    ax.set_ylabel("cosine similarity (layer input vs output)")
    ax.set_title(title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path_png)


def _quiet():
    import warnings

    w = warnings.catch_warnings()
    warnings.simplefilter("ignore", RuntimeWarning)
    return w


_HIST_KEYS = (
    ("image encoder", "image_exit_histogram", "mean_image_exit_layer", "samples"),
    ("text encoder", "text_exit_histogram", "mean_text_exit_layer", "samples"),
    ("decoder", "decoder_exit_histogram", "mean_decoder_exit_layer", "tokens"),
)


def plot_exit_histograms(summary: Mapping[str, Any], path_png: str, title: str = "") -> None:
    """Exit-layer histograms per modality (image, text encoder streams; decoder per generated
    token) from :meth:`ExitStats.summary` (histogram lists indexed by layer - 1), as the
    fraction of samples / tokens exiting at each layer."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (name, key, mean_key, unit) in zip(axes, _HIST_KEYS):
        counts = np.asarray(summary.get(key) or [], dtype=float)
        total = counts.sum()
        layers = np.arange(1, counts.size + 1)
        if total > 0:
            ax.bar(layers, counts / total, color="tab:blue", alpha=0.8)
            mean = summary.get(mean_key)
            sub = f"mean {mean:.2f}" if mean is not None else ""
            ax.set_title(f"{name}: {int(total)} {unit}, {sub}", fontsize=10)
        else:
            ax.text(0.5, 0.5, f"no {unit}", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(name, fontsize=10)
        ax.set_xticks(layers if counts.size else [])
        ax.set_xlabel("exit layer")
        ax.set_ylabel(f"fraction of {unit}")
        ax.set_ylim(0, min(1.0, 1.15 * (counts / total).max()) if total > 0 else 1.0)
        ax.grid(alpha=0.3, axis="y")
    if title:
        fig.suptitle(title)
    _save(fig, path_png)
