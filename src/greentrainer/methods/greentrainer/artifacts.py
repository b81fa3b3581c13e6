"""What a GreenTrainer run leaves in its folder: ``selections.json`` (every selection with its importance, budget
and predicted FLOPs) and ``selection_heatmap.png`` (which tensors trained when)."""
from __future__ import annotations

import json

import numpy as np


def write_artifacts(out_dir, names, selections) -> None:
    from ...files import write_text_atomic
    write_text_atomic(out_dir / "selections.json", json.dumps({"tensors": names, "selections": selections}, indent=1))
    if selections:
        plot_selection_heatmap(names, selections, out_dir / "selection_heatmap.png")


def plot_selection_heatmap(names, selections, path) -> None:
    """Which tensors trained after which selection (rows: tensors, output at the top)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    grid = np.zeros((len(names), len(selections)))
    index = {n: i for i, n in enumerate(names)}
    for j, s in enumerate(selections):
        for n in s["selected"]:
            grid[index[n], j] = 1
    fig, ax = plt.subplots(figsize=(max(6.5, 0.5 * len(selections) + 4), 8))
    ax.imshow(grid, aspect="auto", cmap="Greens", interpolation="nearest", vmin=0, vmax=1)
    ax.set_xlabel("selection (epoch / step)")
    ax.set_xticks(range(len(selections)))
    ax.set_xticklabels([f"e{s['epoch']}\ns{s['step']}" for s in selections], fontsize=7)
    step = max(1, len(names) // 40)
    ax.set_yticks(range(0, len(names), step))
    ax.set_yticklabels([names[i] for i in range(0, len(names), step)], fontsize=5)
    ax.set_title("GreenTrainer: trained tensors (green) per selection\n(rows in backward order, output at the top)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
