"""MemoryMonitor: a background thread sampling this process's RSS (peak, a window's peak, the
limit it nears). A shared helper: the trainer shrinks micro-batches with it, merge reports its peak.
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from typing_extensions import Self


class MemoryMonitor:
    """RSS of this process sampled by a background thread (psutil), for the progress bar and for
    shrinking the micro-batch before the limit is hit.

        with MemoryMonitor(limit) as mon:
            ...                  # mon.rss, mon.peak, mon.window_peak
            if mon.near_limit(): ...   # the last window came within 10% of the limit
            mon.reset_window()
    """

    def __init__(self, limit: int | None = None, interval: float = 0.05, pid: int | None = None):
        self.limit = limit
        self.interval = interval
        self._proc = psutil.Process(pid)
        self.rss = 0
        self.peak = 0  # highest RSS seen since start
        self.window_peak = 0  # highest RSS since the last reset_window()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sample()

    def sample(self) -> int:
        """Read RSS now; update peak and window_peak; return it."""
        rss = self._proc.memory_info().rss
        with self._lock:
            self.rss = rss
            self.peak = max(self.peak, rss)
            self.window_peak = max(self.window_peak, rss)
        return rss

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(psutil.Error):
                self.sample()

    def start(self) -> Self:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="ggtrain-memory-monitor", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self.sample()

    def reset_window(self) -> None:
        with self._lock:
            self.window_peak = self.rss

    def near_limit(self, fraction: float = 0.9) -> bool:
        """True when the window's peak RSS reached `fraction` of the limit (False without a limit)."""
        self.sample()
        return self.limit is not None and self.window_peak >= fraction * self.limit

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
