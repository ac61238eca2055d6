"""A picture of a run's schedule (``db.stats().plot(path)``): one row per signature,
batches left to right in the order they ran, each a cell coloured by its number of nodes
(log scale), and a dashed line where the examples were suspended at a read of a value.
matplotlib is imported here only, when a picture is asked for."""
from __future__ import annotations


def schedule_figure(labels: list[str], timeline: list, reads: list, title: str):
    """``labels[k]``: row k's name; ``timeline``: (row, nodes) per batch, in order;
    ``reads``: batches run before each suspension."""
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)      # files, not windows: works headless
        import matplotlib.pyplot as plt
        from matplotlib.colors import LogNorm
    except ImportError as err:
        raise ImportError("db.stats().plot needs matplotlib: pip install matplotlib "
                          "(or pip install 'dynbatch[plot]')") from err
    if not timeline:
        raise ValueError("the run executed no batch: there is no schedule to draw")
    n_rows = len(labels)
    width = max(6.5, min(16.0, 4.0 + 0.06 * len(timeline)))
    height = max(2.5, min(14.0, 1.5 + 0.28 * n_rows))
    fig, ax = plt.subplots(figsize=(width, height))
    nodes = [n for _, n in timeline]
    norm = LogNorm(vmin=1, vmax=max(2, max(nodes)))
    cmap = plt.get_cmap("viridis")
    for x, (row, n) in enumerate(timeline):
        ax.add_patch(plt.Rectangle((x, n_rows - 1 - row - 0.4), 0.9, 0.8,
                                   color=cmap(norm(n)), linewidth=0))
    for k, at in enumerate(reads):
        ax.axvline(at - 0.05, color="crimson", linestyle="--", linewidth=1,
                   label="read (examples suspended)" if k == 0 else None)
    ax.set_xlim(-0.5, len(timeline) + 0.5)
    ax.set_ylim(-0.7, n_rows - 0.3)
    ax.set_yticks(range(n_rows))
    ax.set_yticklabels(labels[::-1], fontsize=8)
    ax.set_xlabel("batch, in execution order")
    ax.set_title(title, fontsize=10)
    bar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.01)
    bar.set_label("nodes in the batch")
    if reads:
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig
