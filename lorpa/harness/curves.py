"""Score against adapter size: a tolerance search's candidates, and a study's rank curve (one line per method).

As `plots.py`, only matplotlib's object API (no pyplot, no display, Agg PNGs).
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

TOLERANCE_PLOT_FILE = "tolerance_curve.png"


def plot_tolerance(search: dict, out_path) -> Path:
    """The candidates of one `lorpa.tolerance` search: its metric (a score, the agreement with the uncut adapter or
    the mean KL from it) against adapter parameters, the unpruned adapter's value, the band that qualifies, and the
    kept candidate marked."""
    candidates = sorted(search["candidates"], key=lambda c: c["parameters"])
    fig = Figure(figsize=(6.5, 4.0), layout="constrained")
    ax = fig.subplots()
    ax.plot([c["parameters"] for c in candidates], [c["score"] for c in candidates], "o-", color="tab:blue",
            label="candidates (one truncation and one evaluation each)")
    reference, tolerance, metric = search["reference"], search["tolerance"], search.get("metric", "score")
    ax.axhline(reference, color="black", linewidth=1, label=f"unpruned ({search['full_parameters']:,} parameters)")
    band = {"score": (reference - tolerance, reference), "agreement": (tolerance, 100), "kl": (0, tolerance)}[metric]
    ax.axhspan(*band, color="tab:green", alpha=0.15, label=f"qualifies ({metric} {tolerance:g})")
    kept = [c for c in candidates if c["total_rank"] == search["kept"]]
    if kept:
        ax.plot([kept[0]["parameters"]], [kept[0]["score"]], "*", color="tab:red", markersize=14,
                label=f"kept: total rank {search['kept']}")
    ax.set_xscale("log")
    ax.set_xlabel("adapter parameters")
    ax.set_ylabel({"score": "score on the selection split", "agreement": "% of the uncut adapter's top-1 answers",
                   "kl": "mean KL(uncut ‖ candidate)"}[metric])
    ax.legend(fontsize=8, loc="lower right")
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=110, format="png")
    return out_path


def plot_rank_curve(lines: dict[str, dict[str, list[tuple[float, float, float]]]], columns: list[str], out_path,
                    references: dict[str, dict[str, float]] | None = None) -> Path:
    """One panel per column (task): per method a line through its (adapter parameters, mean score, std) points,
    and dashed reference levels (`references[label][column]`, e.g. LoRA at r0)."""
    fig = Figure(figsize=(5.5 * len(columns), 4.2), layout="constrained")
    axes = fig.subplots(1, len(columns), squeeze=False)[0]
    for ax, column in zip(axes, columns):
        for method, by_column in lines.items():
            points = sorted(by_column.get(column, []))
            if points:
                ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                            capsize=3, label=method)
        for label, values in (references or {}).items():
            if column in values:
                ax.axhline(values[column], linestyle="--", linewidth=1, color="gray")
                ax.annotate(label, (0.02, values[column]), xycoords=("axes fraction", "data"), va="bottom", fontsize=8,
                            color="gray")
        ax.set_xscale("log")
        ax.set_xlabel("adapter parameters (LoRA factors, without the task head)")
        ax.set_title(column)
        ax.legend(fontsize=7, loc="lower right")
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=110, format="png")
    return out_path
