"""When a worker sends the replies of one commands message; see tests/core/test_worker.py.

    python tests/core/jobs/job_worker_replies.py

One process (MPI's singleton): a WorkerLoop is fed commands messages
directly, its replies are recorded instead of sent, and the hold of its
reply buffer is long enough never to expire, so only the rules remain. Prints
``RESULT {case: [replies per message sent, ...]}``.
"""

from __future__ import annotations

import json
import operator

from mpi4py import MPI

from pydra._core import protocol
from pydra._core.worker import ReplyBuffer, WorkerLoop


def batches(messages: list[list[tuple]]) -> list[int]:
    """Serve *messages* (then STOP); how many replies went in each REPLIES message."""
    loop = WorkerLoop(MPI.COMM_SELF, "here")
    sent: list[int] = []
    loop.replies = ReplyBuffer(lambda packed: sent.append(len(packed)), hold=3600.0)
    queue = [*messages, [(protocol.STOP, 0, False)]]
    loop._next_commands = lambda: queue.pop(0)
    loop._serve()
    return sent[:-1]  # (the last is STOP's own reply)


def calls(first_uid: int, count: int, fail_at: int | None = None) -> list[tuple]:
    return [(protocol.CALL, uid, operator.truediv, (1, 0 if uid == fail_at else 1), {})
            for uid in range(first_uid, first_uid + count)]


def main() -> None:
    print("RESULT " + json.dumps({
        "ten": batches([calls(1, 10)]),
        "one": batches([calls(1, 1)]),
        "seven_then_two": batches([calls(1, 7), calls(8, 2)]),
        "failure_at_third": batches([calls(1, 10, fail_at=3)]),
    }), flush=True)


if __name__ == "__main__":
    main()
