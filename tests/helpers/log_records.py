"""The lare2 log records of a block, for assertions (the lare2 logger does not propagate to pytest's caplog)."""

from __future__ import annotations

import logging


class Logged:
    """``with Logged(caplog) as logged: ...`` then ``logged.messages()`` (all records, or those at ``level``
    and above)."""

    def __init__(self, caplog) -> None:
        self.caplog = caplog

    def __enter__(self) -> Logged:
        logging.getLogger("lare2").addHandler(self.caplog.handler)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("lare2").removeHandler(self.caplog.handler)

    def messages(self, level: int = logging.NOTSET) -> list[str]:
        return [r.getMessage() for r in self.caplog.records if r.levelno >= level]
