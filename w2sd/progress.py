"""A dependency-free progress bar for sampling loops (one line on stderr, redrawn in place)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """``with ProgressBar(total, desc) as bar: bar.update()``. Silent when ``enabled`` is False."""

    def __init__(self, total: int, desc: str = "", enabled: bool = True, stream: TextIO | None = None,
                 width: int = 28) -> None:
        self.total, self.desc, self.enabled, self.width = max(int(total), 1), desc, enabled, width
        self.stream = stream if stream is not None else sys.stderr
        self.count = 0
        self.start = time.perf_counter()
        self._last_draw = 0.0

    def __enter__(self) -> "ProgressBar":
        self._draw(force=True)
        return self

    def update(self, n: int = 1, **postfix: object) -> None:
        self.count += n
        self.postfix = postfix
        self._draw(force=self.count >= self.total)

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        frac = min(self.count / self.total, 1.0)
        filled = int(round(frac * self.width))
        elapsed = now - self.start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        eta = f"{(self.total - self.count) / rate:5.1f}s" if rate > 0 else "    ?"
        extra = " ".join(f"{k}={v}" for k, v in getattr(self, "postfix", {}).items())
        line = (f"\r{self.desc} |{'#' * filled}{'.' * (self.width - filled)}| {self.count}/{self.total} "
                f"[{elapsed:5.1f}s<{eta}, {rate:6.2f} it/s] {extra}")
        self.stream.write(line)
        self.stream.flush()

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()
