"""Background prefetching of batches: a daemon thread and a bounded queue.

Kept apart from the samplers so that any `make_batch(step)` function can be prefetched.
"""

from __future__ import annotations

import queue
import threading

_END = object()


class PrefetchIterator:
    """Iterator over make_batch(start), make_batch(start + 1), ... computed in a daemon thread.

    A bounded queue keeps at most `prefetch` batches ahead; `close()` (or leaving the `with`
    block) stops and joins the thread. An exception in the thread is re-raised by `next()`.
    """

    def __init__(self, make_batch, start: int, stop: int | None, prefetch: int = 2):
        if prefetch < 1:
            raise ValueError(f'prefetch must be >= 1; got {prefetch}')
        self._queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        # The thread gets only what it needs (not self), so an abandoned iterator can be
        # garbage-collected, and __del__ then stops the thread.
        self._thread = threading.Thread(
            target=_produce, args=(make_batch, start, stop, self._queue, self._stop),
            name='TaskSampler-prefetch', daemon=True)
        self._thread.start()
        self._done = False

    def __iter__(self):
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def close(self) -> None:
        """Stops the background thread and waits for it (idempotent)."""
        self._done = True
        self._stop.set()
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if hasattr(self, '_stop'):
            self._stop.set()


def _produce(make_batch, step, stop, out: queue.Queue, halt: threading.Event) -> None:
    try:
        while not halt.is_set() and (stop is None or step < stop):
            item = make_batch(step)
            step += 1
            _put(out, item, halt)
        _put(out, _END, halt)
    except Exception as e:  # pylint: disable=broad-except  # handed to the consumer
        _put(out, e, halt)


def _put(out: queue.Queue, item, halt: threading.Event) -> None:
    # Short timeouts so that close() is noticed even while the queue is full.
    while not halt.is_set():
        try:
            out.put(item, timeout=0.05)
            return
        except queue.Full:
            continue
