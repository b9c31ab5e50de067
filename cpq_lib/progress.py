"""Progress bars (tqdm.auto) that callers can switch off and ``TQDM_DISABLE=1`` silences everywhere."""

from __future__ import annotations

from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], enabled: bool = True, **kwargs) -> Iterable[T]:
    """``tqdm(iterable)`` when enabled; passing no ``disable`` lets tqdm read ``TQDM_DISABLE``."""
    if not enabled:
        kwargs["disable"] = True
    return tqdm(iterable, **kwargs)
