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


REASON_PANEL_PIXELS = 256
REASON_FONT_SIZE = 17
REASON_LINE_CHARS = 26
"""The reason drawn in place of an image that cannot be decoded: a square of this side, Pillow's default font at
this size, lines wrapped at this many characters (the panel is shown at about 2/3 of its size)."""


def reason_panel(reason: str) -> np.ndarray:
    """uint8 [S, S, 3]: a dark square with ``reason`` written on it (Pillow ImageDraw), the image panel of a
    sample whose file cannot be decoded."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    canvas = Image.new("RGB", (REASON_PANEL_PIXELS, REASON_PANEL_PIXELS), (48, 48, 48))
    lines = [wrapped for line in reason.splitlines() for wrapped in textwrap.wrap(line, REASON_LINE_CHARS) or [""]]
    ImageDraw.Draw(canvas).multiline_text((8, 8), "\n".join(lines), fill=(255, 255, 255), spacing=4,
                                          font=ImageFont.load_default(size=REASON_FONT_SIZE))
    return np.asarray(canvas)


def _source_pixels(source: Path) -> tuple[np.ndarray | None, str]:
    """(uint8 [H, W, 3] or None, why not) of an image file on disk; a file Pillow cannot decode is no crash."""
    from PIL import Image

    try:
        with Image.open(source) as im:
            return np.asarray(im.convert("RGB")), ""
    except Image.UnidentifiedImageError:
        return None, "not an image Pillow can identify"
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        return None, f"cannot decode: {err}"


def render_sample_png(cache: FeatureCache, index: int, out: str | Path,
                      extra_panels: dict[str, np.ndarray] | None = None) -> dict:
    """Save the source image beside its LaRE map, one panel per latent channel, then ``extra_panels``
    (title -> a 2-D map, e.g. a detector's attention over the feature grid), each on its own colour scale.

    When the image is not at hand only the LaRE panels are drawn; when its file cannot be decoded, the
    image panel says why (:func:`reason_panel`); a sample without a LaRE map (status error) says so on its
    panels. The returned dict tells (``image_shown``, ``image_note``) and gives the PNG's pixel size.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lare_4HW = cache.read([index], names=("lare",))["lare"][0].astype(np.float32)
    meta = sample_metadata(cache, index)
    source = image_path(cache, index)
    image, shown = None, False
    if source is None:
        note = "the cache records no manifest root"
    elif not source.is_file():
        note = f"image not found: {source}"
    else:
        image, why = _source_pixels(source)
        shown = image is not None
        note = str(source) if shown else f"{source.name}: {why}"
        if not shown:
            recorded = f"\n\nextraction: {meta['error']}" if meta["error"] else ""
            image = reason_panel(f"cannot show {source.name}:\n{why}{recorded}")

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
        if not np.isfinite(lare_4HW[c]).any():
            ax.text(0.5, 0.5, f"no LaRE map\n(status {meta['status']})", ha="center", va="center", fontsize=8,
                    transform=ax.transAxes)
    for k, (title, values) in enumerate(extra_panels.items()):
        axes[first + channels + k].imshow(values, cmap="viridis", interpolation="nearest")
        axes[first + channels + k].set_title(title, fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    caption = f"{meta['sample_id']}  {meta['generator']}  {label_name(meta['label'])}  {meta['status']}"
    if not shown:
        caption += f"  ({note})"
    fig.suptitle(caption, fontsize=8)
    fig.savefig(out, dpi=FIGURE_DPI)
    return {"png": str(out), "pixels": list(show_figure_pixels(panels)),
            "image_shown": shown, "image_note": note}


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
