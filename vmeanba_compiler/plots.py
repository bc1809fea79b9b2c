"""PNG plots of calibration profiles, accuracy (mIoU) curves and segmentation predictions
(matplotlib, Agg: no display needed).

Figures are small (about 6x3 inches at 100 dpi, tens of kB) so they can live in docs/img/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence, Union

from torch import Tensor

from .evaluation import AccuracyCurve
from .extras import import_extra
from .profile import Profile

_DPI = 100
_COLORS = {"impact": "tab:blue", "ratio": "tab:orange", "random": "tab:gray"}


def _pyplot():
    matplotlib = import_extra("matplotlib", "PNG plots (vmeanba demo, report, experiments)")

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Union[str, Path]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    _pyplot().close(fig)
    return path


def plot_site_metrics(profile: Profile, path: Union[str, Path], selected: Sequence[str] = ()) -> Path:
    """Per site: variance ratio (var/meansq across channels) and impact score, each on a log
    scale when it spans more than a decade; `selected` sites are drawn solid, the others hatched."""
    plt = _pyplot()
    sites = profile.site_ids
    metrics = [("ratio", "channel variance / mean square"), ("impact", "impact score (KL or loss)")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(7.5, 0.45 * len(sites) + 1.4), sharey=True)
    for ax, (name, label) in zip(axes, metrics):
        values = [profile.metric(s, name) for s in sites]
        shown = [max(v, 1e-12) if v is not None else 0.0 for v in values]
        bars = ax.barh(range(len(sites)), shown, color=_COLORS[name])
        for bar, site, value in zip(bars, sites, values):
            if site not in selected:
                bar.set_alpha(0.45)
                bar.set_hatch("//")
            ax.annotate("-" if value is None else f"{value:.3g}", (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                        xytext=(2, 0), textcoords="offset points", va="center", fontsize=7)
        positive = [v for v in shown if v > 0]
        if positive and max(positive) > 10 * min(positive):
            ax.set_xscale("log")
        ax.margins(x=0.15)
        ax.set_xlabel(label)
    axes[0].set_yticks(range(len(sites)), sites)
    axes[0].invert_yaxis()
    fig.suptitle("scan sites (solid: selected)" if selected else "scan sites", fontsize=10)
    return _save(fig, path)


def plot_accuracy_vs_k(curves: Sequence[AccuracyCurve], path: Union[str, Path], title: str = "",
                       ylabel: str = "accuracy (%)") -> Path:
    """Accuracy (or the curves' other metric, named by `ylabel`) against the number K of sites
    reduced, one line per ranking (random: mean, with the min-max band over its orders)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for curve in curves:
        ks = range(len(curve.accuracies))
        color = _COLORS.get(curve.ranking)
        label = curve.ranking if curve.ranking != "random" else f"random (mean of {len(curve.orders)})"
        ax.plot(ks, [100 * a for a in curve.accuracies], marker="o", label=label, color=color)
        if curve.spread is not None:
            ax.fill_between(ks, [100 * lo for lo, _ in curve.spread], [100 * hi for _, hi in curve.spread],
                            color=color, alpha=0.2, linewidth=0)
    ax.set_xlabel("K = sites reduced")
    ax.set_ylabel(ylabel)
    ax.set_xticks(range(len(curves[0].accuracies)) if curves else [])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_segmentations(images: Tensor, labels: Tensor, predictions: Mapping[str, Tensor],
                       path: Union[str, Path]) -> Path:
    """One column per image: the image, its label map, then each named prediction (label maps
    (n, H, W), class 0 = background drawn white), so a rewrite's mistakes show beside the
    baseline's. Classes share one fixed colour map across rows."""
    plt = _pyplot()
    from matplotlib.colors import ListedColormap

    classes = int(max(labels.max(), *(p.max() for p in predictions.values()))) + 1
    palette = ListedColormap(["white", *plt.get_cmap("tab10").colors][: max(classes, 2)])
    rows = [("image", None), ("label", labels), *predictions.items()]
    fig, axes = plt.subplots(len(rows), images.shape[0], figsize=(1.3 * images.shape[0] + 0.8, 1.3 * len(rows)),
                             squeeze=False)
    for r, (name, maps) in enumerate(rows):
        for c in range(images.shape[0]):
            ax = axes[r][c]
            if maps is None:
                ax.imshow(images[c, 0].numpy(), cmap="gray_r", vmin=0, vmax=1)
            else:
                ax.imshow(maps[c].numpy(), cmap=palette, vmin=0, vmax=palette.N - 1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(name, fontsize=8)
    fig.suptitle("test canvases: colour = digit class (white: background)", fontsize=9)
    return _save(fig, path)
