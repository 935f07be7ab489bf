"""The sample device server: a small PCI DMA/interrupt device over vfio-user.

Device: BAR0 holds registers (see common.py) and the MSI-X table; BAR2 is
16 KiB of memory backed by a memfd, mmap-able in two sparse areas; the
config space has a PM and an MSI-X capability.  Writing REG_DMA_CMD makes
the device copy between BAR2 and client memory, through the client's fd
when the map has one and with DMA_READ/DMA_WRITE messages otherwise;
writing REG_IRQ fires an interrupt (MSI-X once the client assigned MSI-X
eventfds, INTx before), and so does REG_IRQ's ioeventfd (REGION_IO_FDS: a
doorbell that stands for writing DOORBELL_VECTOR there).  The device state
(registers, BAR2, migration state) outlives a client, as the spec asks.
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Callable

from .common import (BAR0_SIZE, BAR2_AREAS, BAR2_SIZE, CONFIG_SIZE, DEFAULT_ID_VALUE,
                     DEVICE_ID, DMA_FROM_DEVICE, DMA_TO_DEVICE, DOORBELL_VECTOR, MSIX_VECTORS,
                     PAGE, REG_DMA_ADDR,
                     REG_DMA_CMD, REG_ID, REG_IRQ, VENDOR_ID, Peer, ProtocolError,
                     Recorder, close_fds, error_to, message, pack, parse_caps, reply_to, unpack,
                     version_payload)
from ..dissectors import vfio_user as proto
from ..dissectors.vfio_user.core import file_under
from ..errors import ListenError
from ..records import TWIN
from ..sockio import MessageSocket, PeerClosed, listen_unix, unlink_socket

CMD = proto.CMD
OUR_MINOR = 2
BAR_SIZES = {0: BAR0_SIZE, 2: BAR2_SIZE}
IRQ_COUNTS = {0: 1, 1: 0, 2: MSIX_VECTORS, 3: 1, 4: 1}
REGION_FLAGS_RW = proto.REGION_FLAGS["read"] | proto.REGION_FLAGS["write"]
# Direct arcs of the migration state machine (spec); others are refused.
MIG_ARCS = {(2, 1), (3, 1), (4, 1), (6, 2), (1, 2), (2, 6), (1, 3), (6, 3), (1, 4)}
MIG_RUNNING, MIG_STOP, MIG_RESUMING = 2, 1, 4
MIG_SAVING = {3, 6}


# The server's answer to each command a client sends, filed by `answers`
# under the command's name: a Session method given the request and its fds
# (none unless its family says the request carries some), returning the
# reply's payload and fds, or an errno for an error reply.
Answer = Callable[["Session", bytes, list[int]], "tuple[bytes, list[int]] | int"]
ANSWERS: dict[int, Answer] = {}


def answers(*names: str) -> Callable[[Answer], Answer]:
    return file_under(ANSWERS, names)


@dataclass
class ServerOptions:
    id_value: int = DEFAULT_ID_VALUE
    errno_for: dict[int, int] = field(default_factory=dict)   # command -> errno
    accept_overlap: bool = False
    no_twin: bool = False
    dma_via_messages: bool = False
    caps_when_truncated: bool = False   # Linux VFIO's truncated REGION_INFO: QEMU refuses it
    no_mmap: bool = False               # BAR2 by messages only: QEMU then posts MMIO writes
    record: str | None = None


class Device:
    """The emulated device; one instance serves every client in turn."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.lock = threading.RLock()
        self.bar2_fd = os.memfd_create("vfu-sample-bar2")
        os.ftruncate(self.bar2_fd, BAR2_SIZE)
        self.bar2 = mmap.mmap(self.bar2_fd, BAR2_SIZE)
        self.bar0 = bytearray(BAR0_SIZE)
        self.config = _config_space()
        self.mig_state = MIG_RUNNING
        self.reset()

    def reset(self) -> None:
        self.bar0[:] = bytes(BAR0_SIZE)
        struct.pack_into("<Q", self.bar0, REG_ID, self.options.id_value)
        self.bar2[:] = bytes(BAR2_SIZE)

    def state_blob(self) -> bytes:
        return bytes(self.bar0) + bytes(self.bar2) + bytes(self.config)

    def load_blob(self, blob: bytes) -> None:
        if len(blob) != BAR0_SIZE + BAR2_SIZE + CONFIG_SIZE:
            raise ValueError(f"migration stream of {len(blob)} bytes")
        self.bar0[:] = blob[:BAR0_SIZE]
        self.bar2[:] = blob[BAR0_SIZE:BAR0_SIZE + BAR2_SIZE]
        self.config[:] = blob[BAR0_SIZE + BAR2_SIZE:]


def _config_space() -> bytearray:
    """Type 0 header, then PM (0x40) and MSI-X (0x50) capabilities."""
    c = bytearray(CONFIG_SIZE)
    struct.pack_into("<HHHH", c, 0x00, VENDOR_ID, DEVICE_ID, 0x0000, 0x0010)  # status: caps
    struct.pack_into("<I", c, 0x08, 0xFF000001)          # class: unassigned, revision 1
    struct.pack_into("<I", c, 0x10, 0x0)                 # BAR0: 32-bit memory
    struct.pack_into("<I", c, 0x18, 0x0)                 # BAR2: 32-bit memory
    struct.pack_into("<HH", c, 0x2C, VENDOR_ID, DEVICE_ID)
    c[0x34] = 0x40                                       # capability pointer
    c[0x3D] = 1                                          # INTA
    struct.pack_into("<BBHH", c, 0x40, 0x01, 0x50, 0x0003, 0x0000)          # PM
    struct.pack_into("<BBHII", c, 0x50, 0x11, 0x00, MSIX_VECTORS - 1,       # MSI-X
                     0x800, 0xC00)                       # table, PBA in BAR0
    return c


class Session:
    """One client connection."""

    def __init__(self, sock: socket.socket, device: Device, conn_id: int,
                 recorder: Recorder | None) -> None:
        self.device = device
        self.options = device.options
        self.conn_id = conn_id
        self.recorder = recorder
        self.main = Peer(MessageSocket(sock), "server", recorder=recorder, conn_id=conn_id)
        self.twin: Peer | None = None
        self.client_caps: dict = {}
        self.maps: list[DmaMapping] = []
        self.irqs: dict[int, dict[int, int]] = {i: {} for i in IRQ_COUNTS}
        self.masked: set[tuple[int, int]] = set()
        self.backlog: list = []
        self.after_reply: list[Callable[[], None]] = []    # device work once answered
        self.mig_out = b""
        self.mig_in = bytearray()
        self.logging: list[tuple[int, int]] | None = None
        self.dirty: set[int] = set()
        self.doorbells: list[int] = []          # our ioeventfds, each read by its thread
        self.closed = False

    # --- the loop ---------------------------------------------------------------

    def run(self) -> None:
        try:
            while True:
                frame = self.backlog.pop(0) if self.backlog else self.main.recv()
                self.handle(frame)
        except (PeerClosed, ProtocolError, OSError):
            pass
        finally:
            self.cleanup()

    def handle(self, frame) -> None:
        msg = frame.data
        h = proto.parse_header(msg)
        if h is None or h.is_reply:
            close_fds(frame.fds)
            return                               # nothing of ours is waiting: drop it
        answer, fds = ANSWERS.get(h.cmd), frame.fds
        if answer is None or h.cmd in self.options.errno_for \
                or (h.cmd, "command") not in proto.FD_CARRIERS:
            close_fds(fds)           # an errno answers it, or its family says it carries none
            fds = []
        if h.cmd in self.options.errno_for:
            result: tuple | int = self.options.errno_for[h.cmd]
        elif answer is None:
            result = errno.ENOSYS
        else:
            with self.device.lock:
                result = answer(self, msg, fds)
        if not h.no_reply:
            if isinstance(result, int):
                self.main.send(error_to(msg, result))
            else:
                payload, reply_fds = result
                self.main.send(reply_to(msg, payload), reply_fds)
                close_fds(reply_fds)
        while self.after_reply:
            self.after_reply.pop(0)()

    def cleanup(self) -> None:
        """Client gone: drop its maps and eventfds, keep the device state."""
        for mapping in self.maps:
            mapping.close()
        for vectors in self.irqs.values():
            close_fds(list(vectors.values()))
        self.closed = True
        for doorbell in self.doorbells:
            os.eventfd_write(doorbell, 1)       # its thread sees `closed` and closes it
        self.main.conn.close()
        if self.twin is not None:
            self.twin.conn.close()

    # --- commands ------------------------------------------------------------

    @answers("VERSION")
    def version(self, msg: bytes, fds: list[int]):
        major, minor = unpack(proto.Version, msg)
        if major != 0:
            raise ProtocolError(f"client proposed major {major}")
        try:
            self.client_caps = parse_caps(msg[proto.HEADER_SIZE:])
        except ValueError:
            return errno.EINVAL
        caps = {"max_msg_fds": 8, "max_data_xfer_size": 1 << 20, "pgsizes": PAGE,
                "migration": {"pgsize": PAGE}, "write_multiple": True}
        out_fds: list[int] = []
        if self.client_caps.get("twin_socket", {}).get("supported") and not self.options.no_twin:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            self.twin = Peer(MessageSocket(ours), "server", TWIN, self.recorder, self.conn_id)
            caps["twin_socket"] = {"supported": True, "fd_index": 0}
            out_fds = [theirs.detach()]
        return version_payload(min(minor, OUR_MINOR), caps), out_fds

    @answers("DMA_MAP")
    def dma_map(self, msg: bytes, fds: list[int]):
        argsz, flags, offset, iova, size = unpack(proto.DmaMap, msg)
        if flags & ~0x3 or len(fds) > 1 or size == 0:
            close_fds(fds)
            return errno.EINVAL
        if not self.options.accept_overlap and any(m.overlaps(iova, size) for m in self.maps):
            close_fds(fds)
            return errno.EEXIST
        fd = fds[0] if fds and not self.options.dma_via_messages else None
        if fds and fd is None:
            close_fds(fds)
        self.maps.append(DmaMapping(iova, size, offset, fd))
        return b"", []

    @answers("DMA_UNMAP")
    def dma_unmap(self, msg: bytes, fds: list[int]):
        argsz, flags, iova, size = unpack(proto.DmaUnmap, msg)
        if flags & proto.DMA_UNMAP_FLAGS["all"]:
            doomed = list(self.maps)
        else:
            doomed = [m for m in self.maps if (m.iova, m.size) == (iova, size)]
            if not doomed:
                return errno.ENOENT
        for mapping in doomed:
            mapping.close()
            self.maps.remove(mapping)
        return msg[proto.HEADER_SIZE:proto.HEADER_SIZE + 24], []

    @answers("DEVICE_GET_INFO")
    def device_info(self, msg: bytes, fds: list[int]):
        return pack(proto.DeviceInfo, 16, 0x3, 9, len(IRQ_COUNTS)), []

    @answers("DEVICE_GET_REGION_INFO")
    def region_info(self, msg: bytes, fds: list[int]):
        argsz, _, index, _, _, _ = unpack(proto.RegionInfo, msg)
        if index > 8:
            return errno.EINVAL
        size = {7: CONFIG_SIZE}.get(index, BAR_SIZES.get(index, 0))
        flags = REGION_FLAGS_RW if size else 0
        if index != 2 or self.options.no_mmap:
            return pack(proto.RegionInfo, 32, flags, index, 0, size, 0), []
        caps = (pack(proto.RegionCap, 1, 1, 0) + pack(proto.SparseMmap, len(BAR2_AREAS), 0)
                + b"".join(pack(proto.SparseArea, o, s) for o, s in BAR2_AREAS))
        full = 32 + len(caps)
        flags |= proto.REGION_FLAGS["mmap"]
        if argsz < full:
            # Too small a buffer: say how much is needed, send no fd, and (as
            # libvfio-user does) no CAPS flag, whose cap_offset would lie
            # outside the reply.
            if self.options.caps_when_truncated:
                flags |= proto.REGION_FLAGS["caps"]
            return pack(proto.RegionInfo, full, flags, index, 0, size, 0), []
        return pack(proto.RegionInfo, full, flags | proto.REGION_FLAGS["caps"], index, 32,
                    size, 0) + caps, [os.dup(self.device.bar2_fd)]

    @answers("DEVICE_GET_REGION_IO_FDS")
    def region_io_fds(self, msg: bytes, fds: list[int]):
        argsz, _, index, _ = unpack(proto.RegionIoFds, msg)
        if index != 0:
            return pack(proto.RegionIoFds, 16, 0, index, 0), []
        sub = pack(proto.SubRegion, REG_IRQ, 8, 0, 0, proto.IO_FD_FLAGS["datamatch"], 0,
                   DOORBELL_VECTOR)
        doorbell = os.eventfd(0)
        self.doorbells.append(doorbell)
        threading.Thread(target=self.serve_doorbell, args=(doorbell,), daemon=True).start()
        return pack(proto.RegionIoFds, 16 + len(sub), 0, index, 1) + sub, [os.dup(doorbell)]

    def serve_doorbell(self, doorbell: int) -> None:
        """Each signal of the ioeventfd raises the interrupt a write of its datamatch
        to REG_IRQ would (without storing the value: a replay rings no doorbell)."""
        while os.eventfd_read(doorbell) and not self.closed:
            with self.device.lock:
                self.raise_irq(DOORBELL_VECTOR)
        os.close(doorbell)

    @answers("DEVICE_GET_IRQ_INFO")
    def irq_info(self, msg: bytes, fds: list[int]):
        _, _, index, _ = unpack(proto.IrqInfo, msg)
        if index not in IRQ_COUNTS:
            return errno.EINVAL
        flags = 0x1 | (0x2 if index == 0 else 0x8)
        return pack(proto.IrqInfo, 16, flags, index, IRQ_COUNTS[index]), []

    @answers("DEVICE_SET_IRQS")
    def set_irqs(self, msg: bytes, fds: list[int]):
        argsz, flags, index, start, count = unpack(proto.SetIrqs, msg)
        vectors = self.irqs.get(index)
        if vectors is None or start + count > IRQ_COUNTS[index]:
            close_fds(fds)
            return errno.EINVAL
        data = flags & proto.SET_IRQS_DATA
        action = flags & proto.SET_IRQS_ACTION
        if data == 0x4:                                    # eventfds: (re)assign
            if fds and len(fds) != count:
                close_fds(fds)
                return errno.EINVAL
            for i in range(count):
                old = vectors.pop(start + i, None)
                if old is not None:
                    os.close(old)
                if fds:
                    vectors[start + i] = fds[i]
        elif data == 0x1 and action == 0x20 and count == 0:  # disable the index
            close_fds(list(vectors.values()))
            vectors.clear()
        elif action in (0x8, 0x10):
            for i in range(start, start + count):
                (self.masked.add if action == 0x8 else self.masked.discard)((index, i))
        elif action == 0x20:
            bools = msg[proto.HEADER_SIZE + 20:] if data == 0x2 else b"\1" * count
            for i, fire in enumerate(bools[:count]):
                if fire:
                    self.fire(index, start + i)
        return b"", []

    def fire(self, index: int, vector: int) -> None:
        fd = self.irqs[index].get(vector)
        if fd is not None and (index, vector) not in self.masked:
            os.eventfd_write(fd, 1)

    def _region(self, index: int, offset: int, count: int) -> memoryview | None:
        backing = {0: self.device.bar0, 2: self.device.bar2, 7: self.device.config}.get(index)
        if backing is None or offset + count > len(backing) or count > (1 << 20):
            return None
        return memoryview(backing)[offset:offset + count]

    @answers("REGION_READ")
    def region_read(self, msg: bytes, fds: list[int]):
        offset, index, count = unpack(proto.RegionRead, msg)
        view = self._region(index, offset, count)
        if view is None:
            return errno.EINVAL
        return msg[proto.HEADER_SIZE:proto.HEADER_SIZE + 16] + bytes(view), []

    @answers("REGION_WRITE")
    def region_write(self, msg: bytes, fds: list[int]):
        offset, index, count = unpack(proto.RegionWrite, msg)
        data = msg[proto.HEADER_SIZE + 16:]
        view = self._region(index, offset, count)
        if view is None or len(data) != count:
            return errno.EINVAL
        if index == 7:
            self.config_write(offset, data)
        else:
            view[:] = data
            if index == 0:
                error = self.register_written(offset)
                if error:
                    return error
        return msg[proto.HEADER_SIZE:proto.HEADER_SIZE + 16], []

    def config_write(self, offset: int, data: bytes) -> None:
        """BARs answer a sizing probe with their size mask; most else is read-only."""
        for i, byte in enumerate(data):
            pos = offset + i
            if 0x04 <= pos < 0x06 or pos == 0x3C or pos == 0x53:
                self.device.config[pos] = byte
        for bar, size in ((0x10, BAR0_SIZE), (0x18, BAR2_SIZE)):
            if offset <= bar and bar + 4 <= offset + len(data):
                value = struct.unpack_from("<I", data, bar - offset)[0]
                struct.pack_into("<I", self.device.config, bar, value & ~(size - 1) & 0xFFFFFFF0)

    def register_written(self, offset: int) -> int:
        bar0 = self.device.bar0
        if offset == REG_ID:
            struct.pack_into("<Q", bar0, REG_ID, self.options.id_value)   # read-only
        elif offset == REG_DMA_CMD:
            addr, length, cmd = struct.unpack_from("<QQQ", bar0, REG_DMA_ADDR)
            return self.dma(cmd, addr, length)
        elif offset == REG_IRQ:
            self.raise_irq(struct.unpack_from("<Q", bar0, REG_IRQ)[0])
        return 0

    def raise_irq(self, vector: int) -> None:
        """MSI-X `vector` once the client assigned MSI-X eventfds, INTx before."""
        index = 2 if self.irqs[2] else 0
        self.fire(index, vector if index == 2 else 0)

    # --- the DMA engine ---------------------------------------------------------

    def dma(self, cmd: int, addr: int, length: int) -> int:
        if length > BAR2_SIZE or cmd not in (DMA_TO_DEVICE, DMA_FROM_DEVICE):
            return errno.EINVAL
        mapping = next((m for m in self.maps if m.contains(addr, length)), None)
        if mapping is None:
            return errno.EFAULT
        if mapping.memory is None and self.twin is None:
            # The client waits for this write's reply on the main socket and
            # cannot serve a DMA request meanwhile (QEMU would time out): the
            # engine runs once the write is answered.
            self.after_reply.append(lambda: self.transfer(cmd, addr, length, mapping))
        else:
            self.transfer(cmd, addr, length, mapping)
        return 0

    def transfer(self, cmd: int, addr: int, length: int, mapping: DmaMapping) -> None:
        buffer = self.device.bar2
        if cmd == DMA_TO_DEVICE:
            buffer[:length] = mapping.read(addr, length) if mapping.memory else \
                self.dma_message(CMD["DMA_READ"], addr, length, b"")
        else:
            data = bytes(buffer[:length])
            if mapping.memory:
                mapping.write(addr, data)
            else:
                self.dma_message(CMD["DMA_WRITE"], addr, length, data)
            self.mark_dirty(addr, length)

    def dma_message(self, cmd: int, addr: int, length: int, data: bytes) -> bytes:
        """Ask the client to move the data, on the twin socket if there is one."""
        peer = self.twin or self.main
        msg_id = peer.new_id()
        peer.send(message(msg_id, cmd, pack(proto.DmaRead, addr, length) + data))
        while True:
            frame = peer.recv()
            h = proto.parse_header(frame.data)
            if h is not None and h.is_reply and h.msg_id == msg_id:
                break
            self.backlog.append(frame)      # a client request: after this one
        if h.is_error:
            raise ProtocolError(f"client refused {proto.COMMANDS[cmd]}: errno {h.error}")
        return frame.data[proto.HEADER_SIZE + 16:]

    def mark_dirty(self, addr: int, length: int) -> None:
        if self.logging is not None:
            self.dirty.update(range(addr // PAGE, (addr + length - 1) // PAGE + 1))

    # --- reset, write-multi, features, migration ----------------------------------

    @answers("DEVICE_RESET")
    def reset(self, msg: bytes, fds: list[int]):
        self.device.reset()
        return b"", []

    @answers("REGION_WRITE_MULTI")
    def write_multi(self, msg: bytes, fds: list[int]):
        (count,) = unpack(proto.WriteMulti, msg)
        entry = proto.WriteMultiEntry.vfu_compiled.size
        for i in range(count):
            offset, index, size, data = unpack(proto.WriteMultiEntry, msg,
                                               proto.HEADER_SIZE + 8 + i * entry)
            view = self._region(index, offset, size)
            if view is None or size > 8:
                return errno.EINVAL
            view[:] = data[:size]
        return pack(proto.WriteMulti, count), []

    @answers("DEVICE_FEATURE")
    def feature(self, msg: bytes, fds: list[int]):
        argsz, flags = unpack(proto.DeviceFeature, msg)
        feature, body = flags & 0xFFFF, msg[proto.HEADER_SIZE + 8:]

        def head(data: bytes = b""):        # a reply's argsz counts its data
            return pack(proto.DeviceFeature, 8 + len(data), flags) + data, []

        if flags & proto.FEATURE_PROBE:
            return head() if feature in (1, 2, 6, 7, 8) else errno.ENOTSUP
        get = flags & proto.FEATURE_GET
        if feature == 1 and get:
            return head(struct.pack("<Q", 0x1 | 0x4))
        if feature == 2:
            return self.mig_device_state(head, body, get)
        if feature in (6, 7):
            return self.dma_logging(feature == 6, head, body)
        if feature == 8 and get:
            return self.dma_logging_report(head, body)
        return errno.ENOTSUP

    def mig_device_state(self, head: Callable, body: bytes, get: int):
        if get:
            return head(struct.pack("<II", self.device.mig_state, 0xFFFFFFFF))
        state = struct.unpack_from("<I", body)[0] if len(body) >= 4 else -1
        if (self.device.mig_state, state) not in MIG_ARCS:
            return errno.EINVAL
        if state in MIG_SAVING and self.device.mig_state not in MIG_SAVING:
            self.mig_out = self.device.state_blob()
        if self.device.mig_state == MIG_RESUMING:
            try:
                self.device.load_blob(bytes(self.mig_in))
            except ValueError:
                return errno.EINVAL
        if state == MIG_RESUMING:
            self.mig_in = bytearray()
        self.device.mig_state = state
        return head(body)

    def dma_logging(self, start: bool, head: Callable, body: bytes):
        if start:
            page, count, _ = struct.unpack_from("<QII", body)
            self.logging = [struct.unpack_from("<QQ", body, 16 + 16 * i) for i in range(count)]
            self.dirty.clear()
        else:
            self.logging = None
        return head(body)

    def dma_logging_report(self, head: Callable, body: bytes):
        iova, length, page_size = struct.unpack_from("<QQQ", body)
        if self.logging is None or page_size != PAGE:
            return errno.EINVAL
        pages = -(-length // page_size)
        bitmap = bytearray(-(-pages // 64) * 8)
        for page in range(pages):
            if iova // PAGE + page in self.dirty:
                bitmap[page // 8] |= 1 << (page % 8)
        self.dirty -= set(range(iova // PAGE, iova // PAGE + pages))
        return head(body[:24] + bytes(bitmap))

    @answers("MIG_DATA_READ")
    def mig_data_read(self, msg: bytes, fds: list[int]):
        _, size = unpack(proto.MigDataRead, msg)
        if self.device.mig_state not in MIG_SAVING:
            return errno.EINVAL
        chunk, self.mig_out = self.mig_out[:size], self.mig_out[size:]
        return pack(proto.MigDataRead, 8 + len(chunk), len(chunk)) + chunk, []

    @answers("MIG_DATA_WRITE")
    def mig_data_write(self, msg: bytes, fds: list[int]):
        _, size = unpack(proto.MigDataWrite, msg)
        data = msg[proto.HEADER_SIZE + 8:]
        if self.device.mig_state != MIG_RESUMING or len(data) != size:
            return errno.EINVAL
        self.mig_in += data
        return b"", []


class DmaMapping:
    """A DMA map; `memory` is the client's memory when it came with an fd."""

    def __init__(self, iova: int, size: int, offset: int, fd: int | None) -> None:
        self.iova, self.size, self.fd = iova, size, fd
        self.memory = mmap.mmap(fd, size, offset=offset) if fd is not None else None

    def overlaps(self, iova: int, size: int) -> bool:
        return iova < self.iova + self.size and self.iova < iova + size

    def contains(self, addr: int, length: int) -> bool:
        return self.iova <= addr and addr + length <= self.iova + self.size

    def read(self, addr: int, length: int) -> bytes:
        return self.memory[addr - self.iova:addr - self.iova + length]

    def write(self, addr: int, data: bytes) -> None:
        self.memory[addr - self.iova:addr - self.iova + len(data)] = data

    def close(self) -> None:
        if self.memory is not None:
            self.memory.close()
            os.close(self.fd)


def serve(listen: str, options: ServerOptions) -> int:
    """Serve clients on `listen` until SIGINT/SIGTERM; each in its own thread."""
    try:
        listener = listen_unix(listen)
    except ListenError as exc:
        raise SystemExit(f"vfu-inspect: error: {exc}") from None
    device = Device(options)
    recorder = Recorder(options.record, f"sample-server {listen}") if options.record else None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: (stop.set(), listener.shutdown(socket.SHUT_RDWR)))
    conn_id = 0
    try:
        while not stop.is_set():
            try:
                sock, _ = listener.accept()
            except OSError:
                break
            session = Session(sock, device, conn_id, recorder)
            threading.Thread(target=session.run, daemon=True).start()
            conn_id += 1
    finally:
        listener.close()
        unlink_socket(listen)
        if recorder:
            recorder.close()
    return 0
