"""``pydra node``: the agent that runs on every host and starts processes for authorized launchers.

It listens for channels with purpose ``launch`` (see docs/PROTOCOL.md),
checks each client key against ``authorized_keys`` (role ``launch``,
``from=``, ``expiry-time=``), logs every accepted and refused connection with
the key's fingerprint and the reason for a refusal, and serves one exec or
ping request per connection (:func:`pydra.launcher.remote.server_exec`).

It logs every line of ``authorized_keys`` it skips, with ``file:line`` and
why, at start and whenever the file changes. On ``SIGHUP`` it reloads the
file and stops the running launches of keys it no longer allows
(:mod:`pydra.launcher.sessions`). It refuses a host key or an
``authorized_keys`` that another user could have written (strict modes,
:mod:`pydra.strictmodes`): at start by exiting with one line, later by
refusing every connection until the file is fixed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

from pydra import strictmodes
from pydra.comm.aio import serve_channel
from pydra.config import check_settings
from pydra.launcher import authorized, keys, nodecheck
from pydra.launcher.hostfile import DEFAULT_AGENT_PORT
from pydra.launcher.remote import server_exec
from pydra.launcher.sessions import Sessions
from pydra.strictmodes import StrictModeError

log = logging.getLogger("pydra.node")

PURPOSE = "launch"


def parse_address(text: str) -> tuple[str, int]:
    """``ADDR:PORT``, ``ADDR`` (default port) or ``:PORT`` (loopback)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, DEFAULT_AGENT_PORT
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ADDR:PORT, got {text!r}") from None
    return host.strip("[]") or "127.0.0.1", number


async def serve(listen: tuple[str, int], host_key: Path, authorized_keys: Path) -> None:
    """Run the agent until cancelled.

    Raises :class:`~pydra.strictmodes.StrictModeError` at start if the host key
    or ``authorized_keys`` could have been written by someone else; later, such
    a file only refuses the connections (each refusal logged with the reason).
    """
    identity = keys.load_private_key(host_key)
    fingerprint = keys.sha256_fingerprint(identity.public_key())
    if authorized_keys.exists():
        strictmodes.check_file(authorized_keys)  # at start, an unsafe file stops the agent
    keyfile = authorized.AuthorizedKeysFile(authorized_keys, log)
    with contextlib.suppress(OSError, StrictModeError):
        keyfile.load()  # logs its skipped lines now (or that it is missing), not at the first connection

    def authorize_client(public_key: bytes, address: str) -> object:
        who = keys.sha256_fingerprint(public_key)
        try:
            line = keyfile.authorize(public_key, address, "launch")
        except authorized.AuthorizationError as refusal:
            log.warning("refused %s from %s: %s", who, address, refusal)
            raise
        log.info("accepted %s from %s (%s)", who, address, line.location)
        return line

    sessions = Sessions(keyfile, "launch", server_exec, log)
    # SIGTERM (how a daemon is stopped) ends the agent cleanly: pid file removed, exit 0. Both
    # handlers are in place before the agent listens: an early SIGHUP must not end it.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, sessions.reload)
    server = await serve_channel(
        listen[0], listen[1], sessions.serve, identity=identity, purpose=PURPOSE, authorize_client=authorize_client, log=log
    )
    log.info("pydra node listening on %s:%d, host key %s", listen[0], listen[1], fingerprint)
    async with server:
        await server.serve_forever()


def node_main(argv: list[str] | None = None) -> int:
    """Entry point of ``pydra node`` and ``pydra-node``."""
    parser = argparse.ArgumentParser(
        prog="pydra node",
        description="Run the Pydra agent: start processes on this host for launchers whose keys are authorized.",
        epilog="Against connection floods it refuses, before any crypto, what sshd would: see PYDRA_MAX_STARTUPS, "
               "PYDRA_PER_SOURCE_MAX_STARTUPS, PYDRA_PER_SOURCE_PENALTIES and PYDRA_LOGIN_GRACE_TIME in the "
               "README and docs/SECURITY.md. Signals: SIGHUP rereads authorized_keys and stops the running launches "
               "of keys it no longer allows; SIGTERM stops the agent.",
    )
    parser.add_argument(
        "--listen", type=parse_address, default=("127.0.0.1", DEFAULT_AGENT_PORT), metavar="ADDR:PORT",
        help=f"address to listen on (default 127.0.0.1:{DEFAULT_AGENT_PORT}; only loopback unless you say otherwise)",
    )
    parser.add_argument("--host-key", type=Path, default=keys.host_key_path(), metavar="PATH",
                        help="this host's Ed25519 key (default ~/.pydra/host_ed25519)")
    parser.add_argument("--authorized-keys", type=Path, default=authorized.authorized_keys_path(), metavar="PATH",
                        help="who may launch here (default ~/.pydra/authorized_keys)")
    parser.add_argument("--log", type=Path, metavar="PATH", help="append the log here instead of stderr")
    parser.add_argument("--pid-file", type=Path, metavar="PATH", help="write the agent's pid here")
    parser.add_argument("--daemon", action="store_true", help="detach and run in the background (needs --log)")
    parser.add_argument("--check", action="store_true",
                        help="do not start: say what is wrong with this host's setup for these options, one line each "
                             "(exit 1 if anything is)")
    args = parser.parse_args(argv)
    if args.check:
        return nodecheck.report(nodecheck.check_node(args.listen, args.host_key, args.authorized_keys, args.pid_file))
    if (problem := check_settings()) is not None:  # PYDRA_MAX_STARTUPS and the like, before listening
        print(f"pydra node: error: {problem}", file=sys.stderr)
        return 2
    if args.daemon:
        if args.log is None:
            parser.error("--daemon needs --log PATH: a daemon has no terminal to log to")
        args.log, args.host_key, args.authorized_keys = (p.resolve() for p in (args.log, args.host_key, args.authorized_keys))
        if args.pid_file:
            args.pid_file = args.pid_file.resolve()
        if _detach():
            return 0  # the launching process; the daemon carries on
    logging.basicConfig(
        filename=args.log, level=logging.INFO, format="%(asctime)s pydra-node %(levelname)s %(message)s"
    )
    if args.pid_file:
        args.pid_file.write_text(f"{os.getpid()}\n")
    try:
        asyncio.run(serve(args.listen, args.host_key, args.authorized_keys))
    except StrictModeError as exc:
        if args.log is not None:  # a daemon's only voice; on stderr the line below says it
            log.error("%s", exc)
        print(f"pydra node: {exc}", file=sys.stderr)
        return 2
    except (keys.KeyFileError, FileNotFoundError, OSError) as exc:
        print(f"pydra node: error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, asyncio.CancelledError):
        log.info("pydra node stopped")
        return 0
    finally:
        if args.pid_file:
            args.pid_file.unlink(missing_ok=True)
    return 0


def _detach() -> bool:
    """Become a daemon (fork, new session, fork); True in the process that should exit."""
    if os.fork():
        return True
    os.setsid()  # no controlling terminal: a closed shell does not stop the agent
    if os.fork():
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for stream in (0, 1, 2):
        os.dup2(null, stream)
    return False
