"""pydra.config: every PYDRA_* setting in one table, each bad value refused in one line before any MPI starts."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from testkit import ROOT, mpi_environment, run_mpi, run_process

from pydra import config

BAD = {  # a value each setting must refuse, and the words of what it expects
    "PIPELINE": ("0", "a positive integer"),
    "PIPELINE_SECONDS": ("-1", "a positive number of seconds"),
    "BATCH_SECONDS": ("nan", "a positive number of seconds"),
    "MAX_BATCH": ("many", "a positive integer"),
    "IDLE_SLEEP": ("inf", "a positive number of seconds"),
    "SPIN_SECONDS": ("-0.1", "0 or more seconds"),
    "SHM_BYTES": ("-1", "0 or more bytes"),
    "HEARTBEAT": ("0", "a positive number of seconds"),
    "HEARTBEAT_TIMEOUT": ("abc", "a positive number of seconds"),
    "STOP_GRACE": ("-5", "a positive number of seconds"),
    "ISOLATE": ("maybe", "1 or 0"),
    "MAX_RESULT_BYTES": ("1.5", "a positive number of bytes"),
    "PROGRESS": ("bogus", "bar, lines or off"),
    "SEAL": ("sometimes", "1 or 0"),
    "THREADS": ("0", "auto, off or a positive integer"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_value_is_one_line_naming_the_variable_the_value_and_what_is_expected(name, monkeypatch) -> None:
    value, expected = BAD[name]
    monkeypatch.setenv(f"PYDRA_{name}", value)
    assert config.check_settings().startswith(f"PYDRA_{name}={value!r}: expected {expected}")
    with pytest.raises(ValueError, match=re.escape(f"PYDRA_{name}={value!r}")):
        config.setting(name)


def test_defaults_come_from_the_table_and_good_values_parse(monkeypatch) -> None:
    for name in config.SETTINGS:
        monkeypatch.delenv(f"PYDRA_{name}", raising=False)
    assert config.check_settings() is None
    assert config.setting("PIPELINE") == 2 and config.setting("ISOLATE") is False
    monkeypatch.setenv("PYDRA_PIPELINE", "5")
    monkeypatch.setenv("PYDRA_ISOLATE", "yes")
    assert (config.setting("PIPELINE"), config.setting("ISOLATE")) == (5, True)


@pytest.mark.parametrize("serializer, why", [
    ("no_such_module_xyz", "cannot import no_such_module_xyz: No module named 'no_such_module_xyz'"),
    ("json", "json.dumps(obj, protocol=5) and json.loads do not work as pickle's: TypeError:"),
    ("os", "the module os has no dumps() and loads()"),
])
def test_a_serializer_that_cannot_serve_is_refused_saying_why(serializer: str, why: str, monkeypatch) -> None:
    monkeypatch.setenv("PYDRA_SERIALIZER", serializer)
    assert config.check_settings().startswith(f"PYDRA_SERIALIZER={serializer!r}: {why}")
    for good in ("pickle", "cloudpickle"):
        monkeypatch.setenv("PYDRA_SERIALIZER", good)
        assert config.check_settings() is None and config.setting("SERIALIZER") == good


def test_a_heartbeat_timeout_must_outlast_two_heartbeats(monkeypatch) -> None:
    monkeypatch.setenv("PYDRA_HEARTBEAT", "1")
    monkeypatch.setenv("PYDRA_HEARTBEAT_TIMEOUT", "0.2")
    assert config.check_settings() == ("PYDRA_HEARTBEAT_TIMEOUT=0.2 must be more than twice PYDRA_HEARTBEAT=1:"
                                       " rank 0 would declare workers lost between two of their heartbeats")
    monkeypatch.setenv("PYDRA_HEARTBEAT_TIMEOUT", "2.5")
    assert config.check_settings() is None


def test_an_unknown_pydra_variable_is_a_typo_caught(monkeypatch) -> None:
    monkeypatch.setenv("PYDRA_PIPLINE", "3")
    assert config.check_settings() == "PYDRA_PIPLINE: no such setting; did you mean PYDRA_PIPELINE?"
    monkeypatch.delenv("PYDRA_PIPLINE")
    monkeypatch.setenv("PYDRA_XYZZY", "3")  # nothing close: the whole list
    assert config.check_settings().startswith("PYDRA_XYZZY: no such setting (known: PYDRA_")


def test_the_readme_lists_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    listed = set(re.findall(r"`PYDRA_([A-Z_]+)`", readme))
    assert set(config.SETTINGS) <= listed, set(config.SETTINGS) - listed


def _pydra(*args: str, ranks: int | None = None, **env: str):
    environment = mpi_environment()
    environment.update(env)
    argv = ["-m", "pydra", "run", *args]
    if ranks is None:
        return run_process([sys.executable, *argv], env=environment, timeout=120)
    return run_mpi(ranks, argv, env=environment, timeout=120)


def test_pydra_run_refuses_a_bad_setting_before_starting_mpiexec() -> None:
    finished = _pydra("-n", "3", "examples/pi.py:estimate_pi", "100", PYDRA_HEARTBEAT_TIMEOUT="abc")
    assert finished.returncode == 2
    assert finished.stderr.strip().splitlines() == [
        "pydra: error: PYDRA_HEARTBEAT_TIMEOUT='abc': expected a positive number of seconds"]


def test_pydra_run_refuses_a_serializer_it_cannot_import_before_starting_mpiexec() -> None:
    finished = _pydra("-n", "3", "examples/pi.py:estimate_pi", "100", PYDRA_SERIALIZER="no_such_module_xyz")
    assert finished.returncode == 2
    assert finished.stderr.strip().splitlines() == [
        "pydra: error: PYDRA_SERIALIZER='no_such_module_xyz': cannot import no_such_module_xyz:"
        " No module named 'no_such_module_xyz'"]


@pytest.mark.smoke  # (Open MPI stops the ranks once one exits non-zero: rank 0's line must get out first)
def test_under_your_own_mpiexec_one_rank_says_it() -> None:
    finished = _pydra("examples/pi.py:estimate_pi", "100", ranks=2, PYDRA_PROGRESS="bogus")
    assert finished.returncode != 0
    assert finished.stderr.count("PYDRA_PROGRESS='bogus': expected bar, lines or off") == 1


@pytest.mark.parametrize("output, why", [(".", "is a directory"), ("/no/such/dir/out.json", "no such directory")])
def test_output_is_checked_before_the_job_runs(output: str, why: str, tmp_path: Path) -> None:
    finished = _pydra("examples/pi.py:estimate_pi", "100", "--output", output, "--run-dir", str(tmp_path / "run"))
    assert finished.returncode == 2 and why in finished.stderr
    assert "finished" not in finished.stdout + finished.stderr and not (tmp_path / "run").exists()
