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

Two modes, as docs/SECURITY.md explains:

* ``pydra node`` (single-user) runs as one user, reads that user's
  ``authorized_keys`` and runs every launch as itself
  (:class:`pydra.launcher.remote.OwnUser`): a launch key can read the host key
  and edit ``authorized_keys``.
* ``pydra node --system`` runs as root, like sshd, with its host key in
  :data:`SYSTEM_HOST_KEY` (readable by root alone). Each request names a local
  user, and runs as that user if that user's ``~/.pydra/authorized_keys``
  allows the key (:class:`pydra.launcher.privsep.SystemUsers`): a launch can
  no longer read the host key, and writes only what its user could.

Both log every command they run, with the user, the key's fingerprint and
the client's address.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys
from pathlib import Path

from pydra import strictmodes
from pydra.comm.aio import DEFERRED, serve_channel
from pydra.config import check_settings
from pydra.launcher import authorized, keys, nodecheck
from pydra.launcher.hostfile import DEFAULT_AGENT_PORT
from pydra.launcher.privsep import SystemUsers
from pydra.launcher.remote import OwnUser, server_exec
from pydra.launcher.sessions import Sessions
from pydra.strictmodes import StrictModeError

log = logging.getLogger("pydra.node")

PURPOSE = "launch"
#: where ``pydra node --system`` finds its host key unless told otherwise
SYSTEM_HOST_KEY = Path("/etc/pydra/host_ed25519")


def parse_address(text: str) -> tuple[str, int]:
    """``ADDR:PORT``, ``ADDR`` (default port) or ``:PORT`` (loopback); IPv6 as ``::1`` or ``[::1]:PORT``."""
    if text.startswith("[") and text.endswith("]") or text.count(":") > 1 and not text.startswith("["):
        return text.strip("[]"), DEFAULT_AGENT_PORT  # an IPv6 address alone
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, DEFAULT_AGENT_PORT
    if not (port.isdigit() and 0 < int(port) <= 65535):  # (the socket would take 99999 for 34463)
        raise argparse.ArgumentTypeError(f"expected ADDR:PORT with a port from 1 to 65535, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


async def serve(listen: tuple[str, int], host_key: Path, authorized_keys: Path | None) -> None:
    """Run the agent until cancelled; with *authorized_keys* None, as a system agent (``--system``).

    Raises :class:`~pydra.strictmodes.StrictModeError` at start if the host key
    or ``authorized_keys`` could have been written by someone else; later, such
    a file only refuses the connections (each refusal logged with the reason).
    """
    identity = keys.load_private_key(host_key)
    fingerprint = keys.sha256_fingerprint(identity.public_key())
    if authorized_keys is None:
        users = SystemUsers("launch", log)
        sessions = Sessions(None, "launch", functools.partial(server_exec, runner=users), log, users.keyfile_of)
        mode = "system mode: each launch runs as the user it names"

        def authorize_client(public_key: bytes, address: str) -> object:
            # Which file decides is known only from the request, which names the user (as ssh's user@host):
            # until SystemUsers allows it the channel is a startup, and a refusal penalises its source.
            log.info("authenticated %s from %s: its request says as whom", keys.sha256_fingerprint(public_key), address)
            return DEFERRED
    else:
        if authorized_keys.exists():
            strictmodes.check_file(authorized_keys)  # at start, an unsafe file stops the agent
        keyfile = authorized.AuthorizedKeysFile(authorized_keys, log)
        with contextlib.suppress(OSError, StrictModeError):
            keyfile.load()  # logs its skipped lines now (or that it is missing), not at the first connection
        own = OwnUser()
        sessions = Sessions(keyfile, "launch", functools.partial(server_exec, runner=own), log)
        mode = f"single-user mode: launches run as {own.who}"

        def authorize_client(public_key: bytes, address: str) -> object:
            who = keys.sha256_fingerprint(public_key)
            try:
                line = keyfile.authorize(public_key, address, "launch")
            except authorized.AuthorizationError as refusal:
                log.warning("refused %s from %s: %s", who, address, refusal)
                raise
            log.info("accepted %s from %s (%s)", who, address, line.location)
            return line

    # SIGTERM (how a daemon is stopped) ends the agent cleanly: pid file removed, exit 0. Both
    # handlers are in place before the agent listens: an early SIGHUP must not end it.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, sessions.reload)
    server = await serve_channel(
        listen[0], listen[1], sessions.serve, identity=identity, purpose=PURPOSE, authorize_client=authorize_client, log=log
    )
    log.info("pydra node listening on %s:%d, host key %s (%s)", listen[0], listen[1], fingerprint, mode)
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
    parser.add_argument("--system", action="store_true",
                        help="run as root and start each launch as the local user it names, if that user's "
                             "~/.pydra/authorized_keys allows the key (privilege separation, as sshd)")
    parser.add_argument("--host-key", type=Path, metavar="PATH",
                        help=f"this host's Ed25519 key (default ~/.pydra/host_ed25519; with --system {SYSTEM_HOST_KEY})")
    parser.add_argument("--authorized-keys", type=Path, metavar="PATH",
                        help="who may launch here (default ~/.pydra/authorized_keys; not with --system, "
                             "which reads each user's own)")
    parser.add_argument("--log", type=Path, metavar="PATH", help="append the log here instead of stderr")
    parser.add_argument("--pid-file", type=Path, metavar="PATH", help="write the agent's pid here")
    parser.add_argument("--daemon", action="store_true", help="detach and run in the background (needs --log)")
    parser.add_argument("--check", action="store_true",
                        help="do not start: say what is wrong with this host's setup for these options, one line each "
                             "(exit 1 if anything is); with --system, as root, every user's authorized_keys")
    parser.add_argument("--user", action="append", metavar="NAME",
                        help="with --check --system: check only this user's authorized_keys (repeatable)")
    args = parser.parse_args(argv)
    if args.user and not (args.check and args.system):
        parser.error("--user is for --check --system")
    if args.check and args.system:
        return nodecheck.report(nodecheck.check_system_node(
            args.listen, args.host_key or SYSTEM_HOST_KEY, args.pid_file, args.user, args.authorized_keys
        ))
    if args.check:
        return nodecheck.report(nodecheck.check_node(args.listen, args.host_key, args.authorized_keys, args.pid_file))
    if (problem := check_settings()) is not None:  # PYDRA_MAX_STARTUPS and the like, before listening
        print(f"pydra node: error: {problem}", file=sys.stderr)
        return 2
    if args.system:
        if args.authorized_keys is not None:
            parser.error("--system reads each user's ~/.pydra/authorized_keys: --authorized-keys is for single-user mode")
        if os.geteuid() != 0:
            print("pydra node: error: --system must run as root (it starts each launch as the user it names)",
                  file=sys.stderr)
            return 2
        args.host_key = args.host_key or SYSTEM_HOST_KEY
    else:
        args.host_key = args.host_key or keys.host_key_path()
        args.authorized_keys = args.authorized_keys or authorized.authorized_keys_path()
    if args.log is not None and not args.log.resolve().parent.is_dir():
        print(f"pydra node: error: --log {args.log}: no such directory {args.log.resolve().parent}", file=sys.stderr)
        return 2
    if args.pid_file and (other := _running_pid(args.pid_file)) is not None:
        print(f"pydra node: error: --pid-file {args.pid_file} names a running process (pid {other}), another "
              "agent's: stop it, or give this one another pid file", file=sys.stderr)
        return 2
    if args.daemon:
        if args.log is None:
            parser.error("--daemon needs --log PATH: a daemon has no terminal to log to")
        args.log, args.host_key = args.log.resolve(), args.host_key.resolve()
        if args.authorized_keys:
            args.authorized_keys = args.authorized_keys.resolve()
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
    except FileNotFoundError as exc:
        if exc.filename == str(args.host_key):
            print(f"pydra node: error: no host key {args.host_key}: make one with "
                  f"`pydra keygen -f {args.host_key} -C \"$(hostname)\"`", file=sys.stderr)
        else:
            print(f"pydra node: error: {exc}", file=sys.stderr)
        return 2
    except (keys.KeyFileError, OSError) as exc:
        print(f"pydra node: error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, asyncio.CancelledError):
        log.info("pydra node stopped")
        return 0
    finally:
        if args.pid_file and _running_pid(args.pid_file) == os.getpid():  # ours still (not another's since)
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


def _running_pid(pid_file: Path) -> int | None:
    """The pid *pid_file* holds, if that process is running Pydra; else None (no file, not a pid, gone, reused)."""
    try:
        text = pid_file.read_text().strip()
        return int(text) if text.isdigit() and b"pydra" in Path(f"/proc/{text}/cmdline").read_bytes() else None
    except OSError:
        return None
