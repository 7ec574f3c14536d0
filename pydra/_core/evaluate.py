"""Walking a task tree on rank 0: which parts run where.

A serial subtree (a Task, or a Sequence of serial tasks) is shipped whole to
one worker as a single unit. Rank 0 itself only walks the parallel structure:
a Sequence with parallel children runs its children one after another; a
Parallel over a serial task becomes one :class:`ChunkStream` whose chunks
spread over the workers; a Parallel over a parallel subtree walks that subtree
for several items at once; a MapReduce maps in chunks then shuffles among the
workers holding its pairs; a gang task waits for enough idle workers.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Iterable

from pydra._core import protocol
from pydra._core.master import ChunkStream, GangRequest, Master
from pydra.tasks import GangTask, MapReduce, Parallel, Sequence, Task


async def evaluate(master: Master, node: Task, args: tuple) -> Any:
    """The result of *node* called with *args*, computed on the workers of *master*."""
    if node.is_serial:
        (value,) = await run_chunks(master, master.define(node), [args], chunksize=1, star=True)
        return value
    if isinstance(node, Sequence):
        value = await evaluate(master, node.children[0], args)
        for child in node.children[1:]:
            value = await evaluate(master, child, (value,))
        return value
    if isinstance(node, Parallel):
        items = node.items_for(args)
        if node.task.is_serial:
            return await run_chunks(master, master.define(node.task), items, node.chunksize)
        return await gather_in_order(lambda item: evaluate(master, node.task, (item,)), items, limit=4 * len(master.workers))
    if isinstance(node, MapReduce):
        return await map_reduce(master, node, node.items_for(args))
    if isinstance(node, GangTask):
        count = node.ranks or len(master.workers)
        tid = master.define(node)
        (value, *_) = await run_gang(master, lambda uid, members: (protocol.GANG, uid, tid, members, args), count)
        return value
    raise TypeError(f"cannot run {type(node).__name__}: not a serial Task and not a Pydra container")


def run_chunks(master: Master, tid: int, items: Iterable[Any], chunksize: int | None, star: bool = False) -> Awaitable[list]:
    """Apply definition *tid* to every item on the workers; the list of results in order."""
    return _stream(master, lambda uid, chunk: (protocol.MAP, uid, tid, chunk, star), items, chunksize, _ordered_results)


async def map_reduce(master: Master, job: MapReduce, items: Iterable[Any]) -> dict:
    """Map *items* in chunks on the workers, then shuffle and reduce among the ranks holding pairs."""
    tid = master.define(job)
    run = master.new_run_id()  # the same job may be running several times at once
    holders = await _stream(master, lambda uid, chunk: (protocol.MR_MAP, uid, tid, chunk, run), items, None, _ranks_used)
    if not holders:
        return {}
    members = sorted(holders)
    parts = await run_gang(master, lambda uid, ranks: (protocol.MR_REDUCE, uid, tid, ranks, run), len(members), members)
    merged: dict = {}
    for part in parts:
        merged.update(part)
    try:
        return dict(sorted(merged.items()))
    except TypeError:  # keys of mixed types: keep the shuffle's order
        return merged


def run_gang(master: Master, make_command: Callable, count: int, members: list | None = None) -> Awaitable[list]:
    """Start a gang of *count* workers (or exactly *members*); the list of their replies."""
    future = master.loop.create_future()

    def finish(values: list | None, error: BaseException | None) -> None:
        if not future.done():
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(values)

    master.add_gang(GangRequest(make_command, finish, count, members))
    return future


async def gather_in_order(walk: Callable[[Any], Awaitable[Any]], items: Iterable[Any], limit: int) -> list:
    """``[await walk(item) for item in items]`` with up to *limit* walks at once, items pulled lazily."""
    results: dict[int, Any] = {}
    running: set[asyncio.Task] = set()
    index_of: dict[asyncio.Task, int] = {}
    iterator = enumerate(items)
    exhausted = False
    try:
        while True:
            while not exhausted and len(running) < max(1, limit):
                try:
                    index, item = next(iterator)
                except StopIteration:
                    exhausted = True
                    break
                task = asyncio.ensure_future(walk(item))
                running.add(task)
                index_of[task] = index
            if not running:
                return [results[i] for i in range(len(results))]
            done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                results[index_of.pop(task)] = task.result()  # re-raises the first failure
    finally:
        for task in running:
            task.cancel()


# How a stream's successful chunks are collected: a pair (on_chunk, finish).


def _ordered_results() -> tuple[Callable, Callable]:
    chunks: dict[int, list] = {}

    def on_chunk(index: int, values: list, rank: int) -> None:
        chunks[index] = values

    def finish() -> list:
        ordered: list = []
        for index in range(len(chunks)):
            ordered.extend(chunks.pop(index))
        return ordered

    return on_chunk, finish


def _ranks_used() -> tuple[Callable, Callable]:
    ranks: set[int] = set()

    def on_chunk(index: int, count: int, rank: int) -> None:
        ranks.add(rank)

    return on_chunk, lambda: ranks


def _stream(master: Master, make_command: Callable, items: Iterable[Any], chunksize: int | None, collector: Callable) -> Awaitable:
    future = master.loop.create_future()
    on_chunk, finish = collector()

    def on_failure(error: BaseException, index: int) -> None:
        stream.abandon()  # a tree node fails whole: the chunks before the failure are not wanted either
        if not future.done():
            future.set_exception(error)

    def on_done() -> None:
        if not future.done():
            future.set_result(finish())

    stream = ChunkStream(master, make_command, items, chunksize, on_chunk, on_failure, on_done)
    master.add_source(stream)
    return future
