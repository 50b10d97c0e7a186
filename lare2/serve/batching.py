"""Dynamic batching: images from concurrent requests are scored together by one model owner.

The HTTP layer only queues images (``BatchScorer.score``); one worker task takes batches of up to
``max_batch`` images, waiting at most ``max_wait_ms`` after the first for more to come (the size
and wait caps of Triton's ``dynamic_batching`` and Ray Serve's ``@serve.batch``), and runs the
model on a thread of its own, off the event loop. The queue is bounded: ``QueueFull`` says when to
retry instead of letting memory grow. A ``Detector`` promises that an image's p(fake) does not
depend on what it is batched with (to float tolerance), so batching changes throughput, not rows.
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    from lare2.detect import Result
    from lare2.serve.metrics import ServeMetrics

ScoreFn = Callable[[list[bytes], "str | None"], "list[Result]"]
"""``Detector.score``: (image bytes, class name or None) -> one ``Result`` per image, in order."""
MAX_RETRY_AFTER_S = 60


class QueueFull(Exception):
    """No room in the queue for a request's images; ``retry_after``: seconds until the queue should have drained."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the scoring queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass
class Job:
    data: bytes
    class_name: str | None
    future: asyncio.Future


class BatchScorer:
    """Queue of images -> batches -> ``score`` on one model thread -> each image's ``Result`` to its request."""

    def __init__(self, score: ScoreFn, *, max_batch: int, max_wait_ms: float, max_queue: int,
                 metrics: ServeMetrics | None = None) -> None:
        self.score_fn, self.max_batch, self.max_wait_s, self.max_queue = score, max_batch, max_wait_ms / 1000, max_queue
        self.metrics = metrics
        self.jobs: asyncio.Queue[Job] = asyncio.Queue()  # bounded by admission (has_room), not by the queue itself
        self.waiting = 0
        """Images admitted and not yet handed to the model (in the queue or in a batch still filling)."""
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lare2-model")
        self.seconds_per_image = 0.0
        """Moving average of the model's time per image, for Retry-After."""
        self.closing = False
        self.worker: asyncio.Task | None = None

    @property
    def queued(self) -> int:
        """Images waiting for the model: queued, or in the batch that is filling."""
        return self.waiting

    def has_room(self, images: int = 1) -> bool:
        return not self.closing and self.queued + images <= self.max_queue

    def retry_after(self) -> int:
        """Whole seconds until the queue as it stands now should have been scored (1 to 60)."""
        return int(min(MAX_RETRY_AFTER_S, max(1, math.ceil(self.queued * self.seconds_per_image))))

    def start(self) -> None:
        """Start the worker task (inside the running event loop)."""
        self.worker = asyncio.get_running_loop().create_task(self._work(), name="lare2-batcher")

    async def score(self, items: Sequence[bytes], class_names: Sequence[str | None]) -> list[Result]:
        """Queue ``items`` and wait for their results, in order; ``QueueFull`` when they do not fit."""
        if not self.has_room(len(items)):
            raise QueueFull(self.retry_after())
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        for data, class_name, future in zip(items, class_names, futures):
            self.jobs.put_nowait(Job(data, class_name, future))
        self.waiting += len(items)
        self._show_depth()
        return list(await asyncio.gather(*futures))

    async def close(self) -> None:
        """Refuse new images, finish every queued one, stop the worker and its thread."""
        self.closing = True
        if self.worker is not None and not self.worker.done():
            await self.jobs.join()
            self.worker.cancel()
            await asyncio.gather(self.worker, return_exceptions=True)
        self.executor.shutdown(wait=True)

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            live = [job for job in batch if not job.future.done()]  # a request whose client left is cancelled
            try:
                if live:
                    started = time.perf_counter()
                    results = await loop.run_in_executor(self.executor, self._score_jobs, live)
                    self._record(len(live), time.perf_counter() - started, results)
                    for job, result in zip(live, results):
                        if not job.future.done():
                            job.future.set_result(result)
            except Exception as err:  # noqa: BLE001 - a failed model call fails its requests (500), not the worker
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(err)
            finally:
                for _ in batch:
                    self.jobs.task_done()

    async def _next_batch(self) -> list[Job]:
        """The first waiting job, then more until ``max_batch`` or ``max_wait_ms`` after it."""
        batch = [await self.jobs.get()]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            if not self.jobs.empty():
                batch.append(self.jobs.get_nowait())
                continue
            left = deadline - time.monotonic()
            if left <= 0 or self.closing:
                break
            try:
                batch.append(await asyncio.wait_for(self.jobs.get(), left))
            except asyncio.TimeoutError:
                break
        self.waiting -= len(batch)
        self._show_depth()
        return batch

    def _score_jobs(self, jobs: list[Job]) -> list[Result]:
        """On the model thread: one ``score`` call per class name in the batch (one call in the common case)."""
        results: list[Result | None] = [None] * len(jobs)
        for class_name in dict.fromkeys(job.class_name for job in jobs):
            rows = [i for i, job in enumerate(jobs) if job.class_name == class_name]
            for i, result in zip(rows, self.score_fn([jobs[i].data for i in rows], class_name)):
                results[i] = result
        return results  # type: ignore[return-value]

    def _record(self, images: int, seconds: float, results: list[Result]) -> None:
        per_image = seconds / images
        previous = self.seconds_per_image or per_image
        self.seconds_per_image = 0.8 * previous + 0.2 * per_image
        if self.metrics is not None:
            self.metrics.batch_images.observe(images)
            for result in results:
                self.metrics.images_scored.labels(result.status).inc()

    def _show_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_images.set(self.queued)
