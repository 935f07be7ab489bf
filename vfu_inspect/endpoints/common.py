"""What the sample server and client share: building messages, a peer that
sends, receives and records them, and the device's register map."""

from __future__ import annotations

import errno
import json
import os
import struct
import threading
import time
from typing import Any

from ..capture import CaptureWriter
from ..dissectors import vfio_user as proto
from ..dissectors.device_sample import DEVICE_ID, VENDOR_ID, SampleBar0
from ..framing import Frame
from ..records import C2S, MAIN, S2C
from ..sockio import MessageSocket, fd_info

# BAR0 register map of the sample device: its dissector declares it.
REG_ID, REG_SCRATCH, REG_DMA_ADDR, REG_DMA_LEN, REG_DMA_CMD, REG_IRQ = (
    offset for _, offset, _ in SampleBar0.vfu_compiled.fields)
DMA_TO_DEVICE, DMA_FROM_DEVICE = 1, 2     # REG_DMA_CMD values
BAR0_SIZE, BAR2_SIZE, CONFIG_SIZE = 0x1000, 0x4000, 0x100
BAR2_AREAS = ((0x0, 0x1000), (0x2000, 0x1000))
MSIX_VECTORS = 4
DOORBELL_VECTOR = 3        # REG_IRQ's ioeventfd: a write of this value (its datamatch)
DEFAULT_ID_VALUE = 0x31554656             # "VFU1"
PAGE = 4096

_HEADER = proto.Header.vfu_compiled.struct


def pack(layer: type, *values: Any) -> bytes:
    """A layer's fixed part, fields in declaration order."""
    return layer.vfu_compiled.struct.pack(*values)


def unpack(layer: type, data: bytes, offset: int = proto.HEADER_SIZE) -> tuple:
    return layer.vfu_compiled.struct.unpack_from(data, offset)


def message(msg_id: int, cmd: int, payload: bytes = b"", flags: int = 0, error: int = 0) -> bytes:
    return _HEADER.pack(msg_id & 0xFFFF, cmd, proto.HEADER_SIZE + len(payload), flags,
                        error) + payload


def reply_to(request: bytes, payload: bytes = b"") -> bytes:
    h = proto.parse_header(request)
    return message(h.msg_id, h.cmd, payload, proto.TYPE_REPLY)


def error_to(request: bytes, errno_value: int) -> bytes:
    h = proto.parse_header(request)
    return message(h.msg_id, h.cmd, b"", proto.TYPE_REPLY | proto.FLAG_ERROR, errno_value)


def version_payload(minor: int, caps: dict[str, Any]) -> bytes:
    return pack(proto.Version, 0, minor) + json.dumps({"capabilities": caps}).encode() + b"\0"


def parse_caps(payload: bytes) -> dict[str, Any]:
    """The capabilities of a VERSION payload (raises ValueError on bad JSON)."""
    text = payload[4:].rstrip(b"\0")
    return json.loads(text).get("capabilities", {}) if text else {}


class ProtocolError(Exception):
    """The peer broke the protocol or answered something unexpected."""


class Peer:
    """One socket of a vfio-user connection: send, receive, record.

    `role` is the endpoint's side ("client" or "server"), which decides the
    direction recorded for what it sends and receives.
    """

    def __init__(self, conn: MessageSocket, role: str, channel: int = MAIN,
                 recorder: "Recorder | None" = None, conn_id: int = 0) -> None:
        self.conn = conn
        self.conn_id = conn_id
        self.channel = channel
        self.recorder = recorder
        self.sent_dir = C2S if role == "client" else S2C
        self._next_id = 0
        self._lock = threading.Lock()

    def new_id(self) -> int:
        with self._lock:
            self._next_id = (self._next_id + 1) & 0xFFFF
            return self._next_id

    def send(self, data: bytes, fds: list[int] = ()) -> None:
        if self.recorder:
            self.recorder.record(self.conn_id, self.channel, self.sent_dir, data, fds)
        with self._lock:
            self.conn.send(data, list(fds))

    def recv(self) -> Frame:
        frame = self.conn.recv()
        if frame.error:
            raise ProtocolError(f"cannot frame the peer's stream: {frame.error}")
        if self.recorder:
            self.recorder.record(self.conn_id, self.channel, 1 - self.sent_dir, frame.data,
                                 frame.fds)
        return frame


class Recorder:
    """Writes what an endpoint sent and received (--record FILE)."""

    def __init__(self, path: str, source: str) -> None:
        self.writer = CaptureWriter(path, source=source)
        self._lock = threading.Lock()

    def record(self, conn: int, channel: int, direction: int, data: bytes,
               fds: list[int]) -> None:
        with self._lock:
            self.writer.message(time.time_ns(), conn, channel, direction, data,
                                [fd_info(fd) for fd in fds])

    def close(self) -> None:
        self.writer.close()


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def u64(data: bytes) -> int:
    return struct.unpack("<Q", data[:8].ljust(8, b"\0"))[0]


class DmaMemory:
    """A client's DMA windows (iova -> memory), answering the server's
    DMA_READ/DMA_WRITE commands from them."""

    def __init__(self) -> None:
        self.windows: dict[int, Any] = {}

    def window(self, addr: int, count: int) -> tuple[int, Any] | None:
        for base, memory in self.windows.items():
            if base <= addr and addr + count <= base + len(memory):
                return base, memory
        return None

    def serve(self, peer: Peer, frame: Frame) -> None:
        close_fds(frame.fds)
        h = proto.parse_header(frame.data)
        addr, count = unpack(proto.DmaRead, frame.data)
        found = self.window(addr, count)
        if found is None:
            peer.send(error_to(frame.data, errno.EFAULT))
            return
        base, memory = found
        if h.cmd == proto.CMD["DMA_READ"]:
            data = bytes(memory[addr - base:addr - base + count])
            peer.send(reply_to(frame.data, pack(proto.DmaRead, addr, count) + data))
        else:
            memory[addr - base:addr - base + count] = frame.data[proto.HEADER_SIZE + 16:]
            peer.send(reply_to(frame.data, pack(proto.DmaWrite, addr, count)))
