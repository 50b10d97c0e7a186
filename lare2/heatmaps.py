"""Where a detector looked: the LaRE map and EGRE's spatial attention drawn over the image (matplotlib).

Both maps are placed where they come from. The LaRE map covers the whole image (the VAE sees it
resized to ``image_size`` squared, aspect ignored), so its channel mean is stretched back over the
image. EGRE's attention covers the backbone's input, the central 224 x 224 crop of the image at
full resolution (reflect-padded when smaller, docs/method.md §2.2): it is upsampled to 224 px and
drawn over that crop only; the rest of a large image is left bare (the detector never saw it).

Figures have a fixed size in inches at a fixed dpi, so a PNG's pixel size is known in advance
(``heatmap_pixels``) and tested.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FIGURE_DPI = 100
PANEL_INCHES = (3.2, 3.6)
"""One panel (width, height): 320 x 360 px at FIGURE_DPI; a heatmap has three."""
NUM_PANELS = 3
BACKBONE_SIZE = 224


def heatmap_pixels() -> tuple[int, int]:
    """(width, height) in pixels of a heatmap PNG."""
    return round(PANEL_INCHES[0] * NUM_PANELS * FIGURE_DPI), round(PANEL_INCHES[1] * FIGURE_DPI)


def _resize_float(values_HW: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(values_HW.astype(np.float32), mode="F").resize(size_wh, Image.BILINEAR))


def lare_over_image(lare_Lhw: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """[H, W]: the LaRE map's mean over its channels, upsampled to the image (which the VAE saw whole)."""
    return _resize_float(np.asarray(lare_Lhw, np.float32).mean(axis=0), size_wh)


def _backbone_positions(side: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """For each pixel along one image axis: its coordinate in the backbone input, and whether it lies inside."""
    padded = max(side, size)
    before, crop = (padded - side) // 2, (padded - size) // 2
    coords = np.arange(side) - crop + before
    return coords, (coords >= 0) & (coords < size)


def attention_over_image(attention_HW: np.ndarray, size_wh: tuple[int, int],
                         backbone_size: int = BACKBONE_SIZE) -> np.ndarray:
    """[H, W]: the attention upsampled to the backbone input and placed over the image pixels it covers
    (NaN elsewhere)."""
    upsampled = _resize_float(np.asarray(attention_HW, np.float32), (backbone_size, backbone_size))
    width, height = size_wh
    rows, rows_in = _backbone_positions(height, backbone_size)
    cols, cols_in = _backbone_positions(width, backbone_size)
    canvas = np.full((height, width), np.nan, dtype=np.float32)
    canvas[np.ix_(rows_in, cols_in)] = upsampled[np.ix_(rows[rows_in], cols[cols_in])]
    return canvas


def render_heatmap(image, lare_Lhw: np.ndarray, attention_HW: np.ndarray | None, title: str, out: str | Path,
                   no_attention_note: str = "no spatial attention") -> dict:
    """Save image | LaRE map over it | attention over it, with ``title`` above; returns the PNG's path and
    pixel size."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rgb = np.asarray(image.convert("RGB"))
    size_wh = (rgb.shape[1], rgb.shape[0])
    fig = Figure(figsize=(PANEL_INCHES[0] * NUM_PANELS, PANEL_INCHES[1]), dpi=FIGURE_DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, NUM_PANELS, squeeze=False)[0]
    for ax in axes:
        ax.imshow(rgb)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].set_title("image", fontsize=9)
    axes[1].imshow(lare_over_image(lare_Lhw, size_wh), cmap="magma", alpha=0.6)
    axes[1].set_title("LaRE map (mean of channels)", fontsize=9)
    if attention_HW is None:
        axes[2].text(0.5, 0.5, no_attention_note, ha="center", va="center", transform=axes[2].transAxes, fontsize=8,
                     color="white", backgroundcolor="black")
        axes[2].set_title("attention", fontsize=9)
    else:
        axes[2].imshow(attention_over_image(attention_HW, size_wh), cmap="viridis", alpha=0.6)
        axes[2].set_title(f"EGRE attention (central {BACKBONE_SIZE} px)", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.savefig(out, dpi=FIGURE_DPI)
    return {"png": str(out), "pixels": list(heatmap_pixels())}


def cache_sample_attention(run_dir: str | Path, cache, index: int) -> np.ndarray:
    """EGRE's attention [H, W] over one cached sample, from a run whose features match the cache's."""
    from lare2.shared.cache import nonfinite_rows
    from lare2.shared.errors import InputError
    from lare2.train.checkpoint import CheckpointError, check_compatible, load_detector
    from lare2.train.data import extraction_fingerprint
    from lare2.train.models import predict_features

    model, detector = load_detector(run_dir)
    check_compatible(detector, extraction_fingerprint(cache), cache.layout, cache.path,
                     identity=cache.attrs.get("identity"))
    if not hasattr(model, "spatial_attention"):
        raise CheckpointError(f"{run_dir}: a {detector.model.kind!r} detector has no spatial attention; "
                              "pass an egre run")
    arrays = cache.read([index], names=type(model).input_names)
    if any(nonfinite_rows(a).any() for a in arrays.values()):
        raise InputError(f"{cache.path}: sample {index} has no features (status error): nothing to attend over")
    output = predict_features(model, arrays.get("pooled"), arrays["fmap"], arrays["lare"])
    return output.attention[0].float().cpu().numpy()
