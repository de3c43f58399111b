"""Coarse-grained threads for torch work: one item per core, torch's own thread count 1."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence, TypeVar

__all__ = ["thread_map"]

T = TypeVar("T")
R = TypeVar("R")


def thread_map(fn: Callable[[T], R], items: Sequence[T], workers: int,
               name: str = "autobits") -> Iterator[R]:
    """``fn`` over ``items`` (results in order) on ``workers`` threads, torch's own thread
    count 1 meanwhile (restored when the iterator finishes or is closed).

    One item per core beats splitting every op of one item over the cores, all the more on
    a shared machine, where each of torch's parallel regions waits for its slowest thread.
    One worker (or one item) runs ``fn`` in the calling thread, torch's threads untouched.
    """
    import torch

    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(min(workers, len(items)), thread_name_prefix=name) as pool:
            yield from pool.map(fn, items)
    finally:
        torch.set_num_threads(threads)
