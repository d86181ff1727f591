"""An optional progress bar for methods that take many passes (``progress=True``; off by default).

tqdm is not a dependency of the library: it is imported only when a bar is asked for.
"""
from __future__ import annotations

from typing import Any


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(enabled: bool, total: int, desc: str, unit: str = "pass") -> Any:
    """A tqdm bar over ``total`` rows when ``enabled``, else an object whose ``update``/``close`` do nothing."""
    if not isinstance(enabled, bool):
        raise TypeError(f"progress must be a bool, got {enabled!r}")
    if not enabled:
        return _Silent()
    try:
        from tqdm.auto import tqdm
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("progress=True needs tqdm: pip install tqdm") from error
    return tqdm(total=total, desc=desc, unit=unit)

