"""Scoring new images with a trained detector: stage 1's feature extraction, then stage 2's model.

The features are computed exactly as for the caches the detector was trained on (its config
records that extraction config), cast through the cache's storage dtype, then scored. A detector
is refused when the models at hand are not the ones its training features came from.

Prompts: with ``prompt_mode=class`` the class comes from ``class_name`` or the GenImage file-name
rule; an image with neither gets the empty prompt (and the verdict records the prompt used).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lare2.shared.manifest import is_image_name


@dataclass
class Verdict:
    """One image's outcome: ``p_fake`` and ``fake`` are None when ``error`` says why it was not scored."""

    path: str
    p_fake: float | None
    fake: bool | None
    prompt: str
    error: str = ""


def image_files(inputs: list[Path]) -> list[Path]:
    """Files as given, folders searched recursively for image names, in sorted order."""
    files = []
    for item in inputs:
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.is_file() and is_image_name(p.name))
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    return files


def score_images(run_dir: Path, inputs: list[Path], *, sd_model: str | None = None, backbone: str | None = None,
                 class_name: str | None = None, device: str = "auto", batch_size: int = 8) -> list[Verdict]:
    """Verdicts for image files and folders, in the order of ``image_files``; bad images become error rows."""
    import numpy as np

    from lare2.extract.images import ImageError, backbone_input, decode_rgb, lare_input
    from lare2.extract.run import DecodedSample, compute_batch, load_models, stored_config
    from lare2.shared.classnames import class_name_from_filename
    from lare2.shared.config import identity_fingerprint
    from lare2.shared.devices import resolve_device
    from lare2.shared.manifest import content_id
    from lare2.shared.seeding import sample_seed
    from lare2.train.checkpoint import CheckpointError, load_detector, score_features

    torch_device = resolve_device(device)
    files = image_files(inputs)
    model, detector = load_detector(run_dir, device=torch_device)
    if detector.extraction is None:
        raise CheckpointError(f"{run_dir}: the run does not record its extraction config; "
                              "calibrate it on a cache first (lare2 calibrate RUN --val CACHE)")
    cfg = stored_config(detector.extraction.to_dict(), torch_device, sd_model=sd_model, backbone=backbone)
    models = load_models(cfg, torch_device)
    if identity_fingerprint(cfg.identity(models.fingerprints)) != detector.extraction_fingerprint:
        raise CheckpointError(f"{run_dir}: the models at hand ({models.fingerprints}) are not those the detector was "
                              "trained on; pass --sd/--clip pointing at the same weights")

    verdicts: list[Verdict] = []
    pending: list[tuple[Path, DecodedSample, str, int]] = []  # (path, inputs, prompt, seed)

    def flush() -> None:
        if not pending:
            return
        arrays = compute_batch(models, [p[1] for p in pending], [p[2] for p in pending], [p[3] for p in pending],
                               torch_device)
        stored = {name: a.astype(models.layout.dtype(name)).astype(np.float32) for name, a in arrays.items()}
        p_fake = score_features(model, stored["pooled"], stored["fmap"], stored["lare"]).cpu().numpy()
        for (path, _, prompt, _), p in zip(pending, p_fake):
            if np.isfinite(p):
                verdicts.append(Verdict(str(path), float(p), bool(p > detector.threshold), prompt))
            else:  # never let a failed computation read as "real"
                verdicts.append(Verdict(str(path), None, None, prompt, "non-finite model output"))
        pending.clear()

    for index, path in enumerate(files):
        try:
            data = path.read_bytes()
            image = decode_rgb(data, max_pixels=cfg.max_image_pixels)
        except (ImageError, OSError) as err:
            verdicts.append(Verdict(str(path), None, None, "", str(err)))
            continue
        prompt = cfg.prompt_for(class_name or class_name_from_filename(path.name))
        sample = DecodedSample(index, lare_input(image, cfg.image_size), backbone_input(image), "")
        pending.append((path, sample, prompt, sample_seed(cfg.seed, content_id(data))))
        if len(pending) == batch_size:
            flush()
    flush()
    return verdicts
