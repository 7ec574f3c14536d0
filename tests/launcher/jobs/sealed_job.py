"""A job for the sealing tests: its source, inputs and result carry marker strings no recording may hold.

Each unit reports that it started (a file in ``$SEALED_DIR``, which the
test passes with ``--env SEALED_DIR``), waits until the test writes ``go``
there, and returns a result built at run time,
so that the result's marker appears nowhere in this source.
"""

import hashlib
import os
import time

import pydra

SOURCE_MARKER = "SOURCE-MARKER-0d7e31f2c4"  # travels only as the shipped task source


class Sealed(pydra.Task):
    def work(self, item: str) -> str:
        directory = os.environ["SEALED_DIR"]
        open(os.path.join(directory, f"started-{item}"), "w").close()
        deadline = time.monotonic() + 120
        while not os.path.exists(os.path.join(directory, "go")) and time.monotonic() < deadline:
            time.sleep(0.05)
        named = os.environ.get("NAMED_SECRET", "")
        # What the ranks saw of the environment, told without the values themselves.
        seen = f"named={hashlib.sha256(named.encode()).hexdigest()[:12]} exported={'EXPORTED_SECRET' in os.environ}"
        return ("RESULT" + "-MARKER-" + item[::-1]) * 20 + " " + seen + " " + SOURCE_MARKER[:6]


def sealed() -> pydra.Parallel:
    """One unit per input, all of them on the workers at once."""
    return pydra.Parallel(Sealed(), chunksize=1)
