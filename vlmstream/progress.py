"""Progress bars for the long-running tools (packing, inspection, benchmarks): tqdm on stderr, quiet when
stderr is not a terminal (logs, CI, pipes) unless asked for."""

from __future__ import annotations

import sys
from typing import Any, Iterable


def bar(iterable: Iterable[Any] | None = None, *, total: float | None = None, desc: str | None = None,
        unit: str = "it", enabled: bool | None = None, **kw: Any) -> Any:
    """A tqdm bar on stderr; ``enabled=None``: only when stderr is a terminal."""
    from tqdm import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1, **kw)
