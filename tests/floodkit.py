"""Attackers for the flood tests: one process, on loopback only, bounded in time, stopped by pid.

    python tests/floodkit.py slowloris --seconds 30 127.0.0.2:PORT ...   # from 127.0.0.66
    python tests/floodkit.py handshake --seconds 30 127.0.0.2:PORT ...   # from 127.0.0.77

``slowloris`` holds 300 connections (spread over the targets), each having sent 2 bytes, and opens
a new one the moment one is closed or refused: what a listener that evicts idle connections
faces.  ``handshake`` keeps 100 connections busy sending a well-formed first Noise message (a
random X25519 key in its frame, which costs the attacker nothing and the server a key pair, a
Diffie-Hellman and a signature) and hangs up as soon as the server answers or refuses.

The attacker prints ``attacking`` when its connections are first up and, when its time is up
(or on SIGTERM), one line of JSON: connections opened, refused (closed or reset before the
server sent a byte) and answered (the server sent its handshake reply: it did the crypto).
:func:`attacking` runs one in its own session and stops it by pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

from pydra.comm.admission import Policy

HERE = Path(__file__).resolve()
CONNECTIONS = {"slowloris": 300, "handshake": 100}
SOURCES = {"slowloris": "127.0.0.66", "handshake": "127.0.0.77"}  # each attacker's own address
_IP_BIND_ADDRESS_NO_PORT = 24  # Linux: pick the port at connect(), so 300 binds to one address do not run out


def _frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


class Attacker:
    """Keeps *count* connections going to *targets* from *source*, each behaving as *kind* says."""

    def __init__(self, kind: str, targets: list[tuple[str, int]], source: str, count: int) -> None:
        self.kind, self.targets, self.source, self.count = kind, targets, source, count
        self.selector = selectors.DefaultSelector()
        self.stats: Counter[str] = Counter()

    def open(self, slot: int) -> None:
        sock = socket.socket()
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
        try:
            sock.bind((self.source, 0))
            sock.connect_ex(self.targets[slot % len(self.targets)])
        except OSError:
            sock.close()
            self.stats["failed to open"] += 1
            return
        self.stats["connections"] += 1
        self.selector.register(sock, selectors.EVENT_WRITE, slot)

    def reopen(self, sock: socket.socket, slot: int, outcome: str) -> None:
        self.selector.unregister(sock)
        sock.close()
        self.stats[outcome] += 1
        self.open(slot)

    def on_event(self, sock: socket.socket, slot: int, events: int) -> None:
        if events & selectors.EVENT_WRITE:  # connected, or failed to
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                return self.reopen(sock, slot, "refused")
            payload = b"\x00\x00" if self.kind == "slowloris" else _frame(os.urandom(32))
            try:
                sock.send(payload)
            except OSError:
                return self.reopen(sock, slot, "refused")
            self.selector.modify(sock, selectors.EVENT_READ, slot)
            return None
        try:
            data = sock.recv(4096)
        except OSError:
            data = b""
        return self.reopen(sock, slot, "answered" if data else "refused")

    def run(self, seconds: float) -> Counter[str]:
        deadline = time.monotonic() + seconds
        for slot in range(self.count):
            self.open(slot)
        print("attacking", flush=True)
        while (left := deadline - time.monotonic()) > 0:
            for key, events in self.selector.select(min(left, 0.5)):
                self.on_event(key.fileobj, key.data, events)
        return self.stats


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=sorted(CONNECTIONS))
    parser.add_argument("targets", nargs="+", metavar="HOST:PORT")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--source", help="the address to attack from (default: the kind's, in SOURCES)")
    args = parser.parse_args(argv)
    targets = [(host, int(port)) for host, _, port in (t.rpartition(":") for t in args.targets)]
    assert all(host.startswith("127.") for host, _ in targets), "loopback only"
    attacker = Attacker(args.kind, targets, args.source or SOURCES[args.kind], CONNECTIONS[args.kind])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # the report below still runs
    try:
        attacker.run(min(args.seconds, 60.0))  # bounded to a minute whatever it is told
    finally:
        print(json.dumps(dict(attacker.stats)), flush=True)
    return 0


class Attack:
    """A running attacker (see :func:`attacking`); :attr:`stats` once it has stopped."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self.stats: dict[str, int] = {}

    def running(self) -> bool:
        return self.process.poll() is None


@contextlib.contextmanager
def attacking(kind: str, targets: list[str], seconds: float) -> Iterator[Attack]:
    """Run a *kind* attacker (from ``SOURCES[kind]``) against *targets* for at most *seconds*; stopped by pid on exit."""
    process = subprocess.Popen(
        [sys.executable, str(HERE), kind, *targets, "--seconds", str(seconds)],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )
    attack = Attack(process)
    try:
        assert process.stdout.readline().strip() == "attacking", "the attacker did not start"
        yield attack
    finally:
        try:
            output, _ = process.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
        lines = output.strip().splitlines()
        with contextlib.suppress(IndexError, ValueError):
            attack.stats = json.loads(lines[-1])


def stop(attack: Attack) -> None:
    """End *attack* now (SIGTERM to its process group): it still reports its counts."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(attack.process.pid, signal.SIGTERM)


def assert_attack_was_real_and_mostly_refused(stats: dict[str, int], kind: str, targets: int, seconds: float) -> None:
    """The attacker had all its connections up and was refused; a handshake flood got little crypto.

    With the default policy a penalty cycle answers one address at most min/noauth handshakes
    plus the per-source startups in flight, then refuses it for at least min seconds.
    Undefended, the same flood is answered thousands of times.
    """
    assert stats["connections"] >= CONNECTIONS[kind] and stats.get("refused", 0) > 0, stats
    if kind == "handshake":
        policy = Policy()
        cycles = 1 + seconds // policy.penalties.min
        per_cycle = policy.penalties.min / policy.penalties.noauth + policy.per_source
        assert stats.get("answered", 0) <= cycles * per_cycle * targets, stats


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
