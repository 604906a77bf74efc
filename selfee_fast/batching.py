"""Out of GPU memory on a batch: finish it in halves instead of losing the run.

Generation and judging pick their batch size up front; a long prompt or a long sample can
still exhaust a 24 GB card midway. `split_on_oom` retries such a batch as two halves
(recursively, down to one item) and says so in the log; results keep the items' order.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

Item = TypeVar("Item")
Result = TypeVar("Result")


def split_on_oom(
    run: Callable[[Sequence[Item], int], list[Result]],
    items: Sequence[Item],
    *,
    what: str,
    log=print,
    offset: int = 0,
) -> list[Result]:
    """`run(items, offset)`, or on torch.OutOfMemoryError the results of both halves, in order.

    `offset` is the position of `items[0]` in the original batch (a half's seed can depend
    on it). One item that does not fit re-raises: nothing smaller is left to try.
    """
    try:
        return run(items, offset)
    except torch.OutOfMemoryError:
        if len(items) <= 1:
            raise
    # Retried outside the except block: the failed attempt's traceback (and the tensors its
    # frames hold) is gone by now, so the halves get that memory back; gc.collect() frees
    # what reference cycles among those objects (caches, hooks) would otherwise keep.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    half = len(items) // 2
    log(f"{what}: out of GPU memory with {len(items)} items, retrying as {half} + {len(items) - half}")
    first = split_on_oom(run, items[:half], what=what, log=log, offset=offset)
    return first + split_on_oom(run, items[half:], what=what, log=log, offset=offset + half)
