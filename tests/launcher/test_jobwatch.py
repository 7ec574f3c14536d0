"""``JobWatch``: what the launcher makes of mpiexec's stderr, fed in chunks as a pipe gives them."""

from __future__ import annotations

import pytest

from pydra.launcher.jobwatch import JobWatch


def feed(watch: JobWatch, *chunks: bytes) -> bytes:
    return b"".join(watch(chunk) for chunk in chunks)


def test_a_start_up_loss_in_two_pieces_ends_the_job() -> None:
    watch = JobWatch()
    relayed = feed(watch, b"pydra: rank 3 (pid 9) was killed by SIGKILL during start-up, before it had", b" started MPI;",
                   b" ending the job", b"\n")
    assert watch.ends_job
    assert relayed.endswith(b"ending the job\n")


@pytest.mark.parametrize("line", [
    b"pydra: rank 3 (pid 9) exited with status 1 during start-up, in MPI_Init; ending the job\n",
    b"pydra: ranks 2, 5 lost during start-up, in the session's first collective; ending the job\n",
    b"PRTE has lost communication with a remote daemon.\n",
])
def test_every_start_up_loss_line_ends_the_job(line: bytes) -> None:
    watch = JobWatch()
    feed(watch, line)
    assert watch.ends_job


def test_a_tasks_own_line_that_ends_alike_does_not_end_the_job() -> None:
    watch = JobWatch()
    feed(watch, b"checkpoint: disk full; ending the job\n", b"pydra: rank 3 said: cannot go on; ending the job\n")
    assert not watch.ends_job


def test_the_job_goes_on_without_a_sign() -> None:
    watch = JobWatch()
    assert feed(watch, b"pydra: lost worker rank 3 on vm; rescheduling its work\n", b"[mpiexec@vm] a note\n") == \
        b"pydra: lost worker rank 3 on vm; rescheduling its work\n[mpiexec@vm] a note\n"
    assert not watch.ends_job and not watch.stopping


def test_once_stopping_hydra_lines_are_dropped_even_written_in_pieces() -> None:
    watch = JobWatch()
    assert feed(watch, b"pydra: lost worker rank 3") == b"pydra: lost worker rank 3"  # passed on as it comes
    watch.stopping = True
    relayed = feed(watch, b"; rescheduling\n", b"[mpiexec@vm] ", b"HYDU_sock_write: write error\n",
                   b"pydra: interrupted; resume with: pydra launch -f h --resume d\n", b"[mpiexec@vm] main: error\n")
    assert relayed == b"; rescheduling\npydra: interrupted; resume with: pydra launch -f h --resume d\n"


def test_the_resume_line_comes_from_rank_0s_first_when_its_last_is_lost(capsys: pytest.CaptureFixture) -> None:
    watch = JobWatch()
    watch.stopping = True  # (wait_for's doing, on Ctrl-C)
    assert watch.conclude(130) == 130
    assert capsys.readouterr().err == ""  # (no journal: nothing to resume)
    feed(watch, b"pydra: run directory /r (resume with: pydra launch -f hosts -n 4 --resume /r)", b"\n")
    assert watch.conclude(0) == 0 and watch.conclude(1) == 1
    assert capsys.readouterr().err == ""  # rank 0's own end: it said how the job ended
    assert watch.conclude(130) == 130
    assert capsys.readouterr().err == "pydra: interrupted; resume with: pydra launch -f hosts -n 4 --resume /r\n"
    feed(watch, b"pydra: interrupted; resume with: pydra launch -f hosts -n 4 --resume /r\n")
    assert watch.conclude(130) == 130
    assert capsys.readouterr().err == ""  # rank 0 said it


def test_a_job_that_ended_unfinished_and_unsaid_is_not_called_interrupted(capsys: pytest.CaptureFixture) -> None:
    """A host's agent stopped mid-job: Hydra fails (255) and rank 0 says nothing. It was "interrupted"."""
    watch = JobWatch()
    feed(watch, b"pydra: run directory /r (resume with: pydra launch -f hosts -n 4 --resume /r)\n")
    assert watch.conclude(255) == 1
    assert capsys.readouterr().err == (
        "pydra: the job ended before it finished (mpiexec's status 255: rank 0, or a host's agent or MPI proxy, "
        "was lost); resume with: pydra launch -f hosts -n 4 --resume /r\n")
    assert watch.conclude(137) == 137 and "status 137" in capsys.readouterr().err  # rank 0 killed


def test_a_start_up_loss_ends_the_launcher_with_1_whatever_mpiexec_says() -> None:
    watch = JobWatch()
    feed(watch, b"pydra: rank 2 (pid 9) was killed by SIGKILL during start-up, while the session started; "
                b"ending the job\n")
    assert [watch.conclude(status) for status in (0, 9, 137, 255)] == [1, 1, 1, 1]


def test_a_lost_daemon_ends_the_job_with_a_line_saying_how_to_resume(capsys: pytest.CaptureFixture) -> None:
    """prterun (ULFM) exits 0 for a job it stopped over a lost host daemon; its paragraph names no run to resume."""
    watch = JobWatch()
    feed(watch, b"pydra: run directory /r (resume with: pydra launch -f hosts -n 4 --resume /r)\n",
         b"PRTE has lost communication with a remote daemon.\n")
    assert watch.conclude(0) == 1
    assert capsys.readouterr().err == ("pydra: the job ended before it finished (a host's MPI daemon was lost); "
                                       "resume with: pydra launch -f hosts -n 4 --resume /r\n")
