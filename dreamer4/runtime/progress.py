"""Progress output for long work: a tqdm bar on a terminal, plain log lines otherwise.

Only JAX process 0 prints, so a multi-host job shows one bar.
"""

from __future__ import annotations

import sys
import time

from dreamer4.runtime.distributed import is_main_process


class Progress:
    def __init__(
        self, total: int | None, desc: str, unit: str = "it", initial: int = 0, log_every_s: float = 10.0, stream=None
    ):
        self.stream = stream or sys.stderr
        self.enabled = is_main_process()
        self.total, self.desc, self.unit = total, desc, unit
        self.n = initial
        self.log_every_s = log_every_s
        self._last_log = 0.0
        self._bar = None
        self._t0 = time.time()
        if self.enabled and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True)

    def update(self, n: int = 1, **stats) -> None:
        self.n += n
        if not self.enabled:
            return
        text = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in stats.items()}
        if self._bar is not None:
            self._bar.update(n)
            if text:
                self._bar.set_postfix(text, refresh=False)
            return
        now = time.time()
        if now - self._last_log >= self.log_every_s or (self.total is not None and self.n >= self.total):
            self._last_log = now
            of = f"/{self.total}" if self.total is not None else ""
            extra = " ".join(f"{k}={v}" for k, v in text.items())
            print(
                f"[{self.desc}] {self.n}{of} {self.unit} {time.time() - self._t0:.0f}s {extra}".rstrip(),
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
