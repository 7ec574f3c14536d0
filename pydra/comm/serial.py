"""How every message of a job becomes bytes and back: pickle protocol 5, or the job's ``PYDRA_SERIALIZER``.

Call :func:`dumps`, :func:`dumps_oob` and :func:`loads` through the module
(``serial.dumps``): :func:`use` rebinds them once, at the start of a
session, on every rank. This module imports no MPI, so the sans-IO
scheduler may use it.

Out of band: :func:`dumps_oob` leaves out of the pickle every buffer of
:data:`OUT_OF_BAND_BYTES` or more that an object exposes through protocol 5
(``PickleBuffer``: numpy arrays, ``bytearray``, ``pickle.PickleBuffer`` of
anything with the buffer protocol) and returns them beside it, so that
:mod:`pydra.comm.mpi` can send each one with MPI's buffer calls instead of
copying it into the pickle; ``loads(data, buffers=...)`` takes them back.

Large ``bytes``, out of band: pickle copies a ``bytes`` object into the
message whatever its size (2 GiB hold the GIL for seconds: long enough, on a
busy host, to stop a rank's heartbeats). :func:`compact` gives one of
:data:`OUT_OF_BAND_BYTES` or more a wire form whose data goes out of band,
rebuilt on arrival with ``bytes()`` (one copy, as unpickling makes anyway).

Plain arrays, short: :func:`compact` gives a plain numpy array (exactly
``numpy.ndarray``, C order, of a builtin numeric or bool dtype in native
byte order) a wire form of its own: its buffer (in or out of band, as
numpy's own), its dtype's code and its shape, rebuilt with
``numpy.frombuffer``. numpy pickles a dtype as an object of its own (a
global looked up by import, arguments and an eight-field state), which is
more than half of what pickling a small array costs, and as much again to
unpickle it. The protocol applies it at the wire's edge to a call's
arguments and a reply's value (:mod:`pydra._core.protocol`); any other
object, an array inside a list included, is pickled as numpy pickles it,
and arrives the same either way. Only with ``pickle`` and ``cloudpickle``,
which pickle with the C pickler (:func:`use`).
"""

from __future__ import annotations

import importlib
import pickle
import sys
from typing import Any, Callable

PICKLE_PROTOCOL = 5

#: ``PYDRA_SERIALIZER`` values that are installable extras of pydra-mpi
SERIALIZERS = ("pickle", "cloudpickle", "dill")

#: buffers smaller than this are copied into the pickle: for them another MPI message costs more than the copy
OUT_OF_BAND_BYTES = 1 << 16


class Buffers(list):
    """The out-of-band buffers of one pickle, collected as pickle's ``buffer_callback``."""

    def __call__(self, buffer: pickle.PickleBuffer) -> bool | None:
        view = memoryview(buffer)
        if view.nbytes < OUT_OF_BAND_BYTES or not view.contiguous:
            return True  # in band
        self.append(buffer)
        return None  # out of band


class _NotLoaded:
    """Stands for ``numpy.ndarray`` until numpy is imported: the type of no object."""


_ndarray: type = _NotLoaded


def array_type() -> type:
    """``numpy.ndarray`` once the process has imported numpy (this module never imports it), else a type of nothing."""
    global _ndarray
    if _ndarray is _NotLoaded:
        _ndarray = getattr(sys.modules.get("numpy"), "ndarray", _NotLoaded)
    return _ndarray


def _compact(obj: Any) -> Any:
    """*obj*, or its wire form if it is a plain numpy array or large ``bytes`` (see above): ``loads`` gives it back."""
    kind = type(obj)
    if kind is bytes:
        return _LargeBytes(obj) if len(obj) >= OUT_OF_BAND_BYTES else obj
    if kind is array_type() and obj.flags.c_contiguous and obj.dtype.isbuiltin == 1 and not obj.dtype.hasobject:
        return _PlainArray(obj)
    return obj


def _compact_args(args: tuple) -> tuple:
    """*args* (the same tuple if it holds no array and no large ``bytes``), each of those in its wire form."""
    ndarray = array_type()
    for arg in args:
        if type(arg) is ndarray or type(arg) is bytes and len(arg) >= OUT_OF_BAND_BYTES:
            return tuple(map(_compact, args))
    return args


def _as_is(obj: Any) -> Any:
    return obj


#: *obj*, or its short wire form if it is a plain numpy array (rebound by :func:`use`)
compact: Callable[[Any], Any] = _compact
#: *args*, each plain numpy array in its short wire form: the same tuple if none is (rebound by :func:`use`)
compact_args: Callable[[tuple], tuple] = _compact_args

#: the serializers that take plain arrays' short form: pickle's C pickler (dill's is the pure-Python
#: one, whose in-band PickleBuffers trip its memo; dill pickles numpy arrays its own way anyway)
_SHORT_ARRAYS = ("pickle", "cloudpickle")


class _PlainArray:
    """A plain array on its way out: pickled as :func:`_array` of its buffer, dtype code and shape."""

    __slots__ = ("array",)

    def __init__(self, array: Any) -> None:
        self.array = array

    def __reduce__(self) -> tuple:
        array = self.array
        return _array, (pickle.PickleBuffer(array), array.dtype.str, array.shape)


class _LargeBytes:
    """A large ``bytes`` object on its way out: its data out of band, where pickle would copy it into the message."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce__(self) -> tuple:
        return bytes, (pickle.PickleBuffer(self.data),)


def _array(buffer: Any, code: str, shape: tuple) -> Any:
    """A plain array back from its wire form (as numpy's own unpickling does: a view of *buffer*)."""
    import numpy  # imported already: the sender had an array, and so does the buffer's receiver

    return numpy.frombuffer(buffer, code).reshape(shape)


def dumps(obj: Any) -> bytes:
    """Serialise *obj* for the wire, every buffer in band (rebound by :func:`use`)."""
    return pickle.dumps(obj, PICKLE_PROTOCOL)


def dumps_oob(obj: Any) -> tuple[bytes, list[pickle.PickleBuffer]]:
    """Serialise *obj* for the wire: the pickle, and the large buffers left out of it (rebound by :func:`use`)."""
    buffers = Buffers()
    return pickle.dumps(obj, PICKLE_PROTOCOL, buffer_callback=buffers), buffers


#: Deserialise a message, given its out-of-band buffers as ``buffers=`` (rebound by :func:`use`).
loads: Callable[..., Any] = pickle.loads

_pickle_dumps, _pickle_dumps_oob = dumps, dumps_oob


def use(name: str) -> None:
    """Pickle every message of this process with module *name*'s ``dumps``/``loads`` (protocol 5).

    ``pickle`` is the default; ``cloudpickle`` and ``dill`` also send lambdas,
    closures and classes defined in ``__main__``. Every rank must use the same
    one: its output is read with its own ``loads``. Raises ``ValueError`` (one
    line) if the module cannot be imported or lacks the two functions. A
    module whose functions take no ``buffer_callback`` and ``buffers``
    (pickle's out-of-band arguments) pickles every buffer in band.
    mpi4py's own object messages (``comm.bcast`` in a gang task) follow suit.
    Plain arrays and large ``bytes`` keep their wire forms (:func:`compact`)
    under ``pickle`` and ``cloudpickle`` only.
    """
    global dumps, dumps_oob, loads, compact, compact_args
    if name == "pickle":
        compact, compact_args = _compact, _compact_args
        dumps, dumps_oob, loads = _pickle_dumps, _pickle_dumps_oob, pickle.loads
        return
    try:
        module = serializer_module(name)
    except ValueError as exc:
        raise ValueError(f"PYDRA_SERIALIZER={name!r}: {exc}") from None
    compact, compact_args = (_compact, _compact_args) if name in _SHORT_ARRAYS else (_as_is, _as_is)
    module_dumps, module_loads = module.dumps, module.loads
    dumps = lambda obj: module_dumps(obj, protocol=PICKLE_PROTOCOL)  # noqa: E731
    if _takes_buffers(module_dumps, module_loads):
        def dumps_oob(obj: Any) -> tuple[bytes, list[pickle.PickleBuffer]]:
            buffers = Buffers()
            return module_dumps(obj, protocol=PICKLE_PROTOCOL, buffer_callback=buffers), buffers

        loads = module_loads
    else:
        dumps_oob = lambda obj: (dumps(obj), [])  # noqa: E731
        loads = lambda data, buffers=(): module_loads(data)  # noqa: E731
    # mpi4py's object collectives too: a gang task's self.comm.bcast(lambda) then works.
    from mpi4py import MPI

    MPI.pickle.__init__(module_dumps, module_loads, PICKLE_PROTOCOL)


def note_what_would_send_it(error: BaseException) -> None:
    """If plain pickle refused a lambda or a closure, say on *error* which serializer sends those."""
    refused_by_name = isinstance(error, pickle.PicklingError) or (
        isinstance(error, AttributeError) and "local object" in str(error))
    if dumps is _pickle_dumps and refused_by_name:
        error.add_note("(pickle sends a function by its importable name; for lambdas and closures"
                       " set PYDRA_SERIALIZER=cloudpickle on every rank: pip install 'pydra-mpi[cloudpickle]')")


def serializer_module(name: str) -> Any:
    """The module *name*, if it can serve as ``PYDRA_SERIALIZER``; ``ValueError`` saying why not, in a few words.

    It must import, and its ``dumps(obj, protocol=5)`` and ``loads`` must
    give back a small list (``json``'s take no ``protocol``, say).
    """
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        extra = f" (pip install 'pydra-mpi[{name}]')" if name in SERIALIZERS else ""
        raise ValueError(f"cannot import {name}{extra}: {exc}") from None
    module_dumps, module_loads = getattr(module, "dumps", None), getattr(module, "loads", None)
    if not (callable(module_dumps) and callable(module_loads)):
        raise ValueError(f"the module {name} has no dumps() and loads()")
    probe = [1, "x", None]
    try:
        works = module_loads(module_dumps(probe, protocol=PICKLE_PROTOCOL)) == probe
    except Exception as exc:  # whatever the module's functions raise for pickle's arguments
        raise ValueError(f"{name}.dumps(obj, protocol={PICKLE_PROTOCOL}) and {name}.loads do not work as pickle's:"
                         f" {type(exc).__name__}: {exc}") from None
    if not works:
        raise ValueError(f"{name}.loads(dumps(obj)) does not give obj back")
    return module


def _takes_buffers(module_dumps: Callable, module_loads: Callable) -> bool:
    """Whether this pair moves a buffer out of band and back, as pickle's own functions do."""
    buffers: list = []
    try:
        data = module_dumps(pickle.PickleBuffer(bytearray(b"x")), protocol=PICKLE_PROTOCOL,
                            buffer_callback=buffers.append)
        return len(buffers) == 1 and bytes(module_loads(data, buffers=buffers)) == b"x"
    except Exception:  # the module's functions take other arguments
        return False
