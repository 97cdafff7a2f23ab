"""One picture per pruning step: where the surviving rank went, and how the scores were cut.

Only matplotlib's object API is used (no pyplot), so plotting never opens a window, needs no
display and leaves the process-wide backend alone; `savefig` renders PNGs with Agg.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FixedFormatter, FixedLocator, NullFormatter

# `layer.3.` (BERT/RoBERTa), `layers.3.` (BART, LLaMA), `block.3.` (T5), `h.3.` (GPT-2).
_LAYER = re.compile(r"(?:^|\.)(?:layers?|blocks?|h)\.(\d+)\.")
_CROSS = re.compile(r"encoder_attn|crossattention|EncDecAttention", re.IGNORECASE)
_BLOCK_ORDER = ("enc", "dec", "cross", "")


@dataclass
class RankGrid:
    """Heat-map data for the module in row i, column j (NaN: none): its surviving rank, its rank before
    pruning, the share of its score mass (sum of its components' scores) that the kept ones hold, and
    the relative error of its update ‖ΔW_before − ΔW_after‖_F / ‖ΔW_before‖_F (NaN in older reports)."""

    rows: list[str]
    columns: list[str]
    new_rank: np.ndarray
    old_rank: np.ndarray
    kept_mass: np.ndarray
    relative_error: np.ndarray


def kept_mass(module: dict) -> float:
    """Share of a module's score mass in its kept components (1 when every score is 0)."""
    kept, pruned = _split_scores(module)
    total = sum(kept) + sum(pruned)
    return sum(kept) / total if total > 0 else 1.0


def _locate(name: str) -> tuple[str, int, str] | None:
    """(block, layer index, name after the index); the block tells BART's three attention kinds apart."""
    match = _LAYER.search(name)
    if match is None:
        return None
    prefix, suffix = name[: match.start()], name[match.end() :]
    block = "dec" if "decoder" in prefix else "enc" if "encoder" in prefix else ""
    if block == "dec" and _CROSS.search(suffix):
        block = "cross"
    return block, int(match.group(1)), suffix


def _short_names(suffixes: list[str]) -> dict[str, str]:
    """The fewest trailing name parts that still tell the suffixes apart (`attention.self.query` -> `query`,
    but `attention.output.dense` and `output.dense` both stay whole)."""
    parts = {s: s.split(".") for s in suffixes}

    def tail(suffix: str, k: int) -> str:
        return ".".join(parts[suffix][-k:])

    short = {}
    for suffix in suffixes:
        k = 1
        while k < len(parts[suffix]) and any(tail(o, k) == tail(suffix, k) for o in suffixes if o != suffix):
            k += 1
        short[suffix] = tail(suffix, k)
    return short


def _fallback_grid(modules: dict) -> RankGrid:
    """One row per module, for names with no recognisable layer index."""
    names = list(modules)
    new = np.array([[modules[n]["new_rank"]] for n in names], dtype=float)
    old = np.array([[modules[n]["old_rank"]] for n in names], dtype=float)
    mass = np.array([[kept_mass(modules[n])] for n in names], dtype=float)
    error = np.array([[modules[n].get("relative_error", np.nan)] for n in names], dtype=float)
    return RankGrid(rows=names, columns=["module"], new_rank=new, old_rank=old, kept_mass=mass, relative_error=error)


def rank_grid(prune_report: dict) -> RankGrid:
    """Rows: layer index; columns: module kind, prefixed by enc/dec/cross when the model has several blocks.

    Names that cannot all be placed (no layer index, or two modules landing in one cell) fall back to
    one row per module rather than hiding a module.
    """
    modules = prune_report["modules"]
    if not modules:
        raise ValueError("the prune report has no modules")
    located = {name: _locate(name) for name in modules}
    if any(place is None for place in located.values()):
        return _fallback_grid(modules)
    blocks = sorted({b for b, _, _ in located.values()}, key=_BLOCK_ORDER.index)
    columns: dict[tuple[str, str], str] = {}
    for block in blocks:
        suffixes = list(dict.fromkeys(s for b, _, s in located.values() if b == block))
        for suffix, short in _short_names(suffixes).items():
            columns[block, suffix] = f"{block} {short}" if len(blocks) > 1 else short
    layers = sorted({layer for _, layer, _ in located.values()})
    keys = list(columns)
    new = np.full((len(layers), len(keys)), np.nan)
    old, mass, error = np.full_like(new, np.nan), np.full_like(new, np.nan), np.full_like(new, np.nan)
    for name, (block, layer, suffix) in located.items():
        i, j = layers.index(layer), keys.index((block, suffix))
        if not np.isnan(new[i, j]):
            return _fallback_grid(modules)
        new[i, j], old[i, j] = modules[name]["new_rank"], modules[name]["old_rank"]
        mass[i, j] = kept_mass(modules[name])
        error[i, j] = modules[name].get("relative_error", np.nan)
    return RankGrid(rows=[str(layer) for layer in layers], columns=list(columns.values()), new_rank=new,
                    old_rank=old, kept_mass=mass, relative_error=error)


def _split_scores(module: dict) -> tuple[list[float], list[float]]:
    """(kept, pruned) scores of one module."""
    keep = set(module["kept"])
    scores = list(enumerate(module["scores"]))
    return [s for i, s in scores if i in keep], [s for i, s in scores if i not in keep]


def module_thresholds(prune_report: dict) -> dict[str, float]:
    """Per module, the highest score that was pruned (modules that lost nothing are left out)."""
    pruned = {name: _split_scores(module)[1] for name, module in prune_report["modules"].items()}
    return {name: max(scores) for name, scores in pruned.items() if scores}


def _old_rank_text(grid: RankGrid) -> str:
    low, high = np.nanmin(grid.old_rank), np.nanmax(grid.old_rank)
    return f"{high:g}" if low == high else f"{low:g}–{high:g}"


def heatmap_panel(grid: RankGrid) -> tuple[np.ndarray, str, str, str]:
    """(values, cell format, title, colour-bar label) of the heat map.

    When every module keeps the same rank (module scope), a map of ranks would be one colour; it
    shows the share of each module's score mass that the kept components hold instead.
    """
    ranks = grid.new_rank[~np.isnan(grid.new_rank)]
    if ranks.min() == ranks.max():
        return (100 * grid.kept_mass, "{:.0f}", f"(a) score mass kept, % (rank {ranks[0]:g} each)",
                f"% of the module's score mass kept (rank before: {_old_rank_text(grid)})")
    return (grid.new_rank, "{:g}", "(a) surviving rank per module",
            f"rank after pruning (before: {_old_rank_text(grid)})")


def error_panel(grid: RankGrid) -> tuple[np.ndarray, str, str, str]:
    """What the prune cost each module's update: its relative Frobenius error, in %."""
    return (100 * grid.relative_error, "{:.0f}", "(c) update lost per module, %",
            "relative error ‖ΔW − ΔW_pruned‖ / ‖ΔW‖, %")


def _draw_heatmap(ax, fig: Figure, grid: RankGrid, panel: tuple[np.ndarray, str, str, str]) -> None:
    """Colours span 0..largest value shown, so differences between modules stay visible."""
    values, cell, title, label = panel
    vmax = max(1.0, float(np.nanmax(values)))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#eeeeee")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0, vmax=vmax, aspect="auto")
    for (i, j), value in np.ndenumerate(values):
        if not np.isnan(value):
            color = "white" if value < 0.6 * vmax else "black"
            ax.text(j, i, cell.format(value), ha="center", va="center", color=color, fontsize=8)
    crowded = len(grid.columns) > 3
    ax.set_xticks(range(len(grid.columns)), grid.columns,
                  rotation=35 if crowded else 0, ha="right" if crowded else "center")
    ax.set_yticks(range(len(grid.rows)), grid.rows)
    ax.set_ylabel("layer" if grid.columns != ["module"] else "module")
    ax.set_title(title)
    ax.tick_params(length=0)
    fig.colorbar(image, ax=ax, label=label, shrink=0.8)


def _log_bins(values: np.ndarray) -> np.ndarray:
    low, high = values.min(), values.max()
    if low == high:
        low, high = low / 2, high * 2
    return np.geomspace(low, high, 41)


def _label_log_axis(axis, low: float, high: float, count: int = 6) -> None:
    """Evenly spaced labelled ticks: matplotlib labels only powers of ten, often two or fewer on a score axis."""
    ticks = np.geomspace(low, high, count)
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FixedFormatter([f"{t:.2g}" for t in ticks]))
    axis.set_minor_formatter(NullFormatter())


def _draw_thresholds(ax, prune_report: dict) -> None:
    """Global scope has one cut; per-module scope has one per module, so each gets a faint line and the
    legend gives their range instead of pretending there is a single threshold."""
    thresholds = sorted(module_thresholds(prune_report).values())
    visible = [t for t in thresholds if t > 0]
    if not thresholds:
        ax.plot([], [], " ", label="nothing pruned")
    elif prune_report["scope"] == "global" and thresholds[-1] <= 0:
        ax.plot([], [], " ", label="threshold 0: only zero scores pruned")
    elif prune_report["scope"] == "global":
        ax.axvline(thresholds[-1], color="black", linestyle="--",
                   label=f"threshold {thresholds[-1]:.3g}\n(highest pruned score)")
    else:
        for value in visible:
            ax.axvline(value, color="black", alpha=0.25, linewidth=0.8)
        ax.plot([], [], color="black", alpha=0.5, linewidth=0.8,
                label=f"per-module thresholds\n({len(thresholds)} modules, {thresholds[0]:.3g}–{thresholds[-1]:.3g})")


def _draw_scores(ax, prune_report: dict) -> None:
    split = [_split_scores(module) for module in prune_report["modules"].values()]
    kept = np.array([s for k, _ in split for s in k], dtype=float)
    pruned = np.array([s for _, p in split for s in p], dtype=float)
    everything = np.concatenate([kept, pruned])
    positive = everything[everything > 0]
    zeros = everything.size - positive.size
    ax.set_title("(b) component scores")
    ax.set_ylabel("rank components")
    if not positive.size:
        ax.text(0.5, 0.5, "every score is 0", ha="center", va="center", transform=ax.transAxes)
        return
    ax.set_title("(b) component scores, stacked histogram (pruned on top of kept)")
    bins = _log_bins(positive)
    ax.hist([kept[kept > 0], pruned[pruned > 0]], bins=bins, stacked=True,
            color=["tab:green", "tab:red"], label=[f"kept ({kept.size})", f"pruned ({pruned.size})"])
    ax.set_xscale("log")
    _label_log_axis(ax.xaxis, bins[0], bins[-1])
    _draw_thresholds(ax, prune_report)
    note = f"; {zeros} zero scores not shown" if zeros else ""
    ax.set_xlabel(f"{prune_report['score']} score (log scale{note})")
    ax.legend(fontsize=8, loc="best")


def _title(prune_report: dict) -> str:
    modules = prune_report["modules"].values()
    before, after = sum(m["old_rank"] for m in modules), sum(m["new_rank"] for m in modules)
    rewind = "" if prune_report.get("rewind", "none") == "none" else f", rewind={prune_report['rewind']}"
    return (f"Rank pruning: {prune_report['score']} score, {prune_report['scope']} scope{rewind} — "
            f"total rank {before} → {after} over {len(modules)} modules ({100 * after / before:.3g}% kept)")


def prune_figure(prune_report: dict) -> Figure:
    """The heat map of one prune report, its score histogram and (when recorded) each module's
    relative error, side by side.

    The figure grows with the grid (about 0.75 in per column, 0.32 in per row), so the 8-pt cell
    numbers stay readable from RoBERTa-base up to BART-large with every projection adapted.
    """
    grid = rank_grid(prune_report)
    heat_width = max(3.5, 0.75 * len(grid.columns) + 2.5)
    label_room = max(len(r) for r in grid.rows) * 0.07
    height = max(4.5, 0.32 * len(grid.rows) + 2.0)
    with_error = not np.all(np.isnan(grid.relative_error))
    widths = [heat_width + label_room, 6.0] + ([heat_width + label_room] if with_error else [])
    fig = Figure(figsize=(sum(widths), height), layout="constrained")
    axes = fig.subplots(1, len(widths), width_ratios=widths)
    _draw_heatmap(axes[0], fig, grid, heatmap_panel(grid))
    _draw_scores(axes[1], prune_report)
    if with_error:
        _draw_heatmap(axes[2], fig, grid, error_panel(grid))
    fig.suptitle(_title(prune_report))
    return fig


def plot_prune_report(prune_report: dict, out_path) -> Path:
    """Write `prune_figure` of one prune report as a PNG."""
    out_path = Path(out_path)
    prune_figure(prune_report).savefig(out_path, dpi=110, format="png")
    return out_path
