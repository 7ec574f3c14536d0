"""numpy arrays as arguments and results, under real mpiexec: exact, and their buffers out of band.

Proves, with tests/core/jobs/job_payload.py, on 2 and 3 ranks, in one
process, sealed, and with each serializer: every value of
``job_payload.values()`` (large and small arrays, Fortran order,
non-contiguous and transposed views, 0-size arrays, big-endian, complex,
structured, datetime and object dtypes, read-only arrays, a bytearray,
``bytes`` large and small, arrays nested in dicts, lists and tuples) reaches
the worker and comes back with the same type, dtype, shape, memory order,
writability and bytes, through ``Executor.submit``, ``Executor.map`` and a
GangTask's arguments and result; and every large contiguous array travels
out of band unless the serializer cannot do that: through a slot of the
sender's shared memory between ranks of one host (pydra.comm.shm), else
into a receive buffer of its own. A worker's arena that rank 0's kept
results fill sends the rest by MPI, and shares again once they are
dropped. One array over 2 GiB goes there and back (slow; skipped with less
than 8 GiB free).
"""

from __future__ import annotations

import json
import secrets
import sys

import pytest
from mpijobs import IN_PROCESS, JOBS, mpi_environment, rank_params, result_line, run_script
from testkit import run_process

def run_exact(ranks: int, **env: str):
    finished = run_script(ranks, "job_payload.py", ["exact"], timeout=180, env=dict(mpi_environment(), **env))
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "dropped" not in finished.stderr, finished.stderr[-3000:]
    return result_line(finished)


def assert_exact(result: dict, unlike: frozenset = frozenset()) -> None:
    """Every value (but those named *unlike*) arrived, and came back, exactly as it left rank 0, by every path."""
    expected, report = result["expected"], result["report"]
    for name, original in expected.items():
        if name in unlike:
            continue
        there, back = report[name]["submit"]
        assert there == original, f"{name}: the worker got something else"
        assert back == original, f"{name}: rank 0 got something else back"
        assert report[name]["map"] == [original, original], f"{name} in a map chunk"
    seen, back = report["nested"]["gang"]
    assert seen == [expected["nested"]] * result["members"] and back == expected["nested"]
    assert report["nested"]["same object twice"]


def assert_out_of_band(result: dict, how: str) -> None:
    """Each large array that exposes its buffer arrived *how*, both ways: "shared" (a slot of the sender's shared
    memory: ranks of one host), "buffer" (an MPI receive buffer of its own) or "pickle" (not out of band).

    A strided view is copied into the pickle on its way there and arrives
    contiguous, so it comes back out of band; numpy copies datetime arrays
    into the pickle both ways.
    """
    report, exposes = result["report"], result["exposes buffer"]
    for name, flags in exposes.items():
        assert report[name]["there"] == [how if flag else "pickle" for flag in flags], name
        assert report[name]["back"] == [how if name != "datetime64" else "pickle"] * len(flags), name
    # Not vacuous: these hold large arrays that expose their buffer (a transposed one in Fortran order)...
    assert all(any(exposes[name]) for name in (
        "float64-1MiB", "uint8-64KiB", "fortran-float32", "transposed", "4d-float32", "complex128", "structured",
        "readonly", "nested"))
    # ... these do not: a strided view, and an array one byte under the 64 KiB threshold is not even counted.
    assert exposes["non-contiguous"] == [False] and exposes["uint8-64KiB-less-1"] == []


@pytest.mark.parametrize("ranks", rank_params(2, 3))
def test_arrays_arrive_exact_and_out_of_band(ranks: int) -> None:
    result = run_exact(ranks)
    assert_exact(result)
    assert_out_of_band(result, "shared")


def test_arrays_go_by_mpi_without_shared_memory() -> None:
    """PYDRA_SHM_BYTES=0: every buffer is an MPI message of its own, into a receive buffer of its own."""
    result = run_exact(3, PYDRA_SHM_BYTES="0")
    assert_exact(result)
    assert_out_of_band(result, "buffer")


def test_arrays_in_one_process() -> None:
    """No workers: rank 0 runs the units itself (nothing is pickled) with the same results."""
    assert_exact(run_exact(IN_PROCESS))


def test_sealed_arrays_arrive_exact() -> None:
    """With a job key every part is sealed and opened into a buffer of its own (never shared memory)."""
    result = run_exact(3, PYDRA_JOB_KEY=secrets.token_hex(32))
    assert_exact(result)
    assert_out_of_band(result, "buffer")


@pytest.mark.parametrize("serializer, how, unlike", [
    ("cloudpickle", "shared", frozenset()),
    # dill pickles numpy arrays with a reducer of its own, with or without Pydra: into the pickle, and
    # big-endian ones come out native (equal values, another dtype), read-only ones writable.
    ("dill", "pickle", frozenset({"big-endian", "readonly"})),
    ("inband_serializer", "pickle", frozenset()),  # tests/core/jobs/inband_serializer.py: no out-of-band arguments
])
def test_serializers(serializer: str, how: str, unlike: frozenset) -> None:
    pytest.importorskip(serializer)
    result = run_exact(2, PYDRA_SERIALIZER=serializer)
    assert_exact(result, unlike)
    assert_out_of_band(result, how)


def free_bytes() -> int:
    """MemAvailable from /proc/meminfo (0 where there is none)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@pytest.mark.slow
@pytest.mark.smoke  # (Open MPI 5.0 is MPI-3: past a C int of bytes, MPI takes no count of MPI.BYTE)
@pytest.mark.skipif(free_bytes() < 8 << 30, reason="needs 8 GiB of free memory (three 2 GiB copies)")
def test_an_array_over_2_gib_goes_there_and_back() -> None:
    # (Making and comparing 2 GiB holds rank 0's GIL, over 10 s beside busy processes: heartbeats
    # are not what this tests, so they get more patience than the default 10 s.)
    env = dict(mpi_environment(), PYDRA_MAX_RESULT_BYTES=str(3 << 30), PYDRA_HEARTBEAT_TIMEOUT="60")
    finished = run_script(2, "job_payload.py", ["huge"], timeout=600, env=env)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert result_line(finished) == {"bytes": 2**31 + 2**20, "right there": True, "back equal": True}


def test_results_kept_past_the_arena_go_by_mpi_and_its_slots_come_back() -> None:
    """A worker's arena of 4 MiB holds four 1 MiB results that rank 0 keeps; the next eight go by MPI. Once rank 0
    drops them, the worker hears so with the next command and shares again. Every result is exact."""
    env = dict(mpi_environment(), PYDRA_SHM_BYTES=str(4 << 20))
    finished = run_script(2, "job_payload.py", ["arena"], timeout=120, env=env)
    assert finished.returncode == 0, finished.stderr[-3000:]
    result = result_line(finished)
    assert result["kept"] == ["shared"] * 4 + ["buffer"] * 8 and result["kept exact"]
    assert result["worker while kept"] == {"peers": 1, "shared": 4, "by_mpi": 8, "bytes_held": 4 << 20,
                                           "slots_held": 4}
    assert result["later"] == ["shared"] * 3 and result["later exact"]
    assert result["worker after"]["slots_held"] == 3  # the three later results, still held on rank 0
    assert result["rank 0"] == {"peers": 1, "shared": 15, "by_mpi": 0, "bytes_held": 0, "slots_held": 0}


def test_arrays_a_dead_worker_sent_stay_whole(tmp_path) -> None:
    """The arrays rank 0 got from a worker live in that worker's shared memory: they outlive it."""
    output = tmp_path / "result.json"
    env = dict(mpi_environment(), MARKS=str(tmp_path))
    items = [str(i) for i in range(24)]
    finished = run_process([sys.executable, "-m", "pydra", "run", "-n", "3", "--no-journal", "-o", str(output),
                            f"{JOBS / 'job_payload.py'}:one_worker_dies", *items], timeout=120, env=env)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert (tmp_path / "died").exists(), "the worker that made item 0 never came to kill itself"
    assert len((tmp_path / "first").read_text().split()) == 1  # item 0's array is the one the dead worker made
    assert "lost worker rank" in finished.stderr
    assert json.loads(output.read_text()) == [[float(i)] * (1 << 17) for i in range(24)]
