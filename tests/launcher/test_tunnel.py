"""pydra.launcher.tunnel: the end of a tunnelled control connection, as mpiexec sees it."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from pydra.launcher import tunnel


def connected_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of a loopback TCP connection: ours (non-blocking, for the event loop) and mpiexec's."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        theirs = socket.create_connection(server.getsockname())
        ours, _ = server.accept()
    ours.setblocking(False)
    return ours, theirs


def mpiexec_signalling_after_end_of_file(sock: socket.socket, errors: list[BaseException]) -> None:
    """What Hydra does as ranks end: read the proxy's end of file, still write it a signal or two, then close."""
    try:
        sock.settimeout(30)
        assert sock.recv(100) == b""
        for _ in range(3):
            sock.sendall(b"SIGUSR1 " * 64)
            time.sleep(0.05)  # a reset would have come back by now
        sock.close()
    except BaseException as error:  # reported by the test
        errors.append(error)


def test_linger_takes_what_mpiexec_still_sends_and_returns_once_it_closes() -> None:
    ours, theirs = connected_pair()
    errors: list[BaseException] = []
    peer = threading.Thread(target=mpiexec_signalling_after_end_of_file, args=(theirs, errors))
    peer.start()
    started = time.monotonic()
    asyncio.run(tunnel.linger(ours, 60.0))
    peer.join()
    ours.close()
    assert errors == []
    assert time.monotonic() - started < 60.0  # it returned on mpiexec's close, not on the bound


def test_closing_at_once_instead_breaks_mpiexec_s_writes() -> None:
    """The failure linger prevents: mpiexec's write after our close meets a reset (its exit 255)."""
    ours, theirs = connected_pair()
    ours.shutdown(socket.SHUT_WR)
    theirs.settimeout(30)
    assert theirs.recv(100) == b""
    theirs.sendall(b"SIGUSR1 ")
    time.sleep(0.05)
    ours.close()  # with unread bytes: the kernel answers with a reset
    time.sleep(0.05)
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        for _ in range(3):
            theirs.sendall(b"SIGUSR1 ")
            time.sleep(0.05)
    theirs.close()


def test_linger_gives_up_at_its_bound_when_mpiexec_never_closes() -> None:
    ours, theirs = connected_pair()
    try:
        asyncio.run(tunnel.linger(ours, 0.2))
        theirs.settimeout(30)
        assert theirs.recv(100) == b""  # it did end its side
    finally:
        ours.close()
        theirs.close()
