"""JSON for the whole project: one sanitiser for reports and attributes, the `--json` printer, a file writer."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from lare2.shared.atomic import atomic_write


def jsonable(obj: Any) -> Any:
    """Plain JSON values: numpy scalars -> Python, NaN/Inf -> None, tuples/Paths -> lists/str."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [jsonable(v) for v in obj.tolist()]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def print_json(obj: Any) -> None:
    """A command's ``--json`` report: one document (``jsonable`` values) on ONE line of stdout, so that
    scripts find it as the last line even where other processes of a launch print too."""
    print(json.dumps(jsonable(obj)), flush=True)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: str | Path, data: Mapping[str, Any]) -> None:
    """``data`` as indented JSON with a trailing newline; NaN/Inf kept as JSON's NaN/Infinity, other
    types raise ``TypeError``. Written atomically (``atomic_write``): a crash never leaves half a file."""
    text = json.dumps(data, indent=2, default=_json_default, allow_nan=True) + "\n"
    with atomic_write(path) as tmp:
        tmp.write_text(text)
