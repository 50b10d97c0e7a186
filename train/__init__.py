"""Stage 2: EGRE + head and baselines trained on cached tensors, calibration, per-generator evaluation.

Never imports diffusers or ``lare2.extract``: it only reads caches.
"""
