"""The cache's pictures (matplotlib, imported only when drawing): one sample's LaRE map, mean-LaRE stats."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lare2.shared.cache.store import FeatureCache
from lare2.shared.cache.summary import image_path, label_name, sample_metadata

# Figures: fixed inches x dpi, so a PNG's pixel size is known in advance (and tested).
FIGURE_DPI = 100
SHOW_PANEL_INCHES = (2.56, 3.0)
"""One panel of ``show``'s PNG (width, height): 256 x 300 px at FIGURE_DPI."""
STATS_FIGURE_INCHES = (12.0, 5.0)
"""``stats``' PNG: 1200 x 500 px at FIGURE_DPI."""


def show_figure_pixels(num_panels: int) -> tuple[int, int]:
    """(width, height) in pixels of ``show``'s PNG with ``num_panels`` panels."""
    return round(SHOW_PANEL_INCHES[0] * num_panels * FIGURE_DPI), round(SHOW_PANEL_INCHES[1] * FIGURE_DPI)


def render_sample_png(cache: FeatureCache, index: int, out: str | Path,
                      extra_panels: dict[str, np.ndarray] | None = None) -> dict:
    """Save the source image beside its LaRE map, one panel per latent channel, then ``extra_panels``
    (title -> a 2-D map, e.g. a detector's attention over the feature grid), each on its own colour scale.

    When the image is not at hand only the LaRE panels are drawn; the returned dict says so
    (``image_shown``, ``image_note``) and gives the PNG's pixel size.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    lare_4HW = cache.read([index], names=("lare",))["lare"][0].astype(np.float32)
    source = image_path(cache, index)
    image = None
    if source is None:
        note = "the cache records no manifest root"
    elif not source.is_file():
        note = f"image not found: {source}"
    else:
        with Image.open(source) as im:
            image = np.asarray(im.convert("RGB"))
        note = str(source)

    channels = lare_4HW.shape[0]
    extra_panels = extra_panels or {}
    panels = channels + (image is not None) + len(extra_panels)
    fig = Figure(figsize=(SHOW_PANEL_INCHES[0] * panels, SHOW_PANEL_INCHES[1]), dpi=FIGURE_DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    first = 0
    if image is not None:
        axes[0].imshow(image)
        axes[0].set_title("image", fontsize=9)
        first = 1
    finite = lare_4HW[np.isfinite(lare_4HW)]
    # one colour scale for all channels so that they compare; the 99th percentile keeps outliers from washing it out
    vmax = float(np.percentile(finite, 99)) if finite.size else 1.0
    for c in range(channels):
        ax = axes[first + c]
        ax.imshow(lare_4HW[c], cmap="magma", vmin=0.0, vmax=vmax or 1.0, interpolation="nearest")
        ax.set_title(f"LaRE channel {c}", fontsize=9)
    for k, (title, values) in enumerate(extra_panels.items()):
        axes[first + channels + k].imshow(values, cmap="viridis", interpolation="nearest")
        axes[first + channels + k].set_title(title, fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    meta = sample_metadata(cache, index)
    caption = f"{meta['sample_id']}  {meta['generator']}  {label_name(meta['label'])}  {meta['status']}"
    if image is None:
        caption += f"  ({note})"
    fig.suptitle(caption, fontsize=8)
    fig.savefig(out, dpi=FIGURE_DPI)
    return {"png": str(out), "pixels": list(show_figure_pixels(panels)), "image_shown": image is not None,
            "image_note": note}


def stats_figure_pixels() -> tuple[int, int]:
    return round(STATS_FIGURE_INCHES[0] * FIGURE_DPI), round(STATS_FIGURE_INCHES[1] * FIGURE_DPI)


def render_stats_png(stats: dict, out: str | Path) -> dict:
    """Violins (left) and histograms (right) of mean LaRE per generator x label; log scale."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=STATS_FIGURE_INCHES, dpi=FIGURE_DPI)
    FigureCanvasAgg(fig)
    violins, hists = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    groups = [g for g in stats["groups"] if g["n"]]
    if not groups:
        for ax in (violins, hists):
            ax.text(0.5, 0.5, "no ok samples", ha="center", va="center", transform=ax.transAxes)
    else:
        # mean squared errors are positive and span decades: compare them on a log scale
        logs = [np.log10(np.maximum(np.asarray(g["values"]), 1e-12)) for g in groups]
        names = [f"{g['generator']}\n{label_name(g['label'])} (n={g['n']})" for g in groups]
        colours = ["tab:blue" if g["label"] == 0 else "tab:red" for g in groups]
        positions = np.arange(1, len(groups) + 1)
        if all(len(v) > 1 for v in logs):
            parts = violins.violinplot(logs, positions=positions, showmedians=True)
            for body, colour in zip(parts["bodies"], colours):
                body.set_facecolor(colour)
                body.set_alpha(0.5)
        for p, v, colour in zip(positions, logs, colours):
            violins.scatter(np.full(len(v), p), v, s=4, color=colour, alpha=0.6)
        violins.set_xticks(positions, names, fontsize=7)
        violins.set_ylabel("log10 mean LaRE")
        violins.set_title("mean LaRE per generator and label", fontsize=10)
        bins = np.linspace(min(v.min() for v in logs), max(v.max() for v in logs) + 1e-9, 40)
        for v, name in zip(logs, names):
            hists.hist(v, bins=bins, histtype="step", label=name.replace("\n", " "))
        hists.set_xlabel("log10 mean LaRE")
        hists.set_ylabel("samples")
        hists.legend(fontsize=6)
    fig.suptitle(str(stats["path"]), fontsize=8)
    fig.savefig(out, dpi=FIGURE_DPI)
    return {"png": str(out), "pixels": list(stats_figure_pixels())}
