"""A stop asked by a scheduler: SIGTERM or SIGUSR1 ends an extraction after the batch in flight.

SLURM sends SIGTERM to every task it cancels or pre-empts (then SIGKILL after its ``KillWait``), and
a job script's ``--signal`` sends SIGUSR1 before the time limit. While :func:`stop_on_signals` is
active, either signal only sets :attr:`StopRequest.signal`: the extraction loop sees it before taking
its next batch, writes every finished block, drops the unfinished one and ends with exit code
``EXIT_PREEMPTED`` (``lare2.shared.cli_errors``), so that a rerun or a requeued task resumes
where it stopped, having lost at most the block in flight. The previous handlers come back when
the job ends. SIGKILL cannot be caught: then the rerun guarantee (whole blocks, done marks last)
is what holds. Each process of a multi-process job handles its own signal (SLURM signals every task).

Loader worker processes (``DataLoader(num_workers>0)``) get the same signals when a scheduler signals
the whole process group; they ignore them (:func:`ignore_stop_signals`) and are shut down by the
loop as it stops, instead of dying under it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@dataclass
class StopRequest:
    """Set from a signal handler; read by the extraction loop between batches."""

    signal: int | None = None
    """The first stop signal received, if any."""

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else ""


@contextlib.contextmanager
def stop_on_signals(signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> Iterator[StopRequest]:
    """Within the block, ``signals`` set the yielded request instead of ending the process.

    Python runs signal handlers in the main thread only, so elsewhere (a job started from another thread)
    nothing is installed and the request is never set."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum: int, frame) -> None:  # only a flag: the loop logs and stops at a safe point
        if request.signal is None:
            request.signal = signum

    previous = {s: signal.signal(s, handle) for s in signals}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: one not set from Python


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """A loader worker's ``worker_init_fn``: the main process decides when the workers stop."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
