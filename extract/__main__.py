"""``python -m lare2.extract --manifest ...`` (e.g. under ``accelerate launch``)."""

from lare2.extract.cli import main

raise SystemExit(main())
