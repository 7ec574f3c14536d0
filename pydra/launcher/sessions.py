"""The launches a node is serving, and stopping those whose key ``authorized_keys`` no longer allows.

``pydra node`` reads ``authorized_keys`` at every connection, so a key taken
out of it starts nothing new. What it started before goes on until the agent
gets ``SIGHUP``: then it reloads the file (logging what it holds and every
skipped line), checks each running launch's key and address against it again,
and stops, with a log line, every launch the file no longer allows (removed,
restricted by ``from=``, expired, or without the role). Stopping a launch ends
its channel with an authenticated close saying why, and the agent then stops
the command's whole tree, as when a launcher goes away
(:mod:`pydra.launcher.remote`).

A file that cannot be read, or that strict modes refuse, stops nothing: the
reload is logged as failed, the running launches go on, and every new
connection is refused until the file is fixed.

A system agent (``pydra node --system``) has one file per user: on SIGHUP it
rereads the file of every user with running launches, and checks each launch
against the file that allowed it (:class:`pydra.launcher.privsep.SystemUsers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from pydra.comm.aio import Channel
from pydra.comm.channel import ChannelError
from pydra.launcher import keys
from pydra.launcher.authorized import AuthorizationError, AuthorizedKeysFile
from pydra.strictmodes import StrictModeError

__all__ = ["REVOKED", "Sessions"]

REVOKED = "key no longer authorized"  #: the close reason a stopped launcher hears


class Sessions:
    """Runs *handler* for each channel, and remembers the channel (and the client's address) while it runs.

    *keyfile* is the agent's ``authorized_keys``, reread on every reload; a
    system agent has none and gives *keyfile_of*, the file that allowed a
    channel (None while the channel has not been authorized yet). By default
    every channel was allowed by *keyfile*.
    """

    def __init__(
        self,
        keyfile: AuthorizedKeysFile | None,
        role: str,
        handler: Callable[[Channel], Awaitable[None]],
        log: logging.Logger,
        keyfile_of: Callable[[Channel], AuthorizedKeysFile | None] | None = None,
    ) -> None:
        self.keyfile = keyfile
        self.role = role
        self.handler = handler
        self.log = log
        self.keyfile_of = keyfile_of or (lambda channel: keyfile)
        self._running: dict[Channel, str] = {}  # the channel -> the client's address
        self._stopping: set[asyncio.Task] = set()  # closes under way (asyncio keeps weak references)

    async def serve(self, channel: Channel) -> None:
        """The handler to give ``serve_channel``."""
        self._running[channel] = channel.peer_address
        try:
            await self.handler(channel)
        finally:
            self._running.pop(channel, None)

    def reload(self) -> None:
        """Reread ``authorized_keys`` and stop the launches it no longer allows (call on SIGHUP)."""
        allowed_by = {channel: self.keyfile_of(channel) for channel in self._running}
        files = list(dict.fromkeys(f for f in [self.keyfile, *allowed_by.values()] if f is not None))
        failed = set()
        for keyfile in files:
            try:
                keyfile.load()
            except (OSError, StrictModeError):  # load() has logged why
                failed.add(keyfile)
                self.log.error("reload of %s failed: the %d running launches go on",
                               keyfile.path, sum(f is keyfile for f in allowed_by.values()))
        stopped = 0
        for channel, keyfile in allowed_by.items():
            if keyfile is None or keyfile in failed or channel not in self._running:
                continue  # not authorized yet (it will be against the file as it is now), or unreadable
            address = self._running[channel]
            try:
                keyfile.authorize(channel.peer_key, address, self.role)
            except AuthorizationError as refusal:
                self.log.warning("stopping the launch of %s from %s: %s",
                                 keys.sha256_fingerprint(channel.peer_key), address, refusal)
                del self._running[channel]
                task = asyncio.ensure_future(_stop(channel))
                self._stopping.add(task)
                task.add_done_callback(self._stopping.discard)
                stopped += 1
        self.log.info("reloaded %s: %d running launches checked, %d stopped",
                      ", ".join(str(f.path) for f in files) or "no authorized_keys",
                      len(self._running) + stopped, stopped)


async def _stop(channel: Channel) -> None:
    with contextlib.suppress(ChannelError, OSError):  # the launcher may be going already
        await channel.close(REVOKED)
