"""What one ``Executor.submit`` call costs rank 0, part by part, in one process (no MPI, no threads).

    python benchmarks/submit_parts.py

A scheduler over two made-up workers deals batches of 32 no-op calls; the
workers' side (running the calls, pickling their results) is done here too
but not timed. Each part is the CPU time per call (``time.thread_time``),
the least over 200 batches, with the garbage collector off: what the code
costs, not what the machine's load or the collector add (see
docs/ARCHITECTURE.md, "What a submitted call costs, and the limit").
"""

from __future__ import annotations

import concurrent.futures
import gc
import pickle
import time

from pydra._core import protocol
from pydra._core.events import Dispatch, RepliesReceived, Send
from pydra._core.scheduler import Scheduler, Settings
from pydra._core.transport import MpiTransport
from pydra.executor import _Call

BATCH = 32
BATCHES = 200


def noop(x: int) -> int:
    return x


def measure() -> dict[str, float]:
    """Seconds per call of each part, the least over the batches."""
    scheduler = Scheduler([1, 2], {0: "here", 1: "here", 2: "here"}, Settings(), pickle.dumps, 3, 0.0)
    scheduler.workers[1].inflight = 1 << 30  # never any room: the other worker gets every batch, as one message
    least: dict[str, float] = {}

    def note(part: str, started: float) -> None:
        least[part] = min(least.get(part, float("inf")), (time.thread_time() - started) / BATCH)

    for _ in range(BATCHES):
        scheduler.inflight_limit = BATCH  # (replies adapt it)
        started = time.thread_time()
        calls = [_Call(noop, (i,), {}, None) for i in range(BATCH)]  # no master: nothing here waits on a result
        note("make the future", started)
        for call in calls:
            scheduler.calls.add(call)
        started = time.thread_time()
        commands = next(i for i in scheduler.handle(Dispatch(0.0)) if type(i) is Send).commands
        note("deal the unit (set_running_or_notify_cancel included)", started)
        started = time.thread_time()
        protocol.encode_commands(commands)
        note("pickle its command", started)
        packed = [(c[1], True, *protocol.pack_value(c[2](*c[3])), 1e-6) for c in commands]
        wire = protocol.encode_replies(1, [(uid, ok, blob, seconds, buffers)
                                           for uid, ok, blob, buffers, seconds in packed])
        waiter = concurrent.futures._base._AllCompletedWaiter(BATCH, stop_on_exception=False)
        for call in calls:
            call._waiters.append(waiter)  # as concurrent.futures.wait() does to a future not yet done
        started = time.thread_time()
        _, replies = protocol.decode_replies(*wire)
        replies = MpiTransport._unpack_all(None, 1, replies)  # type: ignore[arg-type]
        note("unpickle its reply", started)
        started = time.thread_time()
        scheduler.handle(RepliesReceived(1, replies, 0.0))
        note("take the reply (set_result and wait's waiter included)", started)
        assert all(call.done() for call in calls)
    return least


def main() -> None:
    gc.disable()
    parts = measure()
    for part, seconds in parts.items():
        print(f"{1e6 * seconds:6.2f} us  {part}")
    print(f"{1e6 * sum(parts.values()):6.2f} us  in all, per call")


if __name__ == "__main__":
    main()
