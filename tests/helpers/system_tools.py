"""System programs some tests drive for real (headless Chromium, SLURM daemons): found, or the test skips.

A skip names the Debian packages that bring the programs. CI (``.ci/run`` as root) installs them
and sets ``LARE2_REQUIRE_SYSTEM_TOOLS=1``, under which a missing program fails the test instead:
there, a test that cannot run is a broken setup, not a reason to pass.
"""

from __future__ import annotations

import os
import shutil
from typing import Sequence

import pytest

REQUIRE_ENV = "LARE2_REQUIRE_SYSTEM_TOOLS"


def require_programs(*names: str, packages: Sequence[str]) -> dict[str, str]:
    """Each program's path on PATH; a missing one skips the test (fails it when ``LARE2_REQUIRE_SYSTEM_TOOLS=1``)."""
    found = {name: shutil.which(name) for name in names}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        message = f"needs {', '.join(missing)} (Debian: apt-get install {' '.join(packages)})"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{message}; {REQUIRE_ENV}=1 makes their absence a failure", pytrace=False)
        pytest.skip(message)
    return {name: path for name, path in found.items() if path is not None}
