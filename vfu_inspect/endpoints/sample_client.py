"""The sample client: drives a server through every command and checks each answer.

It maps two windows of its memory for DMA, one with a memfd the server can
mmap and one without (so the device must use DMA_READ/DMA_WRITE messages),
hands eventfds for INTx and MSI-X and checks that each interrupt the device
raises arrives (after a register write, a SET_IRQS trigger, a doorbell),
runs the device's DMA engine both ways, and migrates the device state out and
back in on a second connection, in chunks the server's max_data_xfer_size
allows.  The first surprise, or a reply that takes longer than the timeout,
ends the run with exit status 1.
"""

from __future__ import annotations

import errno
import mmap
import os
import random
import select
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from .common import (BAR2_AREAS, DEFAULT_ID_VALUE, DMA_FROM_DEVICE, DMA_TO_DEVICE,
                     DOORBELL_VECTOR, MSIX_VECTORS, PAGE, REG_DMA_ADDR, REG_DMA_CMD, REG_DMA_LEN, REG_ID, REG_IRQ,
                     REG_SCRATCH, VENDOR_ID, DmaMemory, Peer, ProtocolError, Recorder, close_fds,
                     message, pack, parse_caps, u64, unpack, version_payload)
from ..dissectors import vfio_user as proto
from ..records import TWIN
from ..sockio import MessageSocket, PeerClosed

CMD = proto.CMD
FD_WINDOW, MSG_WINDOW, WINDOW = 0x10000, 0x100000, 0x10000
MIG_CHUNK = 4096
DEFAULT_TIMEOUT = 5.0                 # seconds, QEMU's x-msg-timeout


@dataclass
class ClientOptions:
    no_twin: bool = False
    record: str | None = None
    id_value: int = DEFAULT_ID_VALUE      # what the ID register should read
    rounds: int = 0                       # > 0: benchmark REGION_READ round trips
    pipeline: int = 1
    protocol_only: bool = False           # skip checks of memory and interrupts outside messages
    timeout: float = DEFAULT_TIMEOUT      # for each reply


class Failure(Exception):
    """A step got something other than what it expected."""


class Client:
    def __init__(self, path: str, options: ClientOptions, recorder: Recorder | None,
                 conn_id: int = 0) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        self.main = Peer(MessageSocket(sock), "client", recorder=recorder, conn_id=conn_id)
        self.recorder, self.conn_id = recorder, conn_id
        self.options = options
        self.memory = DmaMemory()
        self.server_caps: dict = {}
        self.twin: Peer | None = None

    # --- requests --------------------------------------------------------------

    def request(self, cmd: str, payload: bytes = b"", fds: list[int] = (),
                expect_errno: int = 0) -> bytes:
        """Send a command and return its reply payload, serving the server meanwhile."""
        msg_id = self.main.new_id()
        self.main.send(message(msg_id, CMD[cmd], payload), fds)
        while True:
            if not self.main.conn.buffered() and not select.select(
                    [self.main.conn], [], [], self.options.timeout)[0]:
                raise Failure(f"{cmd}: no reply within {self.options.timeout:g} s")
            frame = self.main.recv()
            h = proto.parse_header(frame.data)
            if h is not None and not h.is_reply:
                self.memory.serve(self.main, frame)  # a DMA command on the main socket
                continue
            break
        if h is None or h.msg_id != msg_id or h.cmd != CMD[cmd]:
            raise Failure(f"{cmd}: reply does not match the request")
        if h.is_error != bool(expect_errno) or (expect_errno and h.error != expect_errno):
            got = errno.errorcode.get(h.error, h.error) if h.is_error else "success"
            want = errno.errorcode.get(expect_errno, "success")
            raise Failure(f"{cmd}: expected {want}, got {got}")
        self.last_fds = frame.fds
        return frame.data[proto.HEADER_SIZE:]

    def serve_twin(self) -> None:
        try:
            while True:
                self.memory.serve(self.twin, self.twin.recv())
        except (PeerClosed, OSError, ProtocolError):
            pass

    def read(self, region: int, offset: int, count: int, expect_errno: int = 0) -> bytes:
        reply = self.request("REGION_READ", pack(proto.RegionRead, offset, region, count),
                             expect_errno=expect_errno)
        return reply[16:]

    def write(self, region: int, offset: int, data: bytes) -> None:
        self.request("REGION_WRITE", pack(proto.RegionWrite, offset, region, len(data)) + data)

    def reg(self, offset: int, value: int | None = None) -> int:
        if value is not None:
            self.write(0, offset, struct.pack("<Q", value))
        return u64(self.read(0, offset, 8))

    # --- the steps -------------------------------------------------------------

    def negotiate(self) -> None:
        # everything the server may state: its reply is a subset of this
        caps = {"max_msg_fds": 8, "max_data_xfer_size": 1 << 20, "pgsizes": PAGE,
                "write_multiple": True, "migration": {"pgsize": PAGE, "max_bitmap_size": 1 << 20}}
        if not self.options.no_twin:
            caps["twin_socket"] = {"supported": True}
        reply = self.request("VERSION", version_payload(2, caps))
        self.server_caps = parse_caps(reply)
        twin = self.server_caps.get("twin_socket", {})
        fds = self.last_fds
        if twin.get("supported") and not self.options.no_twin:
            if len(fds) <= twin.get("fd_index", -1):
                raise Failure("VERSION: twin socket offered but no fd passed")
            sock = socket.socket(fileno=fds[twin["fd_index"]])
            self.twin = Peer(MessageSocket(sock), "client", TWIN, self.recorder, self.conn_id)
            threading.Thread(target=self.serve_twin, daemon=True).start()
        elif fds:
            close_fds(fds)

    def device_and_regions(self) -> None:
        _, flags, regions, irqs = unpack(proto.DeviceInfo, self.request(
            "DEVICE_GET_INFO", pack(proto.DeviceInfo, 16, 0, 0, 0)), 0)
        expect("DEVICE_GET_INFO", (flags, regions, irqs), (0x3, 9, 5))
        for index in range(9):
            self.region_info(index)
        self.request("DEVICE_GET_REGION_INFO", pack(proto.RegionInfo, 32, 0, 99, 0, 0, 0),
                     expect_errno=errno.EINVAL)

    def region_info(self, index: int) -> None:
        first = self.request("DEVICE_GET_REGION_INFO", pack(proto.RegionInfo, 32, 0, index,
                                                            0, 0, 0))
        argsz, flags, _, cap_offset = struct.unpack_from("<IIII", first)
        close_fds(self.last_fds)
        # QEMU's rule, so that a server this client accepts QEMU accepts too.
        expect(f"region {index} CAPS with cap_offset in [32, {argsz}]",
               not flags & proto.REGION_FLAGS["caps"] or 32 <= cap_offset <= argsz, True)
        if argsz <= 32:
            return
        full = self.request("DEVICE_GET_REGION_INFO", pack(proto.RegionInfo, argsz, 0, index,
                                                           0, 0, 0))
        fds = self.last_fds
        expect(f"region {index} fds", len(fds), 1)
        nr = struct.unpack_from("<I", full, 32 + 8)[0]
        areas = [struct.unpack_from("<QQ", full, 48 + 16 * i) for i in range(nr)]
        expect(f"region {index} sparse areas", tuple(areas), BAR2_AREAS)
        # Checks read the device memory through the mapping, never through a
        # message, so that a replay (which cannot map it) sees the same messages.
        self.bar2 = mmap.mmap(fds[0], areas[0][1], offset=areas[0][0])
        close_fds(fds)
        self.write(2, 0x10, b"mmap")
        self.out_of_band("BAR2 through mmap", lambda: self.bar2[0x10:0x14], b"mmap")

    def config_space(self) -> None:
        config = self.read(7, 0, 64)
        expect("vendor id", struct.unpack_from("<H", config)[0], VENDOR_ID)
        caps, pointer = [], config[0x34]
        full = self.read(7, 0, 256)
        while pointer:
            caps.append(full[pointer])
            pointer = full[pointer + 1]
        expect("capability list", caps, [0x01, 0x11])
        self.write(7, 0x10, b"\xff\xff\xff\xff")                 # BAR0 sizing probe
        expect("BAR0 size mask", struct.unpack("<I", self.read(7, 0x10, 4))[0], 0xFFFFF000)
        self.write(7, 0x10, b"\0\0\0\0")

    def io_fds(self) -> int:
        """The doorbell: REG_IRQ's ioeventfd."""
        reply = self.request("DEVICE_GET_REGION_IO_FDS", pack(proto.RegionIoFds, 64, 0, 0, 0))
        expect("REGION_IO_FDS count", struct.unpack_from("<I", reply, 12)[0], 1)
        expect("REGION_IO_FDS fds", len(self.last_fds), 1)
        return self.last_fds[0]

    def intx(self) -> None:
        """Before MSI-X is set up, the device raises INTx."""
        intx = os.eventfd(0, os.EFD_NONBLOCK)
        self.request("DEVICE_SET_IRQS", pack(proto.SetIrqs, 20, 0x24, 0, 0, 1), [intx])
        self.write(0, REG_IRQ, struct.pack("<Q", 0))
        self.out_of_band("INTx after IRQ register write", lambda: wait_irq(intx), 1)
        self.request("DEVICE_SET_IRQS", pack(proto.SetIrqs, 20, 0x21, 0, 0, 0))   # disable
        os.close(intx)

    def irqs(self) -> list[int]:
        for index, count in ((0, 1), (1, 0), (2, MSIX_VECTORS), (3, 1), (4, 1)):
            reply = self.request("DEVICE_GET_IRQ_INFO", pack(proto.IrqInfo, 16, 0, index, 0))
            expect(f"IRQ {index} count", struct.unpack_from("<I", reply, 12)[0], count)
        self.intx()
        eventfds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(MSIX_VECTORS)]
        self.request("DEVICE_SET_IRQS", pack(proto.SetIrqs, 20, 0x24, 2, 0, MSIX_VECTORS),
                     eventfds)
        self.request("DEVICE_SET_IRQS", pack(proto.SetIrqs, 20, 0x09, 0, 0, 1))   # mask INTx
        self.request("DEVICE_SET_IRQS", pack(proto.SetIrqs, 20, 0x11, 0, 0, 1))   # unmask
        self.request("DEVICE_SET_IRQS", pack(proto.SetIrqs, 21, 0x22, 2, 1, 1) + b"\1")
        self.out_of_band("DATA_BOOL trigger of MSI-X vector 1", lambda: wait_irq(eventfds[1]), 1)
        return eventfds

    def dma_maps(self) -> None:
        memfd = os.memfd_create("vfu-sample-client-dma")
        os.ftruncate(memfd, WINDOW)
        self.memory.windows[FD_WINDOW] = mmap.mmap(memfd, WINDOW)
        self.request("DMA_MAP", pack(proto.DmaMap, 32, 3, 0, FD_WINDOW, WINDOW), [memfd])
        os.close(memfd)
        self.memory.windows[MSG_WINDOW] = mmap.mmap(-1, WINDOW)
        self.request("DMA_MAP", pack(proto.DmaMap, 32, 3, 0, MSG_WINDOW, WINDOW))
        self.request("DMA_MAP", pack(proto.DmaMap, 32, 3, 0, FD_WINDOW + PAGE, PAGE),
                     expect_errno=errno.EEXIST)

    def registers(self) -> None:
        expect("ID register", self.reg(REG_ID), self.options.id_value)
        expect("scratch register", self.reg(REG_SCRATCH, 0x1234_5678_9ABC_DEF0),
               0x1234_5678_9ABC_DEF0)
        self.read(99, 0, 4, expect_errno=errno.EINVAL)
        self.read(0, 0x2000, 4, expect_errno=errno.EINVAL)
        if self.server_caps.get("write_multiple"):
            entries = [pack(proto.WriteMultiEntry, REG_SCRATCH, 0, 4, b"\x11" * 4 + b"\0" * 4),
                       pack(proto.WriteMultiEntry, REG_SCRATCH + 4, 0, 4, b"\x22" * 4 + b"\0" * 4)]
            reply = self.request("REGION_WRITE_MULTI", pack(proto.WriteMulti, 2) + b"".join(entries))
            expect("REGION_WRITE_MULTI completed", u64(reply), 2)
            expect("scratch after WRITE_MULTI", self.reg(REG_SCRATCH), 0x2222222211111111)

    def dma_engine(self) -> None:
        for base in (FD_WINDOW, MSG_WINDOW):
            memory = self.memory.windows[base]
            pattern = random.Random(base).randbytes(256)   # the same in every run: replayable
            memory[0x100:0x200] = pattern
            self.dma(DMA_TO_DEVICE, base + 0x100, 256)
            self.out_of_band(f"device read of client memory at {base:#x}",
                             lambda: self.bar2[:256], pattern)
            self.write(2, 0, bytes(256))        # no later message depends on the pattern
            pattern = pattern[::-1]
            self.write(2, 0, pattern)
            self.dma(DMA_FROM_DEVICE, base + 0x800, 256)
            check = expect if base == MSG_WINDOW else self.out_of_band   # messages carry it
            check(f"device write to client memory at {base:#x}",
                  lambda: bytes(memory[0x800:0x900]), pattern)

    def dma(self, cmd: int, addr: int, length: int) -> None:
        self.reg(REG_DMA_ADDR, addr)
        self.reg(REG_DMA_LEN, length)
        self.write(0, REG_DMA_CMD, struct.pack("<Q", cmd))
        if self.twin is None:
            # Without a twin socket the device moves messaged data after it
            # answers the write; a read returns only once that is done.
            self.reg(REG_DMA_CMD)

    def interrupt(self, eventfds: list[int], doorbell: int) -> None:
        self.write(0, REG_IRQ, struct.pack("<Q", 2))
        self.out_of_band("MSI-X vector 2 after IRQ register write", lambda: wait_irq(eventfds[2]), 1)
        if not self.options.protocol_only:       # a replay has no doorbell to ring
            os.eventfd_write(doorbell, 1)
            expect(f"MSI-X vector {DOORBELL_VECTOR} after the doorbell",
                   wait_irq(eventfds[DOORBELL_VECTOR]), 1)

    def dirty_logging(self) -> None:
        def feature(flags: int, data: bytes = b"", reply_data: int = 0) -> bytes:
            """argsz holds the reply: the request for SET and PROBE, GET's data."""
            return pack(proto.DeviceFeature, 8 + max(len(data), reply_data), flags) + data
        self.request("DEVICE_FEATURE", feature(proto.FEATURE_PROBE | proto.FEATURE_GET | 1))
        reply = self.request("DEVICE_FEATURE", feature(proto.FEATURE_GET | 1, reply_data=8))
        expect("migration flags", u64(reply[8:]), 0x5)
        self.request("DEVICE_FEATURE", feature(
            proto.FEATURE_SET | 6, struct.pack("<QII", PAGE, 1, 0) + struct.pack("<QQ", FD_WINDOW, WINDOW)))
        self.dma(DMA_FROM_DEVICE, FD_WINDOW + 3 * PAGE, 16)
        reply = self.request("DEVICE_FEATURE", feature(
            proto.FEATURE_GET | 8, struct.pack("<QQQ", FD_WINDOW, WINDOW, PAGE),
            reply_data=24 + proto.bitmap_bytes(WINDOW, PAGE)))
        expect("dirty bitmap", u64(reply[8 + 24:]), 1 << 3)
        self.request("DEVICE_FEATURE", feature(proto.FEATURE_SET | 7, struct.pack("<QII", PAGE, 0, 0)))

    def set_state(self, state: int, expect_errno: int = 0) -> None:
        self.request("DEVICE_FEATURE", pack(proto.DeviceFeature, 16, proto.FEATURE_SET | 2)
                     + struct.pack("<II", state, 0xFFFFFFFF), expect_errno=expect_errno)

    def migrate_out(self) -> bytes:
        reply = self.request("DEVICE_FEATURE", pack(proto.DeviceFeature, 16, proto.FEATURE_GET | 2))
        expect("device state", struct.unpack_from("<I", reply, 8)[0], 2)
        self.set_state(6)                                     # RUNNING -> PRE_COPY
        stream = self.mig_read()
        self.set_state(3)                                     # PRE_COPY -> STOP_COPY
        stream += self.mig_read()
        self.set_state(1)                                     # STOP_COPY -> STOP
        self.set_state(6, expect_errno=errno.EINVAL)          # STOP -> PRE_COPY: no arc
        return stream

    def mig_chunk(self) -> int:
        """Migration data moves in chunks the server's max_data_xfer_size allows."""
        return min(MIG_CHUNK, self.server_caps.get("max_data_xfer_size", 1 << 20))

    def mig_read(self) -> bytes:
        stream, chunk = b"", self.mig_chunk()
        while True:
            reply = self.request("MIG_DATA_READ", pack(proto.MigDataRead, 8 + chunk, chunk))
            size = struct.unpack_from("<I", reply, 4)[0]
            stream += reply[8:8 + size]
            if size < chunk:
                return stream

    def migrate_in(self, stream: bytes) -> None:
        self.set_state(4)                                     # STOP -> RESUMING
        step = self.mig_chunk()
        for offset in range(0, len(stream), step):
            chunk = stream[offset:offset + step]
            self.request("MIG_DATA_WRITE", pack(proto.MigDataWrite, 8 + len(chunk), len(chunk))
                         + chunk)
        self.set_state(1)                                     # RESUMING -> STOP
        self.set_state(2)                                     # STOP -> RUNNING

    def unmap_and_reset(self) -> None:
        self.request("DMA_UNMAP", pack(proto.DmaUnmap, 24, 0, MSG_WINDOW, WINDOW))
        self.request("DMA_UNMAP", pack(proto.DmaUnmap, 24, 0, MSG_WINDOW, WINDOW),
                     expect_errno=errno.ENOENT)
        self.request("DMA_UNMAP", pack(proto.DmaUnmap, 24, 2, 0, 0))       # ALL
        self.request("DEVICE_RESET")
        expect("scratch after reset", self.reg(REG_SCRATCH), 0)

    def out_of_band(self, what: str, got: Callable[[], Any], want: Any) -> None:
        """A check of memory or interrupts, which no message shows (--protocol-only skips it)."""
        if not self.options.protocol_only:
            expect(what, got(), want)

    def close(self) -> None:
        self.main.conn.close()
        if self.twin is not None:
            self.twin.conn.close()


def expect(what: str, got: Any, want: Any) -> None:
    got = got() if callable(got) else got
    if got != want:
        raise Failure(f"{what}: expected {want!r}, got {got!r}")


def wait_irq(fd: int, timeout: float = 5.0) -> int:
    """The eventfd's count, or 0 when no interrupt came in time."""
    if not select.select([fd], [], [], timeout)[0]:
        return 0
    return os.eventfd_read(fd)


def exercise(path: str, options: ClientOptions, recorder: Recorder | None) -> None:
    client = Client(path, options, recorder)
    client.negotiate()
    client.device_and_regions()
    client.config_space()
    doorbell = client.io_fds()
    eventfds = client.irqs()
    client.dma_maps()
    client.registers()
    client.dma_engine()
    client.interrupt(eventfds, doorbell)
    client.dirty_logging()
    saved_scratch = client.reg(REG_SCRATCH)
    stream = client.migrate_out()
    client.reg(REG_SCRATCH, 0xBAD)               # the destination must undo this
    client.unmap_and_reset()
    client.close()
    close_fds([*eventfds, doorbell])
    destination = Client(path, options, recorder, conn_id=1)
    destination.negotiate()
    destination.migrate_in(stream)
    expect("scratch after migration", destination.reg(REG_SCRATCH), saved_scratch)
    destination.close()


def benchmark(path: str, options: ClientOptions) -> None:
    client = Client(path, options, None)
    client.negotiate()
    request = message(0, CMD["REGION_READ"], pack(proto.RegionRead, REG_ID, 0, 8))
    start, sent = time.perf_counter(), 0
    for _ in range(min(options.pipeline, options.rounds)):
        client.main.send(request)
        sent += 1
    for _ in range(options.rounds):
        client.main.recv()
        if sent < options.rounds:
            client.main.send(request)
            sent += 1
    elapsed = time.perf_counter() - start
    print(f"{options.rounds} round trips ({options.pipeline} in flight) in {elapsed:.3f} s: "
          f"{options.rounds / elapsed:.0f} rt/s")
    client.close()


def run(path: str, options: ClientOptions) -> int:
    recorder = Recorder(options.record, f"sample-client {path}") if options.record else None
    try:
        if options.rounds:
            benchmark(path, options)
        else:
            exercise(path, options, recorder)
            print("sample client: every command answered as expected", file=sys.stderr)
        return 0
    except Failure as exc:
        print(f"sample client: FAILED: {exc}", file=sys.stderr)
        return 1
    except (OSError, PeerClosed, ProtocolError) as exc:
        print(f"sample client: FAILED: connection to {path}: {exc}", file=sys.stderr)
        return 1
    except struct.error as exc:
        print(f"sample client: FAILED: a reply is shorter than its layout ({exc})",
              file=sys.stderr)
        return 1
    finally:
        if recorder:
            recorder.close()
