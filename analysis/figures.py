"""The paper's figure kinds: histograms of the improvement over KD (Figs. 1, 2, 4) and KD-vs-method scatters
(Figs. 5-7). Green marks where the compared method beats KD; every metric is lower-is-better."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

LABELS = {"val_logppl": "C4 (val) log-ppl", "wikitext_logppl": "WikiText log-ppl", "hellaswag_err": "HellaSwag err",
          "piqa_err": "PIQA err", "arc_easy_err": "ARC-Easy err", "winogrande_err": "WinoGrande err",
          "lambada_err": "LAMBADA err"}
COLORS = {"nll": "tab:gray", "hldc": "tab:blue", "hldf": "tab:orange"}
GREEN = "#2ca02c"


def _panels(n: int, title: str) -> tuple[plt.Figure, list[plt.Axes]]:
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, list(axes.flat[:n])


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _edges(d: pd.Series, bins: int) -> np.ndarray:
    """Equal-width bins with one centred on 0, so that ties (exactly 0) share a bin with no sign."""
    lo, hi = float(d.min()), float(d.max())
    width = (hi - lo) / bins or max(abs(hi), 1e-6) / 4
    return (np.arange(math.floor(lo / width - 0.5), math.ceil(hi / width - 0.5) + 1) + 0.5) * width


def histograms(points: pd.DataFrame, by: str, title: str, path: Path, methods=("hldc", "hldf")) -> Path:
    """One panel per value of `by`: overlaid histograms of each method's improvement over KD."""
    points = points[points["method"].isin(methods)].dropna(subset=["improvement"])
    keys = list(dict.fromkeys(points[by]))
    fig, axes = _panels(len(keys), title)
    for ax, key in zip(axes, keys):
        panel = points[points[by] == key]
        edges = _edges(panel["improvement"], bins=min(20, max(5, len(panel) // 3)))
        ax.axvspan(max(0.0, edges[0]), max(0.0, edges[-1]), color=GREEN, alpha=0.12, lw=0)
        for method in methods:
            d = panel.loc[panel["method"] == method, "improvement"]
            if len(d):
                ax.hist(d, bins=edges, alpha=0.6, color=COLORS[method], label=f"{method.upper()} (n={len(d)})")
        ax.axvline(0.0, color="black", lw=0.8)
        ax.set_title(LABELS.get(key, key))
        ax.set_xlabel("improvement over KD (> 0: better)")
        ax.set_ylabel("points")
        ax.legend(fontsize=8)
    return _save(fig, path)


def scatters(points: pd.DataFrame, by: str, title: str, path: Path, methods=("nll", "hldc", "hldf")) -> Path:
    """One panel per value of `by`: KD's score on x, the compared method's on y; green below the diagonal."""
    points = points[points["method"].isin(methods)].dropna(subset=["score", "kd_score"])
    keys = list(dict.fromkeys(points[by]))
    fig, axes = _panels(len(keys), title)
    for ax, key in zip(axes, keys):
        panel = points[points[by] == key]
        lo = min(panel["score"].min(), panel["kd_score"].min())
        hi = max(panel["score"].max(), panel["kd_score"].max())
        pad = 0.05 * (hi - lo) or 0.01
        line = np.array([lo - pad, hi + pad])
        ax.fill_between(line, line[0], line, color=GREEN, alpha=0.12, lw=0)
        ax.plot(line, line, color="black", lw=0.8)
        for method in methods:
            m = panel[panel["method"] == method]
            if len(m):
                ax.scatter(m["kd_score"], m["score"], s=14, alpha=0.75, color=COLORS[method],
                           label=method.upper())
        ax.set_xlim(line)
        ax.set_ylim(line)
        ax.set_title(LABELS.get(key, key))
        ax.set_xlabel("KD")
        ax.set_ylabel("compared method")
        ax.legend(fontsize=8)
    return _save(fig, path)
