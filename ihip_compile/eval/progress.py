"""Progress for long runs: tqdm when installed, otherwise one self-rewriting line on stderr."""

from __future__ import annotations

import importlib.util
import sys
import time


class Progress:
    """``with Progress(total, "passkey") as bar: ... bar.update(label)``."""

    def __init__(self, total: int, description: str):
        self.total, self.description, self.done = total, description, 0
        self.started = time.monotonic()
        self._tqdm = None
        if importlib.util.find_spec("tqdm") is not None:
            from tqdm import tqdm

            self._tqdm = tqdm(total=total, desc=description, file=sys.stderr, dynamic_ncols=True)

    def update(self, label: str = "") -> None:
        self.done += 1
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(label, refresh=False)
            self._tqdm.update(1)
            return
        elapsed = time.monotonic() - self.started
        sys.stderr.write(
            f"\r{self.description}: {self.done}/{self.total} ({elapsed:.0f}s) {label}\033[K"
        )
        sys.stderr.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
        else:
            sys.stderr.write("\n")
