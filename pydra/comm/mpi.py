"""Point-to-point messaging between rank 0 and the workers, without busy-waiting.

MPI implementations spin inside blocking receives, so an idle rank parked in
``recv`` burns a whole core. Pydra instead polls with ``Iprobe`` and sleeps
between polls with a :class:`~pydra.comm.backoff.Backoff` that resets as
soon as a message arrives: busy ranks react within microseconds, idle ranks
cost almost nothing, and a message after a long wait is seen at most a
tenth of that wait late.

Messages are pickled by their owners (:mod:`pydra.comm.serial`, protocol 5)
and moved here as raw bytes, so that a message that fails to pickle or
unpickle is reported by whoever owns it rather than deep inside mpi4py. A
message's large buffers (numpy arrays' data) stay out of its pickle and
travel as MPI messages of their own, straight from the sender's memory into
a receive buffer of their own (see "the wire form of a message" below), or
through shared memory to a rank of the same host (:mod:`pydra.comm.shm`).

When the job has a key (:mod:`pydra.comm.seal`), :func:`start_sealing`
rebinds :func:`send`, :func:`try_receive` and :meth:`Outbox.post` once to
versions that seal what leaves and open what arrives, dropping (and logging)
what does not open; callers still see plaintext payloads (the start-up
collectives :func:`bcast_object` and :func:`gather_object` seal too).
Without a key nothing is rebound, so unsealed jobs pay nothing per
message. Call them through the module (``mpi.send(...)``), never
``from pydra.comm.mpi import send``.
Associated data names ranks by their ``COMM_WORLD`` rank
(:func:`world_ranks`), whatever communicator carries the message.
"""

from __future__ import annotations

import struct
import threading
from array import array
from collections import deque
from typing import Any, NamedTuple, Sequence

from mpi4py import MPI

from pydra import startup
from pydra.comm import seal, serial, shm
from pydra.comm.backoff import Backoff
from pydra.comm.failures import RanksFailed, exit_without_finalize, failed_ranks, peer_failed
from pydra.comm.seal import SealConfigError, SealError
from pydra.config import setting

#: tag -> what it carries, for log lines about dropped messages (filled by the session from
#: pydra._core.protocol, which owns the tags: this module moves bytes and knows no message)
TAG_NAMES: dict[int, str] = {}


class Received(NamedTuple):
    """A message taken off the wire."""

    source: int
    tag: int
    #: the pickle (opened already, when the job seals)
    payload: bytes | bytearray | memoryview
    #: its out-of-band buffers, for ``serial.loads(payload, buffers=...)`` (writable numpy byte arrays)
    buffers: Sequence = ()


# -- the wire form of a message ------------------------------------------------------------------
#
# A message without out-of-band buffers is one MPI message: its pickle (protocol 5: its first byte
# is 0x80, never _PARTS's). A message with buffers is one MPI message holding _PARTS, the number of
# buffers, each buffer's size and seal counter (0 unsealed), then the pickle; then one MPI message
# per buffer, straight from the sender's memory into a receive buffer of its own. All carry the
# message's tag; one sending thread per tag at a time (_send_locks) keeps them together. Between
# ranks of one host that share memory, an unsealed message with buffers (or with slots to give
# back) starts with shm.MAGIC instead, and only its buffers that found no slot follow (shm.frame).
#
# An MPI message over 2 GiB counts its bytes in a C int only from MPI-4 on (MPICH 4); before it (Open
# MPI 5.0) it goes as one element of a contiguous datatype of its size (_spec), and its receiver
# counts it with Get_elements, which takes an MPI_Count, where Get_count says MPI_UNDEFINED.

#: the most bytes one MPI call may count in MPI.BYTE: a C int's worth before MPI-4's large counts
MAX_COUNT = 2**31 - 1 if MPI.Get_version() < (4, 0) else 2**63 - 1

_PARTS = b"\x00parts"
_COUNT = struct.Struct(">I")
_PART = struct.Struct(">QQ")  # size, seal counter


def _framed(payload: bytes, sizes: list[int], counters: list[int]) -> bytes:
    """The first MPI message of a message with out-of-band parts of *sizes* bytes."""
    return b"".join([_PARTS, _COUNT.pack(len(sizes)), *map(_PART.pack, sizes, counters), payload])


def _unframed(first: bytes | bytearray) -> tuple[memoryview, list[tuple[int, int]]]:
    """The pickle in a first MPI message, and the (size, counter) of each of its parts."""
    (count,) = _COUNT.unpack_from(first, len(_PARTS))
    start = len(_PARTS) + _COUNT.size
    end = start + count * _PART.size
    view = memoryview(first)
    table = list(_PART.iter_unpack(view[start:end]))
    if len(table) != count:
        raise ValueError("a truncated parts table")
    return view[end:], table


def _wire(payload: bytes, buffers: Sequence, comm: MPI.Comm, dest: int) -> list:
    """The MPI messages of an unsealed message to *dest*: through shared memory where it can (:mod:`shm`)."""
    shared = shm.frame(payload, buffers, world_ranks(comm)[dest]) if shm.active() else None
    if shared is not None:
        return shared
    if not buffers:
        return [payload]
    parts = [memoryview(buffer).cast("B") for buffer in buffers]
    return [_framed(payload, [part.nbytes for part in parts], [0] * len(parts)), *parts]


def _sealed_wire(payload: bytes, buffers: Sequence, dest: int, tag: int) -> list:
    """The MPI messages of a message sealed for world rank *dest*: each part first, under counters its header names."""
    if not buffers:
        return [_sealer.seal(payload, dest, tag)]
    parts, sizes, counters = [], [], []
    for buffer in buffers:
        plain = memoryview(buffer).cast("B")
        sealed = allocate(plain.nbytes + seal.TAG_BYTES)
        counters.append(_sealer.seal_part(plain, dest, tag, sealed))
        parts.append(sealed)
        sizes.append(plain.nbytes)
    return [_sealer.seal(_framed(payload, sizes, counters), dest, tag), *parts]


def _spec(message: Any) -> list:
    """*message* (bytes, or a flat byte buffer) as MPI calls take it; :func:`_done` once the call has it."""
    if len(message) <= MAX_COUNT:
        return [message, MPI.BYTE]
    return [message, 1, MPI.BYTE.Create_contiguous(len(message)).Commit()]


def _done(spec: list) -> None:
    """Free *spec*'s datatype, if it has one of its own (MPI keeps it until pending calls complete)."""
    if len(spec) == 3:
        spec[2].Free()


def allocate(nbytes: int) -> Any:
    """A receive buffer of *nbytes*: numpy's (no byte written before MPI's, huge pages for large ones)."""
    import numpy  # here: a job that sends no buffer need not import it

    return numpy.empty(nbytes, numpy.uint8)


def _receive_parts(comm: MPI.Comm, source: int, tag: int, sizes: list[int]) -> list:
    """The parts that follow a first MPI message, each received into a buffer of its own.

    The sender sends them right after the first, so this waits only for the
    copy (as a ``Recv`` of one large message would). A part of another size
    than its first message named (a forgery) raises :class:`SealError`.
    """
    parts, status = [], MPI.Status()
    for size in sizes:
        message = comm.Mprobe(source, tag, status)
        count = status.Get_elements(MPI.BYTE)
        part = allocate(count)  # whatever its size: it is taken off the wire
        spec = _spec(part)
        try:
            message.Recv(spec)
        except MPI.Exception as error:  # under ULFM, the sender died on the way
            _raise_failed(comm, error)
        finally:
            _done(spec)
        if count != size:
            raise SealError(f"a part of {count} bytes where its message named {size}")
        parts.append(part)
    return parts


_status = MPI.Status()  # reused: each process polls from one thread


def _take(comm: MPI.Comm, source: int, tag: int, status: MPI.Status) -> tuple[int, int, bytearray] | None:
    """The source, tag and bytes of one pending MPI message matching *source* and *tag*, or None at once."""
    # MPICH's first probe after a message lands often only moves it along: probe once more before
    # saying there is none, or each message waits out one more (growing) backoff sleep. (Measured
    # on rank 0 of a 40k-unit map: asleep 778 ms of 1,570 with one probe, 30 ms of 694 with two.)
    try:
        if not comm.Iprobe(source, tag, status) and not comm.Iprobe(source, tag, status):
            return None
        source, tag = status.Get_source(), status.Get_tag()
        buffer = bytearray(status.Get_elements(MPI.BYTE))
        spec = _spec(buffer)
        try:
            comm.Recv(spec, source, tag)
        finally:
            _done(spec)
    except MPI.Exception as error:  # under ULFM, a peer's death surfaces here (its message cut short too)
        _raise_failed(comm, error)
    return source, tag, buffer


def _raise_failed(comm: MPI.Comm, error: MPI.Exception) -> None:
    """Raise :class:`RanksFailed` if *error* says that peers died (ULFM), else *error* itself."""
    if not peer_failed(error):
        raise error
    raise RanksFailed(failed_ranks(comm)) from None


def pending(comm: MPI.Comm) -> bool:
    """Whether any message waits to be received on *comm* (an error from MPI says yes: receiving reports it)."""
    try:
        return comm.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG)
    except MPI.Exception:
        return True


def try_receive(
    comm: MPI.Comm, source: int = MPI.ANY_SOURCE, tag: int = MPI.ANY_TAG, status: MPI.Status = _status
) -> Received | None:
    """Receive one pending message matching *source* and *tag* (and its parts), or return None at once.

    A second thread that polls must bring its own *status*. When the job
    seals, a message that does not open is taken off the wire, logged and
    skipped. Raises :class:`RanksFailed` when MPI reports that peers died
    (only under ULFM; MPICH's ranks die silently, see the heartbeats).
    """
    taken = _take(comm, source, tag, status)
    if taken is None:
        return None
    source, tag, first = taken
    if first.startswith(shm.MAGIC):
        payload, entries = shm.unframe(first, world_ranks(comm)[source])
        by_mpi = iter(_receive_parts(comm, source, tag, [entry for entry in entries if type(entry) is int]))
        return Received(source, tag, payload, [next(by_mpi) if type(entry) is int else entry for entry in entries])
    if not first.startswith(_PARTS):
        return Received(source, tag, first)
    payload, table = _unframed(first)
    return Received(source, tag, payload, _receive_parts(comm, source, tag, [size for size, _ in table]))


def receive(comm: MPI.Comm, source: int, tag: int, backoff: Backoff) -> Received:
    """Wait, politely, for a message matching *source* and *tag*."""
    while True:
        message = try_receive(comm, source, tag)
        if message is not None:
            backoff.reset()
            return message
        backoff.sleep()


def send(comm: MPI.Comm, payload: bytes, dest: int, tag: int, buffers: Sequence = ()) -> None:
    """Send a pickle and its out-of-band *buffers*, blocking until they may be reused (any thread)."""
    with _lock(_send_locks, tag):
        _put(comm, _wire(payload, buffers, comm, dest), dest, tag)


def _put(comm: MPI.Comm, messages: list, dest: int, tag: int) -> None:
    """Hand a message's MPI messages to MPI, in order (the tag's send lock held)."""
    for message in messages:
        spec = _spec(message)
        try:
            comm.Send(spec, dest, tag)
        finally:  # a Send that raises (the job is ending) must not keep a >2 GiB message's datatype
            _done(spec)


class _Parts:
    """The requests of one message sent in several MPI messages, tested together."""

    __slots__ = ("requests",)

    def __init__(self, requests: list[MPI.Request]) -> None:
        self.requests = requests

    def Test(self) -> bool:  # noqa: N802 (as MPI.Request's)
        return MPI.Request.Testall(self.requests)

    def Wait(self) -> None:  # noqa: N802
        MPI.Request.Waitall(self.requests)


class Outbox:
    """Non-blocking sends whose buffers stay alive until MPI is done with them.

    The master must never block on a worker busy in user code (a large message
    needs the receiver's cooperation to complete), so it only ever ``Isend``s.
    An outbox is used by one thread (rank 0's scheduler), so it needs no lock.
    """

    def __init__(self, comm: MPI.Comm) -> None:
        self.comm = comm
        self._abandoned: list = []
        self._pending: deque[tuple[MPI.Request | _Parts, Any, int]] = deque()

    def post(self, payload: bytes, dest: int, tag: int, buffers: Sequence = ()) -> None:
        """Start sending a pickle and its out-of-band *buffers* to *dest*.

        Sealed, once :func:`start_sealing` found a key. The buffers must not
        change until the send completes.
        """
        messages = _wire(payload, buffers, self.comm, dest)
        if len(messages) > 1 or messages[0] is not payload:
            self._post_all(messages, dest, tag)
            return
        spec = _spec(payload)
        request = self.comm.Isend(spec, dest, tag)
        _done(spec)
        if not request.Test():  # small messages usually complete at once
            self._pending.append((request, payload, dest))

    def _post_sealed(self, payload: bytes, dest: int, tag: int, buffers: Sequence = ()) -> None:
        self._post_all(_sealed_wire(payload, buffers, world_ranks(self.comm)[dest], tag), dest, tag)

    def _post_all(self, messages: list, dest: int, tag: int) -> None:
        specs = [_spec(message) for message in messages]
        requests = [self.comm.Isend(spec, dest, tag) for spec in specs]
        for spec in specs:
            _done(spec)
        if not MPI.Request.Testall(requests):
            self._pending.append((_Parts(requests), messages, dest))

    def forget(self, dest: int) -> None:
        """Stop waiting for the sends to *dest*, a rank that is gone: they may never complete.

        Their buffers are kept alive for good, since MPI may still read them.
        """
        gone = [entry for entry in self._pending if entry[2] == dest]
        self._abandoned.extend(gone)
        self._pending = deque(entry for entry in self._pending if entry[2] != dest)

    def collect(self) -> None:
        """Forget the sends that have completed, oldest first."""
        pending = self._pending
        while pending and pending[0][0].Test():
            pending.popleft()

    def flush(self) -> None:
        """Wait for every send to complete (sends to forgotten ranks excepted)."""
        while self._pending:
            self._pending.popleft()[0].Wait()

    def __len__(self) -> int:
        return len(self._pending)


# -- collectives of Python objects --------------------------------------------------------------
# Only at the start of a session. Each is a nonblocking collective waited for with a Backoff: MPI's
# blocking ones spin, and a rank waiting for a slower one (rank 0 loading the TARGET, say) would
# take the core it needs. Each tells the rank's supervisor which start-up step it is in.


def bcast_object(comm: MPI.Intracomm, obj: Any, root: int, label: str) -> Any:
    """Collective: *obj* from *root* to every member (sealed under *label* when the job seals).

    A member whose copy does not open logs it and raises :class:`SealError`:
    it cannot go on without the value, and the others would wait for it.
    """
    startup.reached(label)
    data = _seal_for(serial.dumps(obj), seal.ALL, label) if comm.rank == root else None
    size = array("q", [len(data) if data is not None else 0])
    wait(comm.Ibcast([size, MPI.INT64_T], root), comm, label)
    if data is None:
        data = bytearray(size[0])
    wait(comm.Ibcast([data, MPI.BYTE], root), comm, label)
    if comm.rank == root:
        return obj
    if _started_sealed:
        data = open_sealed(data, world_ranks(comm)[root], label, dest=seal.ALL)
    return serial.loads(data)


def gather_object(comm: MPI.Intracomm, obj: Any, root: int, label: str, refused: Any = None) -> list[Any] | None:
    """Collective: every member's *obj*, in member order, on *root* (None elsewhere).

    Sealed under *label* when the job seals; a member's value that does not
    open is logged and replaced by *refused*.
    """
    startup.reached(label)
    world = world_ranks(comm)
    data = _seal_for(serial.dumps(obj), world[root], label)
    size, sizes = array("q", [len(data)]), array("q", [0] * comm.size)
    wait(comm.Igather([size, MPI.INT64_T], [sizes, MPI.INT64_T], root), comm, label)
    if comm.rank != root:
        wait(comm.Igatherv([data, MPI.BYTE], None, root), comm, label)
        return None
    counts, displacements = list(sizes), [0] * comm.size
    for member in range(1, comm.size):
        displacements[member] = displacements[member - 1] + counts[member - 1]
    buffer = bytearray(sum(counts))
    wait(comm.Igatherv([data, MPI.BYTE], [buffer, (counts, displacements), MPI.BYTE], root), comm, label)
    values = []
    for member, (start, count) in enumerate(zip(displacements, counts)):
        part = memoryview(buffer)[start : start + count]
        try:
            values.append(serial.loads(open_sealed(part, world[member], label) if _started_sealed else part))
        except SealError:
            values.append(refused)
    return values


def wait(request: MPI.Request, comm: MPI.Intracomm, label: str) -> None:
    """Wait for start-up collective *label* on *comm*, sleeping between polls rather than spinning.

    A member lost meanwhile (ULFM raises) ends this rank, as :func:`pydra.startup.lost` says."""
    backoff = Backoff()
    try:
        while not request.Test():
            backoff.sleep()
    except MPI.Exception as error:
        if not peer_failed(error):
            raise
        startup.lost(comm.rank, comm.size, failed_ranks(comm), label)
        exit_without_finalize(1)


def _seal_for(payload: bytes, dest: int, label: str) -> bytes:
    return _sealer.seal(payload, dest, label) if _started_sealed else payload


# -- sealing -------------------------------------------------------------------------------------

_sealer: seal.Sealer  # set by start_sealing when the job seals
_started = False
_started_sealed = False
# One lock per tag, held while a message is sealed and handed to MPI (or received and opened):
# two threads with one tag (task threads logging, say) could otherwise put their counters on
# the wire out of order, and the receiver would refuse the later one as a replay.
_send_locks: dict[int, threading.Lock] = {}
_receive_locks: dict[int, threading.Lock] = {}
_world_keyval: int | None = None


def world_ranks(comm: MPI.Comm) -> Sequence[int]:
    """The ``COMM_WORLD`` rank of each member of *comm*, by its rank in *comm* (cached on *comm*)."""
    global _world_keyval
    if comm is MPI.COMM_WORLD:
        return range(comm.size)
    if _world_keyval is None:
        _world_keyval = MPI.Comm.Create_keyval()
    table = comm.Get_attr(_world_keyval)
    if table is None:
        group, world = comm.Get_group(), MPI.COMM_WORLD.Get_group()
        try:
            table = tuple(MPI.Group.Translate_ranks(group, list(range(comm.size)), world))
        finally:
            group.Free()
            world.Free()
        comm.Set_attr(_world_keyval, table)  # freed with the communicator
    return table


def describe(tag: int | str) -> str:
    """How a message's kind reads in a log line: ``tag 12 (replies)`` or ``collective shuffle``."""
    if isinstance(tag, int):
        return f"tag {tag} ({TAG_NAMES.get(tag, 'not a Pydra tag')})"
    return f"collective {tag}"


def open_sealed(data: bytes | bytearray | memoryview, source: int, tag: int | str, dest: int | None = None) -> bytes:
    """Open *data* from world rank *source* with this process's sealer; log and re-raise a :class:`SealError`."""
    try:
        return _sealer.open(data, source, tag, dest)
    except SealError as exc:
        seal.report_dropped(_sealer.rank, source, describe(tag), exc)
        raise


def _lock(locks: dict[int, threading.Lock], tag: int) -> threading.Lock:
    lock = locks.get(tag)
    if lock is None:
        lock = locks.setdefault(tag, threading.Lock())  # setdefault: two threads get the same one
    return lock


def _sealed_send(comm: MPI.Comm, payload: bytes, dest: int, tag: int, buffers: Sequence = ()) -> None:
    with _lock(_send_locks, tag):
        _put(comm, _sealed_wire(payload, buffers, world_ranks(comm)[dest], tag), dest, tag)


def _sealed_try_receive(
    comm: MPI.Comm, source: int = MPI.ANY_SOURCE, tag: int = MPI.ANY_TAG, status: MPI.Status = _status
) -> Received | None:
    with _lock(_receive_locks, tag):
        while True:  # a dropped message is taken off the wire; look for the next one
            taken = _take(comm, source, tag, status)
            if taken is None:
                return None
            sender, kind, first = taken
            world = world_ranks(comm)[sender]
            try:
                plain = open_sealed(first, world, kind)
            except SealError:
                continue
            if not plain.startswith(_PARTS):
                return Received(sender, kind, plain)
            payload, table = _unframed(plain)
            try:
                wire = _receive_parts(comm, sender, kind, [size + seal.TAG_BYTES for size, _ in table])
                # Every part is off the wire before any is opened, so the next message starts in step.
                return Received(sender, kind, payload, [_open_part(part, world, kind, counter)
                                                        for part, (_, counter) in zip(wire, table)])
            except SealError as exc:  # the whole message is dropped
                seal.report_dropped(_sealer.rank, world, describe(kind), exc)


def _open_part(data: Any, source: int, tag: int, counter: int) -> Any:
    opened = allocate(len(data) - seal.TAG_BYTES)
    _sealer.open_part(data, source, tag, counter, opened)
    return opened


def start_sealing(comm: MPI.Intracomm) -> seal.AnySealer:
    """Collective over *comm*, first thing in a session: seal this process's messages if the job has a key.

    Reads ``PYDRA_JOB_KEY`` (removing it from the environment) and, if it is
    set, binds the sealing versions of this module's message functions. The
    members agree first: if any cannot start (``PYDRA_SEAL=1`` without a key,
    a malformed key, a key on some ranks only, different keys), every one
    raises :class:`SealConfigError`, which one of them reports. Later calls
    return at once. The members of a job that does not seal agree here on
    sharing memory for large buffers (:mod:`pydra.comm.shm`).
    """
    global _started, _started_sealed, _sealer, send, try_receive
    if _started:
        return seal.current()
    startup.reached("start-sealing")
    error: SealConfigError | None = None
    try:
        sealer = seal.start(MPI.COMM_WORLD.Get_rank())
    except SealConfigError as exc:
        error, sealer = exc, seal.PLAIN
    on = int(sealer.enabled)
    votes = array("i", [comm.rank if error else comm.size, on, 1 - on])
    wait(comm.Iallreduce(MPI.IN_PLACE, [votes, MPI.INT], op=MPI.MIN), comm, "start-sealing")
    first_failing, all_on, all_off = votes
    if first_failing < comm.size:
        if error is None:
            error = SealConfigError(f"rank {first_failing} cannot start sealing", report=False)
        error.report = comm.rank == first_failing
        raise error
    if not (all_on or all_off):
        raise SealConfigError("PYDRA_JOB_KEY is set on some ranks and not on others: every rank needs the same key",
                              report=comm.rank == 0)
    if on:
        assert isinstance(sealer, seal.Sealer)
        if not _same_key(comm, sealer):
            raise SealConfigError("the ranks do not share one PYDRA_JOB_KEY: every rank needs the same key",
                                  report=comm.rank == 0)
        _sealer, _started_sealed = sealer, True
        send, try_receive = _sealed_send, _sealed_try_receive
        Outbox.post = Outbox._post_sealed  # type: ignore[method-assign]
    else:
        _start_sharing(comm)
    _started = True
    return sealer


def _start_sharing(comm: MPI.Intracomm) -> None:
    """Collective: map the arenas of the members on this host (:mod:`shm`); if one cannot, none shares."""
    startup.reached("start-sharing")
    records = bytearray(shm.RECORD_BYTES * comm.size)
    wait(comm.Iallgather([shm.offer(setting("SHM_BYTES")), MPI.BYTE], [records, MPI.BYTE]), comm, "start-sharing")
    votes = array("i", [int(shm.accept(records, world_ranks(comm), comm.rank))])
    wait(comm.Iallreduce(MPI.IN_PLACE, [votes, MPI.INT], op=MPI.MIN), comm, "start-sharing")
    if not votes[0]:
        shm.stop()


def _same_key(comm: MPI.Intracomm, sealer: seal.Sealer) -> bool:
    """Collective: whether every member opens a probe sealed by member 0 (else they would hang, all dropped)."""
    probe = sealer.seal(b"", seal.ALL, "key-check") if comm.rank == 0 else bytearray(seal.OVERHEAD)
    wait(comm.Ibcast([probe, MPI.BYTE], 0), comm, "start-sealing")
    ok = 1
    if comm.rank != 0:
        try:
            sealer.open(probe, world_ranks(comm)[0], "key-check", dest=seal.ALL)
        except SealError:
            ok = 0
    votes = array("i", [ok])
    wait(comm.Iallreduce(MPI.IN_PLACE, [votes, MPI.INT], op=MPI.MIN), comm, "start-sealing")
    return bool(votes[0])
