"""Progress bars for long steps; every caller decides whether to show them."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], description: str, enabled: bool = True,
             total: int | None = None) -> Iterator[T]:
    """Wrap ``items`` in a tqdm bar on stderr when ``enabled``; otherwise pass them through."""
    if not enabled:
        return iter(items)
    return iter(tqdm(items, desc=description, total=total, leave=False, dynamic_ncols=True))
