"""Progress of long work, one way for every command: a tqdm bar on a terminal and, while stdout is
not one (a log file, a pipe), also a plain line every DUOMEM_PROGRESS_SECONDS (default 20) and,
for work that lasted that long, at the end, as `mlx_lm.lora` prints `Iter N: ...`. tqdm alone
turns itself off there (or writes only carriage-return updates), so a long run would leave an
empty log."""

import os
import sys
import time

from tqdm import tqdm

LINE = "{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class Progress:
    def __init__(
        self,
        iterable=None,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        initial: int = 0,
        disable: bool = False,
    ):
        self.iterable = iterable
        self.total = len(iterable) if total is None and iterable is not None else total
        self.bar = tqdm(total=self.total, initial=initial, desc=desc, unit=unit, disable=True if disable else None)
        self.lines = not disable and not (sys.stdout.isatty() and sys.stderr.isatty())
        self.every = float(os.environ.get("DUOMEM_PROGRESS_SECONDS", 20))
        self.desc, self.unit, self.initial, self.n, self.postfix = desc, unit, initial, initial, ""
        self.start = self.printed_at = time.monotonic()
        self.printed_n = initial

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        self.bar.update(n)
        if self.lines and time.monotonic() - self.printed_at >= self.every:
            self.line()

    def set_postfix(self, **values) -> None:
        self.bar.set_postfix(**values)
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def line(self) -> None:
        now = time.monotonic()
        print(
            tqdm.format_meter(
                self.n,
                self.total,
                now - self.start,
                prefix=self.desc,
                unit=self.unit,
                postfix=self.postfix,
                bar_format=LINE,
                initial=self.initial,
            ),
            flush=True,
        )
        self.printed_at, self.printed_n = now, self.n

    def close(self) -> None:
        """The closing line only after work long enough to have had a line: a quick step stays quiet."""
        if self.lines and self.n != self.printed_n and time.monotonic() - self.start >= self.every:
            self.line()
        self.bar.close()
