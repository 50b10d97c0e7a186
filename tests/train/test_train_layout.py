"""Stage 2's modules keep to one concept each: the library parts never import the trainer, and the
errors they raise for bad input are the project's user-error types."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

TRAIN = Path(__file__).resolve().parents[2] / "train"
# what calibration, eval, scoring new images and conversion import: none of it may pull in the training loop
LIBRARY_MODULES = ("calibration", "checkpoint", "reference", "scoring", "metrics", "data", "report", "robustness")


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", LIBRARY_MODULES)
def test_library_modules_do_not_import_the_trainer(module: str) -> None:
    names = imported_modules(TRAIN / f"{module}.py")
    assert names, module  # the parse found the module's imports
    assert "lare2.train.trainer" not in names, f"train/{module}.py imports the trainer"


def test_importing_calibration_loads_no_trainer() -> None:
    code = ("import sys, lare2.train.calibration, lare2.train.reference, lare2.train.scoring; "
            "assert 'lare2.train.calibration' in sys.modules; "
            "assert 'lare2.train.trainer' not in sys.modules, 'the trainer was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bad_input_raises_user_errors() -> None:
    from lare2.shared.errors import InputError, UserError
    from lare2.train.calibration import calibrate_threshold
    from lare2.train.checkpoint import CheckpointError
    from lare2.train.data import ReadSettings

    assert issubclass(CheckpointError, UserError)
    with pytest.raises(InputError, match="target_fpr must be in"):
        calibrate_threshold(np.linspace(0, 1, 10), 1.5)
    with pytest.raises(InputError, match="no real images"):
        calibrate_threshold(np.empty(0), 0.05)
    with pytest.raises(InputError, match="read workers must be >= 0"):
        ReadSettings(workers=-1)
