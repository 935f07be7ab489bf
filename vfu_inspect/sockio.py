"""UNIX-socket I/O with file descriptors, shared by the proxy and the endpoints."""

from __future__ import annotations

import array
import errno
import os
import socket
import stat
from typing import Any

from .errors import ListenError
from .framing import Framer, Frame

MAX_FDS_PER_RECV = 253          # SCM_MAX_FD: the kernel's limit for one message
RECV_CHUNK = 256 * 1024
_ANCILLARY = socket.CMSG_SPACE(MAX_FDS_PER_RECV * array.array("i").itemsize)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)    # an int: the enum's & costs ~2 us, every read


class PeerClosed(Exception):
    """The other end closed the connection."""


def recv_chunk(sock: socket.socket, size: int = RECV_CHUNK) -> tuple[bytes, list[int]]:
    """One recvmsg: bytes and the fds that came with them ("" at EOF)."""
    data, ancdata, flags, _ = sock.recvmsg(size, _ANCILLARY)
    fds = fds_from_ancillary(ancdata)
    if flags & _MSG_CTRUNC:
        # More fds than we can take: the kernel closed the rest.  Say so loudly.
        raise OSError("ancillary data truncated: the peer passed more than "
                      f"{MAX_FDS_PER_RECV} fds in one message")
    return data, fds


def fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % array.array("i").itemsize
            fds.extend(array.array("i", payload[:usable]))
    return fds


def send_all(sock: socket.socket, data: bytes, fds: list[int] = ()) -> None:
    """Send bytes with fds on the first byte (blocking socket)."""
    view = memoryview(data)
    sent = socket.send_fds(sock, [view], list(fds)) if fds else sock.send(view)
    while sent < len(view):
        sent += sock.send(view[sent:])


def fd_info(fd: int) -> dict[str, Any]:
    """What a passed fd is: kind, size and inode, as the capture records it."""
    try:
        st = os.fstat(fd)
    except OSError:
        return {"kind": "other"}
    kind = "other"
    if stat.S_ISSOCK(st.st_mode):
        kind = "socket"
    elif stat.S_ISREG(st.st_mode):
        kind = "memfd" if _link(fd).startswith("/memfd:") else "file"
    elif _link(fd) == "anon_inode:[eventfd]":
        kind = "eventfd"
    info: dict[str, Any] = {"kind": kind, "inode": st.st_ino}
    if stat.S_ISREG(st.st_mode):
        info["size"] = st.st_size
    return info


def _link(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


class MessageSocket:
    """A blocking vfio-user connection: whole messages in, whole messages out."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._framer = Framer()
        self._ready: list[Frame] = []

    def send(self, data: bytes, fds: list[int] = ()) -> None:
        send_all(self.sock, data, fds)

    def recv(self) -> Frame:
        """The next whole message; raises PeerClosed at EOF."""
        while not self._ready:
            data, fds = recv_chunk(self.sock)
            if not data:
                for fd in fds:
                    os.close(fd)
                raise PeerClosed("peer closed the connection")
            self._ready.extend(self._framer.feed(data, fds))
        return self._ready.pop(0)

    def buffered(self) -> bool:
        """Whole messages already received and not yet returned by recv()."""
        return bool(self._ready)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


# --- the listening socket ---------------------------------------------------------------

def listen_unix(path: str, mode: int = 0o600) -> socket.socket:
    """Listen on `path`, replacing only a stale socket, never another file."""
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    sock.listen(16)
    return sock


def _clear_stale(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenError(f"{path} exists and is not a socket: refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)         # nobody listens: a leftover from a dead process
        return
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise ListenError(f"cannot use {path}: {exc.strerror}") from None
        return
    finally:
        probe.close()
    raise ListenError(f"{path} is in use by another process")


def unlink_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass
