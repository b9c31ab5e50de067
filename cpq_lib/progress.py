"""Progress bars (tqdm.auto) that callers can switch off and ``TQDM_DISABLE=1`` silences everywhere."""

from __future__ import annotations

import os
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], enabled: bool = True, **kwargs) -> Iterable[T]:
    """``tqdm(iterable)`` unless switched off here or by ``TQDM_DISABLE=1`` (set by the notebook runner)."""
    if not enabled or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes"):
        kwargs["disable"] = True  # tqdm.notebook does not read TQDM_DISABLE itself
    return tqdm(iterable, **kwargs)
