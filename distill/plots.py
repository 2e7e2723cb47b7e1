"""Plotting shared by the report, search and bench: matplotlib (optional, `pip install -e ".[plot]"`) on the
Agg backend, figures as PNG bytes, and the panels of per-epoch series (lines, or a heatmap when there are
many)."""
from __future__ import annotations

import io
from typing import Any, Dict, List, Optional, Sequence, Tuple

HEATMAP_OVER = 8  # more series than this in one panel: a heatmap reads better than a tangle of lines


def pyplot() -> Optional[Any]:
    """matplotlib's pyplot on the Agg backend (files, no display), or None when matplotlib (`.[plot]`) is not
    installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def figure_png(fig: Any) -> bytes:
    """A figure as PNG bytes (for embedding), then closed."""
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def epoch_axis(ax: Any) -> None:
    import matplotlib.ticker
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    low, high = ax.get_xlim()
    if high - low < 1:  # (one epoch: matplotlib's margins would leave no whole number to tick)
        middle = round((low + high) / 2)
        ax.set_xlim(middle - 0.5, middle + 0.5)
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)


def series_panel(ax: Any, records: List[Dict[str, Any]], keys: List[str], title: str, prefix: str,
                 vmin: Optional[float] = None, vmax: Optional[float] = None, cmap: str = "viridis") -> None:
    """One line per key over epochs, or a key × epoch heatmap when there are many keys."""
    if len(keys) > HEATMAP_OVER:
        labels = [short(k[len(prefix):], 40) for k in keys]
        heatmap(ax, records, keys, labels, cmap, vmin, vmax)
    else:
        for k in keys:
            xs, ys = logged(records, k)
            ax.plot(xs, ys, marker=marker(xs), ms=3, label=short(k[len(prefix):], 40))
        ax.legend(fontsize=8, loc="best")
        if vmin is not None:
            ax.set_ylim(min(vmin, ax.get_ylim()[0]), max(vmax, ax.get_ylim()[1]) if vmax is not None else None)
        epoch_axis(ax)
    ax.set_title(title, fontsize=10)


def heatmap(ax: Any, records: List[Dict[str, Any]], keys: List[str], labels: List[str], cmap: str,
            vmin: Optional[float], vmax: Optional[float]) -> None:
    """A key x epoch heatmap of the epochs that measured the keys, each as wide as the gap to its neighbours:
    the monitor measures every few epochs of short runs, and a column per epoch left the others blank."""
    import numpy as np
    records = [r for r in records if any(k in r for k in keys)] or records
    epochs = np.array([r["epoch"] for r in records], dtype=float)
    mids = (epochs[1:] + epochs[:-1]) / 2
    first, last = (epochs[0] - (mids[0] - epochs[0]), epochs[-1] + (epochs[-1] - mids[-1])) if len(mids) else \
        (epochs[0] - 0.5, epochs[0] + 0.5)
    grid = np.array([[r.get(k, float("nan")) for r in records] for k in keys], dtype=float)
    im = ax.pcolormesh(np.concatenate([[first], mids, [last]]), np.arange(len(keys) + 1) - 0.5,
                       np.ma.masked_invalid(grid), cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xlim(max(first, epochs[0] - 0.5), last)  # (no epoch 0 before the first measured one)
    ax.set_ylim(len(keys) - 0.5, -0.5)
    ax.set_yticks(range(len(keys)))
    ax.set_yticklabels(labels, fontsize=max(5, 9 - len(keys) // 12))
    ax.figure.colorbar(im, ax=ax, fraction=0.04)
    epoch_axis(ax)
    ax.grid(False)


def logged(records: List[Dict[str, Any]], key: str) -> Tuple[List[Any], List[Any]]:
    """(epochs, values) of the records that logged `key`: the monitor measures every few epochs of tiny ones,
    and a line through NaNs would show nothing."""
    pts = [(r["epoch"], r[key]) for r in records if key in r]
    return [e for e, _ in pts], [v for _, v in pts]


def marker(points: Sequence[Any]) -> Optional[str]:
    """Dots on a line with few points (so a single point shows), none on a long one (they would hide it)."""
    return "o" if len(points) <= 30 else None


def log_scale(ax: Any) -> str:
    """Log y for losses spanning decades (a KD term scaled by T^2 starts far above where every loss ends);
    returns the note for the title."""
    ys = [y for line in ax.get_lines() for y in line.get_ydata() if y == y]
    if ys and min(ys) > 0 and max(ys) / min(ys) > 10:
        ax.set_yscale("log")
        return "; log scale"
    return ""


def short(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"
