"""``pydra launch`` across three agents while an attacker floods them (issue 14, item 3).

One attacker process at a time, from an address of its own (floodkit.SOURCES), for a bounded time,
stopped by pid: a reconnecting slowloris (300 connections of 2 bytes each, a new one as soon as
one is closed) and a handshake flood (valid first Noise messages, hanging up on the answer).
While it runs, a launch across the three agents must succeed; afterwards each agent's log must
be small and say how many lines it suppressed.  How long the launch takes, attacked or not, is
measured by benchmarks/floods.py, not asserted here.
"""

from __future__ import annotations

import pytest

from agentkit import HOSTS, Cluster
from floodkit import SOURCES, assert_attack_was_real_and_mostly_refused, attacking

ATTACK_SECONDS = 25  # long enough for a launch under load and for the 10 s log summary
LOG_BOUND = 32 * 1024  # bytes an agent may log during an attack (a few lines per 10 s and counts)


@pytest.mark.parametrize("kind", ["slowloris", "handshake"])
def test_a_launch_across_three_agents_succeeds_during_a_flood(cluster: Cluster, kind: str) -> None:
    targets = [f"{host}:{cluster.ports[host]}" for host in HOSTS]
    before = {host: len(cluster.log(host)) for host in HOSTS}
    with attacking(kind, targets, ATTACK_SECONDS) as attack:
        done = cluster.launch("-n", "4", "--accept-new", "examples/pipeline.py:pipeline", "3")
        assert attack.running(), "the attack ended before the launch did: nothing was shown"
    assert done.returncode == 0, done.stderr
    assert "finished" in done.stdout
    assert_attack_was_real_and_mostly_refused(attack.stats, kind, len(targets), ATTACK_SECONDS)
    for host in HOSTS:
        log = cluster.log(host)[before[host]:]
        assert len(log.encode()) < LOG_BOUND, f"{host} logged {len(log)} bytes:\n{log[:3000]}"
        assert "suppressed" in log and f"refusing {SOURCES[kind]}" in log, log
        assert log.count("accepted SHA256:") == 2  # the ping and the MPI proxy: nothing was evicted
