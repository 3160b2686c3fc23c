"""The document worker process's side of the pool (`pool.py` is the daemon's side).

A worker is a fresh interpreter started on `_child_main` with one end of a socket pair: it reads
a task (a length-prefixed pickle of a function and its arguments), runs it, and writes back its
result or its exception the same way, until the daemon closes the socket. This module imports
only what that needs, so an idle worker is a bare interpreter: the libraries a task needs
(pypdf, PIL, PDFium) come in with its first task.
"""

from __future__ import annotations

import gc
import os
import pickle
import resource
import signal
import socket
import struct
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

# Scheduling priority of the workers relative to the daemon (nice increment).
WORKER_NICE = 5

# A frame on a worker's socket: the length of the pickle that follows, 8 bytes big-endian.
_HEAD = struct.Struct("!Q")
# Below this a frame goes out in one write (header and pickle joined); above, in two, so a
# large argument or result is never copied just to put 8 bytes in front of it.
_JOIN_BELOW = 64 * 1024


def _init_child(max_bytes: int, parent_pid: int) -> None:
    """In each worker: the memory limit, and death with the parent (a kill -9 of the daemon
    must not leave workers behind holding its sockets and pipes)."""
    # ^C at a terminal reaches the whole process group: the daemon stops in order and the
    # workers end when their socket closes, not in the middle of a task with a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        # Conversions are batch work; the daemon's loop answers SMTP and webhooks and must
        # not wait for a CPU behind them (on 2 cores, two busy workers stalled it 150+ ms).
        os.nice(WORKER_NICE)
    except OSError:
        pass
    if max_bytes > 0:
        resource.setrlimit(resource.RLIMIT_AS, (max_bytes, max_bytes))
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(0)  # the daemon died while this worker was still starting up


def call(target: str, *args: Any, **kwargs: Any) -> Any:
    """Run `module:function` in the worker: the daemon never imports the module itself (the
    PDF and image libraries stay out of its memory)."""
    import importlib

    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)(*args, **kwargs)


def _task(fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
    """Every task in a worker: the function, then, after a large one, its memory handed back."""
    before = _resident_bytes()
    try:
        return fn(*args, **kwargs)
    finally:
        if _resident_bytes() - before > RELEASE_AFTER_BYTES:
            _release_memory()


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return 0


_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
# A task that grew the worker by more than this (a large scan, never ordinary mail) is
# followed by a collection and a trim: they cost 5-80 ms, too much after every small task.
RELEASE_AFTER_BYTES = 16 * 1024 * 1024


def _release_memory() -> None:
    """Give the memory a task used back to the system, now rather than some day.

    The parsed mail and pypdf's objects hold reference cycles, so a 20 MB scan's buffers
    outlive the task until the cyclic collector happens to run (each task left ~20 MB more
    behind); and glibc keeps freed heap by default."""
    gc.collect()
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):  # not glibc
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM: Any = None


def _recv_exactly(sock: socket.socket, size: int) -> bytearray | None:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            return None  # the daemon closed its end: time to go
        got += n
    return buf


def _frame(payload: bytes) -> tuple[bytes, ...]:
    """The pieces that send `payload` as one frame (both ends write frames so)."""
    head = _HEAD.pack(len(payload))
    return (head + payload,) if len(payload) < _JOIN_BELOW else (head, payload)


def _child_main() -> None:
    """A worker process's entry (see `_Process`): `python -c ... FD MAX_BYTES PARENT_PID`."""
    fd, max_bytes, parent_pid = (int(arg) for arg in sys.argv[1:4])
    _worker_main(socket.socket(fileno=fd), max_bytes, parent_pid)


def _worker_main(sock: socket.socket, max_bytes: int, parent_pid: int) -> None:
    """A worker process: read a task, run it, write its result or its exception; until the
    daemon closes the socket."""
    _init_child(max_bytes, parent_pid)
    while True:
        head = _recv_exactly(sock, _HEAD.size)
        if head is None:
            return
        (size,) = _HEAD.unpack(head)
        try:
            body = _recv_exactly(sock, size)
            if body is None:
                return
            fn, args, kwargs = pickle.loads(body)
            del body
            reply: tuple[bool, Any, str] = (True, _task(fn, args, kwargs), "")
        except BaseException as exc:  # noqa: BLE001 (every failure goes back to the caller)
            reply = (False, exc, traceback.format_exc())
        try:
            payload = pickle.dumps(reply, pickle.HIGHEST_PROTOCOL)
        except BaseException as exc:  # noqa: BLE001 (an unpicklable result or exception)
            payload = pickle.dumps((False, RuntimeError(
                f"document task's {'result' if reply[0] else 'exception'} could not be sent "
                f"back: {type(exc).__name__}: {exc}"), reply[2]), pickle.HIGHEST_PROTOCOL)
        del reply
        for piece in _frame(payload):
            sock.sendall(piece)
        del payload
