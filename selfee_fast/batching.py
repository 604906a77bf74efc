"""Out of GPU memory on a batch: finish it in smaller pieces instead of losing the run.

Generation and judging pick their batch size up front; a long prompt or a long sample can
still exhaust a 24 GB card midway. `split_on_oom` retries such a batch as two halves
(recursively, down to one item) and says so in the log; results keep the items' order. A
`BatchLimit` shared across the batches of one stage remembers the size that fit, so later
batches start there instead of running out of memory again.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

Item = TypeVar("Item")
Result = TypeVar("Result")


def is_out_of_memory(error: BaseException) -> bool:
    """The caching allocator's OutOfMemoryError, or a library that failed to get its workspace."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and ("CUBLAS_STATUS_ALLOC_FAILED" in message or "out of memory" in message)


class BatchLimit:
    """The most items one call may take (None: no limit yet); lowered by each out-of-memory split."""

    def __init__(self) -> None:
        self.items: int | None = None


def split_on_oom(
    run: Callable[[Sequence[Item], int], list[Result]],
    items: Sequence[Item],
    *,
    what: str,
    log=print,
    limit: BatchLimit | None = None,
    offset: int = 0,
) -> list[Result]:
    """`run(items, offset)`, or when it runs out of GPU memory the results of both halves, in order.

    `offset` is the position of `items[0]` in the original batch (a piece's seed can depend
    on it). One item that does not fit re-raises: nothing smaller is left to try. With a
    `limit`, items beyond what fitted before are cut into pieces of that size up front.
    """
    if limit is not None and limit.items is not None and len(items) > limit.items:
        results = []
        for start in range(0, len(items), limit.items):
            piece = items[start : start + limit.items]
            results += split_on_oom(run, piece, what=what, log=log, limit=limit, offset=offset + start)
        return results
    try:
        return run(items, offset)
    except RuntimeError as error:  # torch.OutOfMemoryError is one
        if len(items) <= 1 or not is_out_of_memory(error):
            raise
    # Retried outside the except block: the failed attempt's traceback (and the tensors its
    # frames hold) is gone by now; gc.collect() also frees what sits in reference cycles
    # (peft/transformers objects do), so the halves get that memory back.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    half = len(items) // 2
    log(f"{what}: out of GPU memory with {len(items)} items, retrying as {half} + {len(items) - half}")
    if limit is not None:
        limit.items = len(items) - half
    first = split_on_oom(run, items[:half], what=what, log=log, limit=limit, offset=offset)
    return first + split_on_oom(run, items[half:], what=what, log=log, limit=limit, offset=offset + half)
