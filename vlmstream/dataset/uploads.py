"""Finished shards uploaded on threads while the writer goes on, a bounded number at a time (object stores and
the Hub alike): the writer never runs more than ``in_flight`` shards ahead of what is up, so local disk holds at
most that many finished shards, and an upload's error reaches the writer at its next shard or at the end."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable


class Uploads:
    def __init__(self, in_flight: int, name: str):
        self._pool = ThreadPoolExecutor(in_flight, thread_name_prefix=name)
        self._slots = threading.Semaphore(in_flight)
        self._pending: list[Future] = []

    def submit(self, upload: Callable[..., None], *args: Any) -> None:
        """Run ``upload(*args)`` on a thread; waits while ``in_flight`` uploads are on their way, and raises
        the error of one that failed since the last call."""
        self._raise_failed()
        self._slots.acquire()
        try:
            self._pending.append(self._pool.submit(self._run, upload, *args))
        except BaseException:
            self._slots.release()
            raise

    def _run(self, upload: Callable[..., None], *args: Any) -> None:
        try:
            upload(*args)
        finally:
            self._slots.release()

    def _raise_failed(self) -> None:
        for f in [f for f in self._pending if f.done()]:
            self._pending.remove(f)
            f.result()

    def finish(self) -> None:
        """Wait for every upload; raise the first error."""
        for f in self._pending:
            f.result()
        self._pending = []

    def stop(self) -> None:
        """Wait for the uploads on their way; those not started are dropped."""
        self._pool.shutdown(wait=True, cancel_futures=True)
