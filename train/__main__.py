"""``python -m lare2.train train|eval|convert-reference|calibrate ...`` (e.g. under ``accelerate launch``)."""

import sys

from lare2.train.cli import main

sys.exit(main())
