"""``pydra shell -c status`` against a ``pydra serve`` cluster whose admin endpoint is flooded (issue 14, item 3).

As tests/launcher/test_launch_floods.py does for the agents: one attacker process from an address of its own (floodkit.SOURCES), bounded
in time and stopped by pid, and shell commands that must succeed while it runs; an admin channel
opened before the flood must keep working through it; rank 0's log must stay small and say how
many lines it suppressed.  The times are measured by benchmarks/floods.py, not asserted here.
"""

from __future__ import annotations

import json

import pytest
from clusterkit import Cluster

from floodkit import SOURCES, assert_attack_was_real_and_mostly_refused, attacking, stop
from pydra.control import ControlClient
from pydra.launcher import keys

ATTACK_SECONDS = 25
LOG_BOUND = 32 * 1024  # bytes rank 0 may log during an attack


@pytest.mark.parametrize("kind", ["slowloris", "handshake"])
def test_shell_status_succeeds_and_an_open_admin_channel_survives_a_flood(cluster: Cluster, kind: str) -> None:
    details = json.loads(cluster.connection_file.read_text())
    target = f"{details['address']}:{details['port']}"
    before = len(cluster.log.read_bytes())
    admin = ControlClient(cluster.connection_file, keys.load_private_key(cluster.identity))  # before the flood
    try:
        with attacking(kind, [target], ATTACK_SECONDS) as attack:
            for _ in range(3):
                assert cluster.call("status")["ranks"] == 4
                assert admin.call("status")["ranks"] == 4  # the channel opened before is still served
            assert attack.running(), "the attack ended before the shell did: nothing was shown"
            # Let the attack run into a second log interval, so its count of suppressed lines is written.
            attack.process.wait(timeout=ATTACK_SECONDS + 30)
        assert admin.call("status")["ranks"] == 4
    finally:
        admin.close()
        stop(attack)
    assert_attack_was_real_and_mostly_refused(attack.stats, kind, 1, ATTACK_SECONDS)
    log = cluster.log.read_bytes()[before:].decode(errors="replace")
    assert len(log) < LOG_BOUND, f"rank 0 logged {len(log)} bytes:\n{log[:3000]}"
    assert "suppressed" in log and f"refusing {SOURCES[kind]}" in log, log
