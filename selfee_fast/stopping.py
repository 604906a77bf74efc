"""Ctrl-C and SIGTERM stop a run at its next safe boundary, with its state saved.

While `stop_requests()` is active, the first SIGINT or SIGTERM only asks the run to stop:
training finishes its step and writes a checkpoint, generation and judging finish their
batch, and `Interrupted` is raised from there. A second signal stops at once (Python's
KeyboardInterrupt); every file is written atomically, so the folder is still resumable.
"""

from __future__ import annotations

import contextlib
import signal
import threading

from .distributed import any_rank

_requested: list[str] = []  # the signal that asked, while a stop is pending
_active = [False]


class Interrupted(Exception):
    """The run stopped where it was asked to, at a boundary it can resume from."""


@contextlib.contextmanager
def stop_requests():
    """Turn SIGINT / SIGTERM into stop requests for the duration (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread() or _active[0]:
        yield
        return

    def ask(signum, frame):
        if _requested:  # the second signal: at once
            raise KeyboardInterrupt
        _requested.append(signal.Signals(signum).name)

    previous = {s: signal.signal(s, ask) for s in (signal.SIGINT, signal.SIGTERM)}
    _active[0] = True
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _active[0] = False
        _requested.clear()


def stop_requested() -> bool:
    return bool(_requested)


def stop_here_together(where: str) -> None:
    """`stop_here` where every process of a run reaches this boundary as often as the others: they
    compare requests first, so all of them stop here, or none."""
    stop_here(where, agreed=any_rank(stop_requested()))  # one process: its own request


def stop_here(where: str, *, agreed: bool | None = None) -> None:
    """Raise `Interrupted` if a stop was asked for; call at a boundary whose state is on disk.

    `agreed`: whether the processes of a run agreed to stop here (a signal had reached one of
    them when they compared). Only that decides then: a signal that arrives after the
    comparison waits for the next one, so no process ever stops while the others go on.
    """
    if agreed is False:
        return
    if _requested:
        raise Interrupted(f"stopped on {_requested[0]} {where}")
    if agreed:
        raise Interrupted(f"stopped with the run's other processes {where}")
