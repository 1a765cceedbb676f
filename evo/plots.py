"""The report's pictures, drawn with matplotlib's Agg backend (no display, no server).

Each function takes plain data from evo.run_facts and returns PNG bytes, so the HTML can embed
them and the same bytes can be written beside it.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # before pyplot: a headless machine has no display to open

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

FATE_STYLE = {  # how each fate of an evaluation is drawn in the progress plot
    "kept": dict(marker="o", color="#1f77b4", label="kept by selection (an island member)"),
    "dropped": dict(marker="o", color="#b0b0b0", label="evaluated, not kept"),
    "failed": dict(marker="x", color="#d62728", label="failed (drawn above the worst score)"),
}
ISLAND_COLORS = plt.get_cmap("tab10").colors


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def progress(evaluations: list[dict], champions: list[dict], end_minutes: float) -> bytes:
    """val_bpb of every evaluation over time, with the champion's re-run mean (± std) and held-out."""
    figure, ax = plt.subplots(figsize=(10, 4.5))
    scored = [e["val_bpb"] for e in evaluations if e["val_bpb"] is not None]
    # Failures have no score: they sit in a band just above the worst one.
    ceiling = max(scored) + 0.05 * ((max(scored) - min(scored)) or 0.1) if scored else 1.0
    for fate, style in FATE_STYLE.items():
        points = [e for e in evaluations if e["fate"] == fate]
        if not points:
            continue
        ys = [e["val_bpb"] if e["val_bpb"] is not None else ceiling for e in points]
        ax.scatter([e["minutes"] for e in points], ys, s=28, marker=style["marker"], color=style["color"],
                   label=f"{style['label']}: {len(points)}", zorder=3)
    end = max([end_minutes] + [e["minutes"] for e in evaluations])
    for k, step in enumerate(champions):
        until = champions[k + 1]["minutes"] if k + 1 < len(champions) else end
        xs = [step["minutes"], until]
        ax.plot(xs, [step["val_mean"]] * 2, color="#2ca02c", lw=2, label="champion: re-run mean ± std (val)" if k == 0 else None)
        ax.fill_between(xs, step["val_mean"] - step["val_std"], step["val_mean"] + step["val_std"], color="#2ca02c", alpha=0.2)
        ax.plot(xs, [step["held_mean"]] * 2, color="#9467bd", lw=2, ls="--", label="champion: held-out mean" if k == 0 else None)
        ax.annotate(step["id"], (step["minutes"], step["val_mean"]), textcoords="offset points", xytext=(2, 4), fontsize=8)
    ax.set_xlabel("wall-clock minutes since the run was created")
    ax.set_ylabel("val_bpb (lower is better)")
    ax.set_title("val_bpb of every evaluation")
    ax.grid(alpha=0.3)
    if evaluations or champions:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never hides a point
    else:
        ax.text(0.5, 0.5, "no evaluation has finished yet", ha="center", va="center", transform=ax.transAxes)
    return _png(figure)


def family_tree(nodes: list[dict], islands: int) -> bytes:
    """Everyone by birth order (x) in island lanes (y); within a lane the better val_bpb sits higher.
    Edges run parent -> child (dashed: a crossover's second parent); failed children are red crosses."""
    by_id = {n["id"]: n for n in nodes}
    scores = [n["val_bpb"] for n in nodes if n["val_bpb"] is not None]
    low, high = (min(scores), max(scores)) if scores else (0.0, 1.0)
    span = (high - low) or 1.0

    def y_of(node):
        if node["val_bpb"] is None:
            return node["island"] + 0.08  # failed or pending: the bottom of its lane
        return node["island"] + 0.2 + 0.7 * (high - node["val_bpb"]) / span

    figure, ax = plt.subplots(figsize=(10, 1.2 + 1.4 * max(islands, 1)))
    # Drawn in bulk (one collection per kind), so a population of thousands still takes seconds.
    edges = {0: [], 1: []}  # first parent, second parent
    for node in nodes:
        for k, parent_id in enumerate(node["parents"][:2]):
            parent = by_id.get(parent_id)
            if parent is not None:
                edges[k].append([(parent["birth"], y_of(parent)), (node["birth"], y_of(node))])
    for k, style in ((0, "-"), (1, "--")):
        ax.add_collection(LineCollection(edges[k], colors="#888888", linewidths=0.8, linestyles=style, zorder=1))

    def scatter(group, **style):
        if group:
            ax.scatter([n["birth"] for n in group], [y_of(n) for n in group], zorder=3, **style)

    scatter([n for n in nodes if n["failed"]], marker="x", color="#d62728", s=40)
    for island in range(max(islands, 1)):
        color = ISLAND_COLORS[island % len(ISLAND_COLORS)]
        mine = [n for n in nodes if n["island"] == island and not n["failed"]]
        scatter([n for n in mine if not n["pending"]], marker="o", color=color, s=30)
        scatter([n for n in mine if n["pending"]], marker="o", facecolors="none", edgecolors=color, s=30)
    champions = [n for n in nodes if n["champion"]]
    scatter(champions, marker="*", color="#ffbf00", edgecolors="black", s=180)
    for node in champions:
        ax.annotate(node["id"], (node["birth"], y_of(node)), textcoords="offset points", xytext=(4, 5), fontsize=8)
    if nodes:
        ax.set_xlim(0, max(n["birth"] for n in nodes) + 1)
    for island in range(1, max(islands, 1)):
        ax.axhline(island, color="#dddddd", lw=1)
    ax.set_yticks([i + 0.5 for i in range(max(islands, 1))], [f"island {i}" for i in range(max(islands, 1))])
    ax.set_ylim(0, max(islands, 1))
    ax.set_xlabel("birth order")
    ax.set_title("family tree (higher in a lane = lower val_bpb)")
    legend = [Line2D([], [], marker="o", ls="", color=ISLAND_COLORS[i % len(ISLAND_COLORS)], label=f"island {i}")
              for i in range(max(islands, 1))]
    legend += [Line2D([], [], marker="x", ls="", color="#d62728", label="failed"),
               Line2D([], [], marker="*", ls="", color="#ffbf00", markeredgecolor="black", markersize=12, label="champion"),
               Line2D([], [], color="#888888", ls="--", label="second parent (crossover)")]
    ax.legend(handles=legend, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(figure)
