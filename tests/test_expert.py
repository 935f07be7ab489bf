"""Every expert check, raised by a message sequence and absent from its fixed twin.

Each scenario builds one connection's messages with the scapy layers, twice:
with the fault (`bad=True`) and without it.  The first must raise the check,
the second must not.  A check registered without a scenario fails the suite.
"""

from __future__ import annotations

import errno
import json
import re
import struct
from pathlib import Path
from typing import Any, Callable

import pytest

from vfu_inspect.capture import CaptureReader
from vfu_inspect.dissect import Analyzer, find_responses
from vfu_inspect.dissectors import vfio_user as proto
from vfu_inspect.dissectors.vfio_user import (
    CMD, DeviceFeature, DeviceInfo, DirtyBitmap, DmaLogging, DmaLoggingRange, DmaLoggingReport,
    DmaMap, DmaRead, DmaUnmap, DmaWrite, Header, IrqInfo, MigDataRead, MigDataWrite,
    MigDeviceState, QemuDmaRead, RegionCap, RegionInfo, RegionIoFds, RegionRead, RegionWrite,
    SetIrqs, ShadowSubRegion, SparseArea, SparseMmap, SubRegion, Version, WriteMulti,
    WriteMultiEntry)
from vfu_inspect.fields import EXPERTS, expert_table
from vfu_inspect.records import C2S, FAULT, MAIN, S2C, TWIN, Event, Message
from vfu_inspect.session import SessionTracker

CAPTURES = Path(__file__).resolve().parent.parent / "captures"
REPLY, ERROR_REPLY, NO_REPLY = 0x1, 0x21, 0x10
GET, SET, PROBE = 1 << 16, 1 << 17, 1 << 18
MEMFD = {"kind": "memfd", "size": 0x100000, "inode": 7}
EVENTFD = {"kind": "eventfd", "inode": 9}
SOCKET = {"kind": "socket", "inode": 11}
SPEC_CAPS = {"max_msg_fds": 8, "max_data_xfer_size": 1 << 20, "max_dma_maps": 64,
             "pgsizes": 4096, "migration": {"pgsize": 4096, "max_bitmap_size": 1 << 20}}


def caps_json(caps: dict[str, Any], nul: bool = True) -> bytes:
    return json.dumps({"capabilities": caps}).encode() + (b"\0" if nul else b"")


class Script:
    """One connection's messages, in order, one microsecond apart."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.ts_ns = 1_000_000_000
        self.next_id = 0x100

    def send(self, direction: int, cmd: str | int, *layers: Any, flags: int = 0,
             msg_id: int | None = None, fds: tuple = (), channel: int = MAIN, error: int = 0,
             payload: bytes = b"", after: float = 1e-6) -> int:
        if msg_id is None:
            msg_id, self.next_id = self.next_id, self.next_id + 1
        packet = Header(msg_id=msg_id, cmd=CMD.get(cmd, cmd) if isinstance(cmd, str) else cmd,
                        flags=flags, error=error)
        for layer in layers:
            packet = packet / layer
        data = bytes(packet) + payload
        if payload:
            data = data[:4] + len(data).to_bytes(4, "little") + data[8:]
        self.ts_ns += int(after * 1e9)
        self.messages.append(Message(self.ts_ns, 0, channel, direction, data, list(fds)))
        return msg_id

    def command(self, cmd: str, *layers: Any, **kw: Any) -> int:
        return self.send(C2S, cmd, *layers, **kw)

    def reply(self, msg_id: int, cmd: str, *layers: Any, direction: int = S2C,
              error: int | None = None, **kw: Any) -> None:
        flags = kw.pop("flags", ERROR_REPLY if error is not None else REPLY)
        self.send(direction, cmd, *layers, flags=flags, msg_id=msg_id, error=error or 0, **kw)

    def call(self, cmd: str, *layers: Any, answer: tuple = (), error: int | None = None,
             fds: tuple = (), reply_fds: tuple = (), direction: int = C2S,
             channel: int = MAIN) -> None:
        msg_id = self.send(direction, cmd, *layers, fds=fds, channel=channel)
        self.reply(msg_id, cmd, *answer, direction=1 - direction, error=error, fds=reply_fds,
                   channel=channel)

    def negotiate(self, client: dict | None = None, server: dict | None = None,
                  server_fds: tuple = (), minor: tuple[int, int] = (2, 2),
                  major: tuple[int, int] = (0, 0)) -> None:
        self.call("VERSION", Version(major=major[0], minor=minor[0],
                                     json=caps_json(client if client is not None else SPEC_CAPS)),
                  answer=(Version(major=major[1], minor=minor[1],
                                  json=caps_json(server if server is not None else SPEC_CAPS)),),
                  reply_fds=server_fds)

    def map(self, iova: int, size: int = 0x10000, error: int | None = None) -> None:
        self.call("DMA_MAP", DmaMap(flags=3, offset=0, address=iova, size=size),
                  fds=(MEMFD,), error=error)

    def region(self, index: int, size: int, flags: int = 3) -> None:
        info = RegionInfo(argsz=32, flags=flags, index=index, size=size)
        self.call("DEVICE_GET_REGION_INFO", RegionInfo(argsz=32, index=index), answer=(info,))

    def experts(self) -> set[str]:
        analyzer = Analyzer(find_responses(self.messages), SessionTracker())
        return {e.id for p in analyzer.run(self.messages) for e in p.tree.experts}


Scenario = Callable[[Script, bool], None]
SCENARIOS: dict[str, Scenario] = {}


def scenario(expert_id: str) -> Callable[[Scenario], Scenario]:
    def wrap(fn: Scenario) -> Scenario:
        SCENARIOS[expert_id] = fn
        return fn
    return wrap


def test_every_check_has_a_scenario():
    assert set(SCENARIOS) == set(EXPERTS)


README = Path(__file__).resolve().parent.parent / "README.md"
TABLE_START = "<!-- expert table: generated by `vfu-inspect check --list --markdown` -->\n"


def test_the_readme_table_of_checks_is_generated_from_the_registry():
    text = README.read_text()
    start = text.index(TABLE_START) + len(TABLE_START)
    assert text[start:text.index("<!-- end of expert table -->")] == expert_table(), \
        "README.md is stale: paste `vfu-inspect check --list --markdown` between the markers"


def test_the_readme_rules_name_every_check_of_the_protocol():
    """The section-by-section list maps rules to checks: every check but the
    tool's own comes from one of them, and no name there is stale."""
    rules = README.read_text().split("#### The spec's rules, section by section")[1]
    named = set(re.findall(r"`([a-z_]+\.[a-z_0-9.]+)`", rules.split("\n### ")[0]))
    assert named == set(EXPERTS) - {"dissector.bug", "capture.truncated", "fault.injected"}


@pytest.mark.parametrize("expert_id", sorted(EXPERTS))
def test_check_fires_on_the_fault_and_not_on_its_fix(expert_id):
    bad, good = Script(), Script()
    SCENARIOS[expert_id](bad, True)
    SCENARIOS[expert_id](good, False)
    assert expert_id in bad.experts()
    assert expert_id not in good.experts()


# --- framing -----------------------------------------------------------------------------

@scenario("malformed.short")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    payload = bytes(DmaMap(flags=3, address=0x10000, size=0x1000))
    s.send(C2S, "DMA_MAP", payload=payload[:10] if bad else payload, fds=(MEMFD,))


@scenario("malformed.trailing")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    s.send(C2S, "DEVICE_RESET", payload=b"xx" if bad else b"")


@scenario("header.size")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    s.messages.append(Message(s.ts_ns + 1, 0, MAIN, C2S, bytes(Header(
        msg_id=1, cmd=13, size=20 if bad else 16))))


def _header_variant(s: Script, bad: bool, **bad_fields: int) -> None:
    s.negotiate()
    fields = {"msg_id": 1, "cmd": 13, "flags": 0, "error": 0}
    if bad:
        fields.update(bad_fields)
    s.messages.append(Message(s.ts_ns + 1, 0, MAIN, C2S, bytes(Header(**fields))))


SCENARIOS["header.type"] = lambda s, bad: _header_variant(s, bad, flags=2)
SCENARIOS["header.unknown_command"] = lambda s, bad: _header_variant(s, bad, cmd=99)
SCENARIOS["header.obsolete_command"] = lambda s, bad: _header_variant(s, bad, cmd=14)
SCENARIOS["header.error_in_command"] = lambda s, bad: _header_variant(s, bad, flags=0x20)
SCENARIOS["header.flags_unknown"] = lambda s, bad: _header_variant(s, bad, flags=0x40)
SCENARIOS["header.error_reserved"] = lambda s, bad: _header_variant(s, bad, error=5)


@scenario("header.no_reply_in_reply")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    s.reply(s.command("DEVICE_RESET"), "DEVICE_RESET", flags=REPLY | (NO_REPLY if bad else 0))


@scenario("header.errno_zero")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    s.reply(s.command("DEVICE_RESET"), "DEVICE_RESET", error=0 if bad else 5)


@scenario("header.wrong_direction")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    s.map(0x10000)
    s.call("DMA_READ", DmaRead(address=0x10000, count=4), direction=C2S if bad else S2C,
           answer=(DmaRead(address=0x10000, count=4, data=b"abcd"),))


@scenario("reply.error_payload")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    s.call("DEVICE_GET_IRQ_INFO", IrqInfo(index=9), error=errno.EINVAL,
           answer=(IrqInfo(index=9),) if bad else ())


@scenario("reply.unmatched")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    msg_id = s.command("DEVICE_RESET")
    s.reply(msg_id + 7 if bad else msg_id, "DEVICE_RESET")


@scenario("reply.command_mismatch")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    s.reply(s.command("DEVICE_RESET"), "DMA_MAP" if bad else "DEVICE_RESET")


@scenario("reply.to_no_reply")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    s.region(0, 0x1000)
    msg_id = s.command("REGION_WRITE", RegionWrite(offset=0, region=0, count=4, data=b"abcd"),
                       flags=NO_REPLY)
    if bad:
        s.reply(msg_id, "REGION_WRITE", RegionWrite(offset=0, region=0, count=4))


@scenario("reply.accepted_invalid")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    s.map(0x10000)
    s.map(0x18000, error=None if bad else 17)        # dma.overlap; EEXIST is the right answer


@scenario("request.duplicate_id")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    first = s.command("DEVICE_RESET")
    second = s.command("DEVICE_RESET", msg_id=first if bad else None)
    s.reply(first, "DEVICE_RESET")
    s.reply(second, "DEVICE_RESET")


@scenario("request.unanswered")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    msg_id = s.command("DEVICE_RESET")
    if not bad:
        s.reply(msg_id, "DEVICE_RESET")


@scenario("request.timeout")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    first = s.command("DEVICE_RESET")
    second = s.command("DEVICE_GET_INFO", DeviceInfo(), after=6.0 if bad else 1.0)
    s.reply(first, "DEVICE_RESET")
    s.reply(second, "DEVICE_GET_INFO", DeviceInfo(num_regions=9, num_irqs=5))


@scenario("fd.count")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    s.call("DMA_MAP", DmaMap(flags=3, address=0x10000, size=0x1000),
           fds=(MEMFD, MEMFD) if bad else (MEMFD,))


@scenario("fd.over_max")
def _(s: Script, bad: bool) -> None:
    s.negotiate(server={**SPEC_CAPS, "max_msg_fds": 1 if bad else 8})
    s.call("DEVICE_GET_IRQ_INFO", IrqInfo(index=2), answer=(IrqInfo(index=2, count=4),))
    s.call("DEVICE_SET_IRQS", SetIrqs(flags=0x24, index=2, start=0, count=2),
           fds=(EVENTFD, EVENTFD))


@scenario("xfer.too_big")
def _(s: Script, bad: bool) -> None:
    s.negotiate(server={**SPEC_CAPS, "max_data_xfer_size": 4096})
    s.region(2, 0x10000)
    count = 8192 if bad else 4096
    s.call("REGION_READ", RegionRead(offset=0, region=2, count=count), error=7 if bad else None,
           answer=(RegionRead(offset=0, region=2, count=count, data=bytes(count)),))


@scenario("argsz.truncated")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    s.call("DEVICE_GET_REGION_INFO", RegionInfo(argsz=32, index=1),
           answer=(RegionInfo(argsz=80 if bad else 32, flags=3, index=1, size=0x1000),))


@scenario("argsz.mismatch")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    s.call("DMA_MAP", DmaMap(argsz=40 if bad else 32, flags=3, address=0x10000, size=0x1000),
           fds=(MEMFD,))


@scenario("argsz.small")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    s.call("DEVICE_GET_INFO", DeviceInfo(argsz=8 if bad else 16),
           answer=(DeviceInfo(num_regions=9, num_irqs=5),))


# --- negotiation -------------------------------------------------------------------------

@scenario("version.not_first")
def _(s: Script, bad: bool) -> None:
    if bad:
        s.call("DEVICE_RESET")
    s.negotiate()
    s.call("DEVICE_RESET")


SCENARIOS["version.major"] = lambda s, bad: s.negotiate(major=(0, 1 if bad else 0))
SCENARIOS["version.minor"] = lambda s, bad: s.negotiate(minor=(2, 3 if bad else 2))


def _client_version(s: Script, bad: bool, bad_json: bytes) -> None:
    json_text = bad_json if bad else caps_json(SPEC_CAPS)
    s.call("VERSION", Version(major=0, minor=2, json=json_text),
           answer=(Version(major=0, minor=2, json=caps_json(SPEC_CAPS)),))


SCENARIOS["version.json_unterminated"] = lambda s, bad: _client_version(
    s, bad, caps_json(SPEC_CAPS, nul=False))
SCENARIOS["version.json_invalid"] = lambda s, bad: _client_version(s, bad, b"{oops\0")
SCENARIOS["version.json_not_object"] = lambda s, bad: _client_version(
    s, bad, b'[1, 2]\0' if bad else b'{"capabilities": {}}\0')
SCENARIOS["version.unknown_capability"] = lambda s, bad: _client_version(
    s, bad, caps_json({**SPEC_CAPS, "frobnicate": 1}))
SCENARIOS["version.capability_type"] = lambda s, bad: _client_version(
    s, bad, caps_json({**SPEC_CAPS, "max_msg_fds": "8"}))
SCENARIOS["version.capability_range"] = lambda s, bad: _client_version(
    s, bad, caps_json({**SPEC_CAPS, "max_msg_fds": -1}))
SCENARIOS["interop.qemu_capability"] = lambda s, bad: s.negotiate(
    server={**SPEC_CAPS, "max_msg_fds": 17 if bad else 16})


@scenario("version.capability_not_offered")
def _(s: Script, bad: bool) -> None:
    s.negotiate(server={**SPEC_CAPS, "write_multiple": True},
                client=SPEC_CAPS if bad else {**SPEC_CAPS, "write_multiple": True})


def _twin_reply(s: Script, twin: dict, server_fds: tuple, client: dict | None = None) -> None:
    s.negotiate(client=client or {**SPEC_CAPS, "twin_socket": {"supported": True}},
                server={**SPEC_CAPS, "twin_socket": twin}, server_fds=server_fds)


SCENARIOS["twin.fd_index"] = lambda s, bad: _twin_reply(
    s, {"supported": True, "fd_index": 1 if bad else 0}, (SOCKET,))


@scenario("twin.wrong_channel")
def _(s: Script, bad: bool) -> None:
    _twin_reply(s, {"supported": True, "fd_index": 0}, (SOCKET,))
    s.map(0x10000)
    s.call("DMA_READ", DmaRead(address=0x10000, count=4), direction=S2C,
           channel=MAIN if bad else TWIN, answer=(DmaRead(address=0x10000, count=4, data=b"abcd"),))


@scenario("twin.not_negotiated")
def _(s: Script, bad: bool) -> None:
    twin = {"twin_socket": {"supported": True, "fd_index": 0}}
    client = SPEC_CAPS if bad else {**SPEC_CAPS, "twin_socket": {"supported": True}}
    s.negotiate(client=client, server={**SPEC_CAPS, **twin}, server_fds=(SOCKET,))
    s.map(0x10000)
    s.call("DMA_READ", DmaRead(address=0x10000, count=4), direction=S2C, channel=TWIN,
           answer=(DmaRead(address=0x10000, count=4, data=b"abcd"),))


# --- DMA ---------------------------------------------------------------------------------

@scenario("dma_map.flags_unknown")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    s.call("DMA_MAP", DmaMap(flags=0x13 if bad else 3, address=0x10000, size=0x1000),
           fds=(MEMFD,))


@scenario("dma_map.flags_extension")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    s.call("DMA_MAP", DmaMap(flags=7 if bad else 3, address=0x10000, size=0x1000),
           fds=(MEMFD,))


@scenario("dma_map.offset_no_fd")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    s.call("DMA_MAP", DmaMap(flags=3, offset=0x1000 if bad else 0, address=0x10000, size=0x1000))


@scenario("dma.overlap_errno")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    s.map(0x10000)
    s.map(0x18000, error=errno.EINVAL if bad else errno.EEXIST)


@scenario("dma_unmap.flags")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    s.map(0x10000)
    unmap = DmaUnmap(flags=2, address=0x10000 if bad else 0, size=0x10000 if bad else 0)
    s.call("DMA_UNMAP", unmap, answer=(unmap,))


@scenario("dma.overlap")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    s.map(0x10000)
    s.map(0x18000 if bad else 0x20000, error=17 if bad else None)


@scenario("dma.unmap_unknown")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    s.map(0x10000)
    s.call("DMA_UNMAP", DmaUnmap(address=0x30000 if bad else 0x10000, size=0x10000),
           answer=(DmaUnmap(address=0x10000, size=0x10000),), error=22 if bad else None)


@scenario("dma.misaligned")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    s.map(0x10800 if bad else 0x10000, error=22 if bad else None)


@scenario("dma.too_many")
def _(s: Script, bad: bool) -> None:
    s.negotiate(server={**SPEC_CAPS, "max_dma_maps": 1 if bad else 2})
    s.map(0x10000)
    s.map(0x20000, error=28 if bad else None)


@scenario("dma.access_unmapped")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    s.map(0x10000)
    address = 0x90000 if bad else 0x10000
    s.call("DMA_READ", DmaRead(address=address, count=4), direction=S2C, error=14 if bad else None,
           answer=(DmaRead(address=address, count=4, data=b"abcd"),))


@scenario("dma_unmap.bitmap_size")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    s.map(0x10000, size=0x40000)
    bitmap = DirtyBitmap(pgsize=0x1000, size=2 if bad else 8)
    s.call("DMA_UNMAP", DmaUnmap(argsz=48, flags=1, address=0x10000, size=0x40000), bitmap,
           answer=(DmaUnmap(argsz=48, flags=1, address=0x10000, size=0x40000),
                   DirtyBitmap(pgsize=0x1000, size=8, data=bytes(8))))


def _logging_report(s: Script, length: int, bitmap: bytes, client: dict | None = None) -> None:
    s.negotiate(client=client)
    s.call("DEVICE_FEATURE", DeviceFeature(argsz=48, flags=GET | 8),
           DmaLoggingReport(iova=0, length=length, page_size=0x1000),
           answer=(DeviceFeature(argsz=32 + len(bitmap), flags=GET | 8),
                   DmaLoggingReport(iova=0, length=length, page_size=0x1000, bitmap=bitmap)))


SCENARIOS["dma_logging.bitmap_size"] = lambda s, bad: _logging_report(
    s, 0x40000, bytes(4 if bad else 8))
SCENARIOS["dirty.bitmap_too_big"] = lambda s, bad: _logging_report(
    s, 0x100000 if bad else 0x10000, bytes(32 if bad else 8),
    client={**SPEC_CAPS, "migration": {"pgsize": 4096, "max_bitmap_size": 8}})


SCENARIOS["dma_logging.bitmap_bits"] = lambda s, bad: _logging_report(
    s, 0x3000, (0xF if bad else 0x7).to_bytes(8, "little"))


def _logging_start(s: Script, page_size: int, iova: int = 0, length: int = 0x1000) -> None:
    request = (DeviceFeature(argsz=40, flags=SET | 6),
               DmaLogging(page_size=page_size, num_ranges=1),
               DmaLoggingRange(iova=iova, length=length))
    s.call("DEVICE_FEATURE", *request, answer=request)


SCENARIOS["dma_logging.page_size"] = lambda s, bad: (
    s.negotiate(), _logging_start(s, 0 if bad else 0x1000))
SCENARIOS["dma_logging.unaligned"] = lambda s, bad: (
    s.negotiate(), _logging_start(s, 0x1000, iova=0x800 if bad else 0))


@scenario("dma_logging.unmapped")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    s.map(0x10000, size=0x40000)
    _logging_start(s, 0x1000, iova=0x10000, length=0x40000)
    iova = 0x90000 if bad else 0x10000
    s.call("DEVICE_FEATURE", DeviceFeature(argsz=40, flags=GET | 8),
           DmaLoggingReport(iova=iova, length=0x40000, page_size=0x1000),
           error=errno.EINVAL if bad else None,
           answer=(DeviceFeature(argsz=40, flags=GET | 8),
                   DmaLoggingReport(iova=iova, length=0x40000, page_size=0x1000, bitmap=bytes(8))))


@scenario("dma_logging.not_started")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    if not bad:
        _logging_start(s, 0x1000, length=0x40000)
    report = DmaLoggingReport(iova=0, length=0x40000, page_size=0x1000)
    s.call("DEVICE_FEATURE", DeviceFeature(argsz=48, flags=GET | 8), report,
           error=errno.ENOENT if bad else None,
           answer=(DeviceFeature(argsz=40, flags=GET | 8),
                   DmaLoggingReport(iova=0, length=0x40000, page_size=0x1000, bitmap=bytes(8))))


@scenario("dma_logging.ranges_short")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    request = (DeviceFeature(argsz=40, flags=SET | 6),
               DmaLogging(page_size=0x1000, num_ranges=2 if bad else 1),
               DmaLoggingRange(iova=0, length=0x1000))
    s.call("DEVICE_FEATURE", *request, answer=request)


# --- regions and IRQs --------------------------------------------------------------------

def _region_info_reply(s: Script, info: RegionInfo, *tail: Any, fds: tuple = ()) -> None:
    s.negotiate()
    s.call("DEVICE_GET_REGION_INFO", RegionInfo(argsz=info.argsz, index=info.index),
           answer=(info, *tail), reply_fds=fds)


SPARSE = (RegionCap(id=1, version=1, next=0), SparseMmap(nr_areas=2),
          SparseArea(offset=0, size=0x1000), SparseArea(offset=0x2000, size=0x1000))
SCENARIOS["region_info.caps_missing"] = lambda s, bad: _region_info_reply(
    s, RegionInfo(argsz=32, flags=0xB if bad else 3, index=1, size=0x4000))


@scenario("interop.region_caps_offset")
def _(s: Script, bad: bool) -> None:
    """A reply cut to the client's 32 bytes: Linux VFIO keeps CAPS (cap_offset 0),
    libvfio-user drops it until the capabilities fit."""
    s.negotiate()
    s.call("DEVICE_GET_REGION_INFO", RegionInfo(argsz=32, index=2),
           answer=(RegionInfo(argsz=80, flags=0xF if bad else 7, index=2, size=0x4000),))


SCENARIOS["region_info.mmap_no_fd"] = lambda s, bad: _region_info_reply(
    s, RegionInfo(argsz=32, flags=7, index=1, size=0x4000), fds=() if bad else (MEMFD,))
SCENARIOS["region_info.fd_per_area"] = lambda s, bad: _region_info_reply(
    s, RegionInfo(argsz=80, flags=0xF, index=1, cap_offset=32, size=0x4000), *SPARSE,
    fds=(MEMFD, MEMFD) if bad else (MEMFD,))
SCENARIOS["region_info.cap_loop"] = lambda s, bad: _region_info_reply(
    s, RegionInfo(argsz=48, flags=0xB, index=1, cap_offset=32, size=0x4000),
    RegionCap(id=2, version=1, next=32 if bad else 0), proto.RegionType(type=1, subtype=1))
SCENARIOS["region_info.cap_unknown"] = lambda s, bad: _region_info_reply(
    s, RegionInfo(argsz=48, flags=0xB, index=1, cap_offset=32, size=0x4000),
    RegionCap(id=9 if bad else 2, version=1, next=0), proto.RegionType(type=1, subtype=1))
SCENARIOS["region_info.areas_short"] = lambda s, bad: _region_info_reply(
    s, RegionInfo(argsz=80, flags=0xF, index=1, cap_offset=32, size=0x4000),
    RegionCap(id=1, version=1, next=0), SparseMmap(nr_areas=3 if bad else 2),
    SparseArea(offset=0, size=0x1000), SparseArea(offset=0x2000, size=0x1000), fds=(MEMFD,))


def _io_fds(s: Script, entries: bytes, count: int = 1, fds: tuple = (EVENTFD,)) -> None:
    s.negotiate()
    s.call("DEVICE_GET_REGION_IO_FDS", RegionIoFds(argsz=64, index=0),
           answer=(RegionIoFds(argsz=16 + len(entries), index=0, count=count),),
           reply_fds=fds)
    s.messages[-1].data += entries
    data = s.messages[-1].data
    s.messages[-1].data = data[:4] + len(data).to_bytes(4, "little") + data[8:]


SCENARIOS["region_io_fds.entry_size"] = lambda s, bad: _io_fds(
    s, bytes(SubRegion(offset=0x28, size=8))[:36 if bad else 40])
SCENARIOS["region_io_fds.posted_writes"] = lambda s, bad: _io_fds(
    s, bytes(SubRegion(offset=0x28, size=0, type=1, flags=0 if bad else 2)))
SCENARIOS["region_io_fds.fd_index"] = lambda s, bad: _io_fds(
    s, bytes(SubRegion(offset=0x28, size=8, fd_index=3 if bad else 0)))
SCENARIOS["interop.io_fds_48"] = lambda s, bad: _io_fds(
    s, bytes(ShadowSubRegion(offset=0x28, size=8) if bad else SubRegion(offset=0x28, size=8)))


SCENARIOS["region_info.cap_version"] = lambda s, bad: _region_info_reply(
    s, RegionInfo(argsz=80, flags=0xF, index=1, cap_offset=32, size=0x4000),
    RegionCap(id=1, version=2 if bad else 1, next=0), *SPARSE[1:], fds=(MEMFD,))


@scenario("device_info.pci")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    s.call("DEVICE_GET_INFO", DeviceInfo(),
           answer=(DeviceInfo(flags=1 if bad else 3, num_regions=9, num_irqs=5),))


@scenario("device_reset.unsupported")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    s.call("DEVICE_GET_INFO", DeviceInfo(),
           answer=(DeviceInfo(flags=2 if bad else 3, num_regions=9, num_irqs=5),))
    s.call("DEVICE_RESET")


@scenario("field.not_zero")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    s.call("DEVICE_GET_REGION_IO_FDS", RegionIoFds(argsz=16, index=0, flags=1 if bad else 0),
           answer=(RegionIoFds(argsz=16, index=0, count=0),))


@scenario("reply.echo_mismatch")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    s.call("DEVICE_GET_IRQ_INFO", IrqInfo(index=2),
           answer=(IrqInfo(index=1 if bad else 2, count=4, flags=1),))


@scenario("argsz.reply_exceeds")
def _(s: Script, bad: bool) -> None:
    """The whole 80-byte reply although the client allowed 32."""
    s.negotiate()
    s.call("DEVICE_GET_REGION_INFO", RegionInfo(argsz=32 if bad else 80, index=1),
           answer=(RegionInfo(argsz=80, flags=0xF, index=1, cap_offset=32, size=0x4000), *SPARSE),
           reply_fds=(MEMFD,))


@scenario("region.unknown")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    s.call("DEVICE_GET_INFO", DeviceInfo(), answer=(DeviceInfo(num_regions=9, num_irqs=5),))
    region = 12 if bad else 0
    s.call("REGION_READ", RegionRead(offset=0, region=region, count=4), error=22 if bad else None,
           answer=(RegionRead(offset=0, region=region, count=4, data=bytes(4)),))


@scenario("region.out_of_bounds")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    s.region(0, 0x1000)
    offset = 0x1000 if bad else 0xFFC
    s.call("REGION_READ", RegionRead(offset=offset, region=0, count=4), error=22 if bad else None,
           answer=(RegionRead(offset=offset, region=0, count=4, data=bytes(4)),))


@scenario("region.access_flags")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    s.region(0, 0x1000, flags=1)                  # read-only
    if bad:
        s.call("REGION_WRITE", RegionWrite(offset=0, region=0, count=4, data=b"abcd"), error=1)
    else:
        s.call("REGION_READ", RegionRead(offset=0, region=0, count=4),
               answer=(RegionRead(offset=0, region=0, count=4, data=bytes(4)),))


@scenario("region_read.count")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    s.call("REGION_READ", RegionRead(offset=0, region=0, count=8),
           answer=(RegionRead(offset=0, region=0, count=8, data=bytes(4 if bad else 8)),))


@scenario("region_write.count")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    s.call("REGION_WRITE", RegionWrite(offset=0, region=0, count=8, data=bytes(4 if bad else 8)),
           answer=(RegionWrite(offset=0, region=0, count=8),))


@scenario("write_multi.count")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    s.command("REGION_WRITE_MULTI", WriteMulti(wr_cnt=3 if bad else 1),
              WriteMultiEntry(offset=8, region=0, count=4, data=b"abcd" + bytes(4)),
              flags=NO_REPLY)


@scenario("write_multi.entry_count")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    s.command("REGION_WRITE_MULTI", WriteMulti(wr_cnt=1),
              WriteMultiEntry(offset=8, region=0, count=9 if bad else 8, data=bytes(8)),
              flags=NO_REPLY)


def _set_irqs(s: Script, flags: int, count: int, data: bytes = b"", fds: tuple = (),
              vectors: int = 4, start: int = 0, info_flags: int = 3) -> None:
    s.negotiate()
    s.call("DEVICE_GET_IRQ_INFO", IrqInfo(index=2),
           answer=(IrqInfo(index=2, count=vectors, flags=info_flags),))
    s.call("DEVICE_SET_IRQS", SetIrqs(argsz=20 + len(data), flags=flags, index=2, start=start,
                                      count=count, data=data), fds=fds)


SCENARIOS["set_irqs.flags"] = lambda s, bad: _set_irqs(s, 0x23 if bad else 0x21, 0)
SCENARIOS["set_irqs.bool_count"] = lambda s, bad: _set_irqs(
    s, 0x22, 2, data=b"\1" if bad else b"\1\1")
SCENARIOS["set_irqs.fd_count"] = lambda s, bad: _set_irqs(
    s, 0x24, 2, fds=(EVENTFD,) if bad else (EVENTFD, EVENTFD))
SCENARIOS["irq.out_of_range"] = lambda s, bad: _set_irqs(
    s, 0x24, 4, fds=(EVENTFD,) * 4, start=2 if bad else 0)
SCENARIOS["range.overflow"] = lambda s, bad: _set_irqs(
    s, 0x21, 0xFFFFFFFF if bad else 2, start=2)
SCENARIOS["set_irqs.count_zero"] = lambda s, bad: _set_irqs(s, 0x09 if bad else 0x21, 0)
SCENARIOS["interop.irq_mask_eventfd"] = lambda s, bad: _set_irqs(
    s, 0x14 if bad else 0x24, 1, fds=(EVENTFD,))
SCENARIOS["irq.action_unsupported"] = lambda s, bad: _set_irqs(
    s, 0x09, 1, info_flags=1 if bad else 3)


@scenario("irq.unknown")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    s.call("DEVICE_GET_INFO", DeviceInfo(), answer=(DeviceInfo(flags=3, num_regions=9,
                                                               num_irqs=5),))
    s.call("DEVICE_GET_IRQ_INFO", IrqInfo(index=5 if bad else 4), error=22 if bad else None,
           answer=(IrqInfo(index=4, count=1, flags=1),))


@scenario("write_multi.not_negotiated")
def _(s: Script, bad: bool) -> None:
    s.negotiate(client={**SPEC_CAPS, "write_multiple": True},
                server=SPEC_CAPS if bad else {**SPEC_CAPS, "write_multiple": True})
    s.command("REGION_WRITE_MULTI", WriteMulti(wr_cnt=1),
              WriteMultiEntry(offset=8, region=0, count=4, data=bytes(8)), flags=NO_REPLY)


# --- server commands, interop, deadlock -------------------------------------------------------

def _server_dma(s: Script, cmd: str, request: Any, *answer: Any) -> None:
    s.negotiate()
    s.map(0x10000)
    s.call(cmd, request, direction=S2C, answer=answer)


SCENARIOS["dma_read.count"] = lambda s, bad: _server_dma(
    s, "DMA_READ", DmaRead(address=0x10000, count=8),
    DmaRead(address=0x10000, count=8, data=bytes(4 if bad else 8)))
SCENARIOS["dma_write.count"] = lambda s, bad: _server_dma(
    s, "DMA_WRITE", DmaWrite(address=0x10000, count=8, data=bytes(4 if bad else 8)),
    DmaWrite(address=0x10000, count=8))
SCENARIOS["dma_read.count_mismatch"] = lambda s, bad: _server_dma(
    s, "DMA_READ", DmaRead(address=0x10000, count=8),
    DmaRead(address=0x10000, count=4 if bad else 8, data=bytes(4 if bad else 8)))
SCENARIOS["dma_write.count_mismatch"] = lambda s, bad: _server_dma(
    s, "DMA_WRITE", DmaWrite(address=0x10000, count=8, data=bytes(8)),
    DmaWrite(address=0x10000, count=4 if bad else 8))
SCENARIOS["interop.dma_qemu_layout"] = lambda s, bad: _server_dma(
    s, "DMA_READ", DmaRead(address=0x10000, count=8),
    (QemuDmaRead(address=0x10000, count=8, data=b"\xaa" * 12) if bad
     else DmaRead(address=0x10000, count=8, data=bytes(8))))
SCENARIOS["interop.dma_write_spec_reply"] = lambda s, bad: _server_dma(
    s, "DMA_WRITE", DmaWrite(address=0x10000, count=8, data=bytes(8)),
    (proto.QemuDmaWrite(address=0x10000, count=8) if bad else DmaWrite(address=0x10000, count=8)))
SCENARIOS["interop.dma_write_bare_reply"] = lambda s, bad: _server_dma(
    s, "DMA_WRITE", DmaWrite(address=0x10000, count=8, data=bytes(8)),
    *(() if bad else (DmaWrite(address=0x10000, count=8),)))


@scenario("deadlock.server_command")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    s.map(0x10000)
    s.region(0, 0x1000)
    write = s.command("REGION_WRITE", RegionWrite(offset=0x20, region=0, count=8, data=bytes(8)))
    if not bad:
        s.reply(write, "REGION_WRITE", RegionWrite(offset=0x20, region=0, count=8))
    s.call("DMA_READ", DmaRead(address=0x10000, count=4), direction=S2C,
           answer=(DmaRead(address=0x10000, count=4, data=bytes(4)),))
    if bad:
        s.reply(write, "REGION_WRITE", RegionWrite(offset=0x20, region=0, count=8))


# --- features and migration --------------------------------------------------------------

@scenario("device_feature.get_and_set")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    s.call("DEVICE_FEATURE", DeviceFeature(argsz=16, flags=(GET | SET if bad else GET) | 1),
           answer=(DeviceFeature(argsz=16, flags=GET | 1), proto.MigrationFeature(flags=1)))


@scenario("device_feature.unknown")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    request = DeviceFeature(argsz=8, flags=(1 << 18) | SET | (9 if bad else 2))
    s.call("DEVICE_FEATURE", request, answer=(request,))


SCENARIOS["device_feature.op_undefined"] = lambda s, bad: (s.negotiate(), s.call(
    "DEVICE_FEATURE", DeviceFeature(argsz=16, flags=(SET if bad else GET) | 1),
    answer=(DeviceFeature(argsz=16, flags=GET | 1), proto.MigrationFeature(flags=1))))
SCENARIOS["device_feature.probe_undefined"] = lambda s, bad: (s.negotiate(), s.call(
    "DEVICE_FEATURE", DeviceFeature(argsz=8, flags=PROBE | (SET if bad else GET) | 1),
    error=errno.EINVAL if bad else None, answer=(DeviceFeature(argsz=8, flags=PROBE | GET | 1),)))
SCENARIOS["migration.flags"] = lambda s, bad: (s.negotiate(), s.call(
    "DEVICE_FEATURE", DeviceFeature(argsz=16, flags=GET | 1),
    answer=(DeviceFeature(argsz=16, flags=GET | 1), proto.MigrationFeature(flags=4 if bad else 5))))


def _set_state(s: Script, state: int, error: int | None = None) -> None:
    request = (DeviceFeature(argsz=16, flags=SET | 2), MigDeviceState(device_state=state))
    s.call("DEVICE_FEATURE", *request, answer=request, error=error)


@scenario("migration.transition")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    _set_state(s, 3)                                # RUNNING -> (STOP) -> STOP_COPY
    _set_state(s, 6 if bad else 1, error=22 if bad else None)   # STOP_COPY -> PRE_COPY: no


@scenario("migration.data_state")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    if not bad:
        _set_state(s, 6)                            # PRE_COPY allows reading
    s.call("MIG_DATA_READ", MigDataRead(argsz=8 + 4, size=4), error=22 if bad else None,
           answer=(MigDataRead(argsz=12, size=4, data=b"data"),))


@scenario("mig_data_read.size")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    _set_state(s, 6)
    s.call("MIG_DATA_READ", MigDataRead(argsz=8 + 8, size=8),
           answer=(MigDataRead(argsz=16, size=8, data=bytes(4 if bad else 8)),))


@scenario("interop.mig_data_padding")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    _set_state(s, 6)
    s.call("MIG_DATA_READ", MigDataRead(argsz=8 + 64, size=64),
           answer=(MigDataRead(argsz=72 if bad else 16, size=8, data=bytes(64 if bad else 8)),))


@scenario("mig_data_write.size")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    _set_state(s, 4)                                # RESUMING
    s.call("MIG_DATA_WRITE", MigDataWrite(argsz=16, size=8, data=bytes(4 if bad else 8)))


# --- the tool itself ---------------------------------------------------------------------

@scenario("capture.truncated")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    s.call("DEVICE_RESET")
    if bad:         # the capture keeps its header: msg_size counts what it lost
        cut = s.messages[-1]
        cut.size = len(cut.data) + 100
        cut.data = cut.data[:4] + struct.pack("<I", cut.size) + cut.data[8:]


@scenario("fault.injected")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    if bad:          # what proxy --fault records before the message it dropped
        s.messages.append(Event(FAULT, s.ts_ns, 0, {
            "action": "drop", "rule": "vfio_user.cmd == DEVICE_RESET: drop", "channel": "main",
            "dir": "c2s", "effect": "DEVICE_RESET command dropped: the server never got it"}))
    s.call("DEVICE_RESET")


@scenario("dissector.bug")
def _(s: Script, bad: bool) -> None:
    s.negotiate()
    s.call("DEVICE_RESET")
    # A capture whose reset carries a cmd the tables map to a failing dissector.
    if bad:
        s.messages[-2] = Message(s.messages[-2].ts_ns, 0, MAIN, C2S,
                                 bytes(Header(msg_id=0x500, cmd=BUGGY_CMD)))


BUGGY_CMD = 0x7FFF


@pytest.fixture(autouse=True)
def buggy_dissector(monkeypatch):
    """A dissector that raises, as a bug would: the message must still be shown."""
    def broken(tree, msg, ctx, off):
        raise ValueError("deliberate")
    monkeypatch.setitem(proto.REQUESTS, BUGGY_CMD, broken)
    monkeypatch.setitem(proto.COMMANDS, BUGGY_CMD, "BUGGY")


def test_a_message_the_capture_cut_is_judged_by_its_header_alone():
    """A record that keeps only a message's start (the proxy's cap on an
    absurd size): its missing end is neither short nor trailing, and msg_size
    counts the whole message, as the Lua plugin reads it."""
    whole = bytes(Header(msg_id=1, cmd=CMD["DMA_MAP"], size=48)) + bytes(_map_layer(0, 0x1000))
    cut = whole[:24]
    ids = []
    for size in (None, len(whole)):
        [p] = Analyzer().run([Message(0, 0, MAIN, C2S, cut, [], size)])
        ids.append({e.id for e in p.tree.experts})
    assert {"header.size", "malformed.short"} <= ids[0]
    assert ids[1] == {"capture.truncated", "version.not_first"}
    buggy = bytes(Header(msg_id=2, cmd=BUGGY_CMD, size=48))       # a dissector bug still shows
    [p] = Analyzer().run([Message(0, 0, MAIN, C2S, buggy, [], 48)])
    assert "dissector.bug" in {e.id for e in p.tree.experts}


@pytest.mark.parametrize("capture", ["libvfio-user-samples", "sample-endpoints"])
def test_a_cut_message_gets_no_item_its_whole_self_does_not(capture):
    """The session's checks too: cut anywhere after its header, each message
    of a real session (each in its own place in it) is judged only by what
    the capture kept, and gains nothing but capture.truncated."""
    with CaptureReader(CAPTURES / f"{capture}.vfucap") as reader:
        messages = [r for r in reader if isinstance(r, Message)]
    whole = Analyzer(sessions=SessionTracker(checkpoint_every=0))
    gained, previous = [], messages[0].ts_ns
    for m in messages:
        cuts = {}
        for keep in {proto.HEADER_SIZE, proto.HEADER_SIZE + 8, len(m.data) - 1}:
            if proto.HEADER_SIZE <= keep < len(m.data):
                cut = Analyzer(sessions=whole.sessions.restored(whole.sessions.conns))
                cut.resume_at(whole.number, messages[0].ts_ns, previous)
                cuts[keep] = cut.feed(Message(m.ts_ns, m.conn, m.channel, m.direction,
                                              m.data[:keep], m.fds, len(m.data)))
        p, previous = whole.feed(m), m.ts_ns
        found = {e.id for e in p.tree.experts} | {"capture.truncated"}
        gained += [(p.number, p.header.command_name, p.header.kind, keep, e.id)
                   for keep, q in cuts.items() for e in q.tree.experts if e.id not in found]
    assert gained == []


# --- pipelining: requests are checked in the receiver's order ----------------------------

def _experts_by_frame(s: Script) -> dict[int, set[str]]:
    analyzer = Analyzer(find_responses(s.messages), SessionTracker())
    return {p.number: ids for p in analyzer.run(s.messages)
            if (ids := {e.id for e in p.tree.experts if e.severity in ("warning", "error")})}


def _map_layer(iova: int, size: int) -> DmaMap:
    return DmaMap(flags=3, offset=0, address=iova, size=size)


def _burst(s: Script, *requests: tuple[str, Any]) -> list[int]:
    """Send every request before any reply, as QEMU does; their msg_ids."""
    return [s.command(cmd, layer, fds=(MEMFD,) if cmd == "DMA_MAP" else ())
            for cmd, layer in requests]


def test_unmap_then_map_of_the_same_range_in_one_burst_is_clean():
    s = Script()
    s.negotiate()                                                    # frames 1, 2
    s.map(0x10000, 0x10000)                                          # 3, 4
    unmap = DmaUnmap(address=0x10000, size=0x10000)
    ids = _burst(s, ("DMA_UNMAP", unmap), ("DMA_MAP", _map_layer(0x10000, 0x8000)),
                 ("DMA_MAP", _map_layer(0x18000, 0x8000)))
    s.reply(ids[0], "DMA_UNMAP", unmap)
    for msg_id in ids[1:]:
        s.reply(msg_id, "DMA_MAP")
    assert _experts_by_frame(s) == {}


@pytest.mark.parametrize("accepted", [False, True])
def test_two_overlapping_maps_in_one_burst_flag_the_second(accepted):
    s = Script()
    s.negotiate()
    first, second = _burst(s, ("DMA_MAP", _map_layer(0x10000, 0x10000)),
                           ("DMA_MAP", _map_layer(0x18000, 0x10000)))              # 3, 4
    s.reply(first, "DMA_MAP")
    s.reply(second, "DMA_MAP", error=None if accepted else errno.EEXIST)          # 6
    assert _experts_by_frame(s) == {4: {"dma.overlap"}, **(
        {6: {"reply.accepted_invalid"}} if accepted else {})}


def test_unmap_the_receiver_must_refuse_leaves_the_map_for_the_next_request():
    s = Script()
    s.negotiate()
    s.map(0x10000, 0x10000)
    unmap, remap = _burst(s, ("DMA_UNMAP", DmaUnmap(address=0x10000, size=0x8000)),   # 5
                          ("DMA_MAP", _map_layer(0x10000, 0x8000)))                   # 6
    s.reply(unmap, "DMA_UNMAP", error=errno.EINVAL)
    s.reply(remap, "DMA_MAP", error=errno.EEXIST)
    assert _experts_by_frame(s) == {5: {"dma.unmap_unknown"}, 6: {"dma.overlap"}}


@pytest.mark.parametrize("accepted", [False, True])
def test_refused_unmap_retracts_it_and_flags_the_map_pipelined_after_it(accepted):
    s = Script()
    s.negotiate()
    s.map(0x10000, 0x10000)
    unmap, remap = _burst(s, ("DMA_UNMAP", DmaUnmap(address=0x10000, size=0x10000)),  # 5
                          ("DMA_MAP", _map_layer(0x10000, 0x8000)))                   # 6
    s.reply(unmap, "DMA_UNMAP", error=errno.EBUSY)                                    # 7
    s.reply(remap, "DMA_MAP", error=None if accepted else errno.EEXIST)               # 8
    assert _experts_by_frame(s) == {7: {"dma.overlap"}, **(
        {8: {"reply.accepted_invalid"}} if accepted else {})}


def _state_layer(state: int) -> tuple:
    return DeviceFeature(argsz=16, flags=SET | 2), MigDeviceState(device_state=state)


def test_pipelined_migration_transitions_are_checked_in_order():
    s = Script()
    s.negotiate()
    _set_state(s, 3)                                       # STOP_COPY, answered
    ids = [s.command("DEVICE_FEATURE", *_state_layer(state)) for state in (1, 6)]  # STOP, PRE_COPY
    read = s.command("MIG_DATA_READ", MigDataRead(argsz=12, size=4))
    for msg_id, state in zip(ids, (1, 6)):
        s.reply(msg_id, "DEVICE_FEATURE", *_state_layer(state))
    s.reply(read, "MIG_DATA_READ", MigDataRead(argsz=12, size=4, data=b"data"))
    assert _experts_by_frame(s) == {}


def test_pipelined_forbidden_transition_is_flagged():
    s = Script()
    s.negotiate()
    ids = [s.command("DEVICE_FEATURE", *_state_layer(state)) for state in (3, 6)]  # STOP_COPY, PRE_COPY
    s.reply(ids[0], "DEVICE_FEATURE", *_state_layer(3))
    s.reply(ids[1], "DEVICE_FEATURE", error=errno.EINVAL)
    assert _experts_by_frame(s) == {4: {"migration.transition"}}


def test_session_view_shows_effects_still_in_flight():
    s = Script()
    s.negotiate()
    s.map(0x10000, 0x10000)
    ids = _burst(s, ("DMA_UNMAP", DmaUnmap(address=0x10000, size=0x10000)),
                 ("DMA_MAP", _map_layer(0x20000, 0x1000)))
    tracker = SessionTracker()
    for _ in Analyzer(sessions=tracker).run(s.messages):
        pass
    sections = dict(tracker.conns[0].sections())
    assert sections["DMA maps"] == [
        "0x000000020000-0x000000020fff size 0x1000 RW fd memfd 0x100000 inode 7 offset 0x0 "
        "(frame 6, in flight: no reply yet)"]
    assert any(line.endswith("applied ahead of its reply: unmap 0x10000+0x10000")
               for line in sections["In flight"])
    s.reply(ids[0], "DMA_UNMAP", error=errno.EBUSY)
    tracker = SessionTracker()
    for _ in Analyzer(sessions=tracker).run(s.messages):
        pass
    assert [line.split()[0] for line in dict(tracker.conns[0].sections())["DMA maps"]] == [
        "0x000000010000-0x00000001ffff", "0x000000020000-0x000000020fff"]


@pytest.mark.parametrize("request_", ["DEVICE_FEATURE", "DEVICE_RESET", "DMA_MAP"])
def test_migration_view_shows_a_device_state_change_still_in_flight(request_):
    s = Script()
    s.negotiate()
    layers = {"DEVICE_FEATURE": _state_layer(1), "DEVICE_RESET": (),
              "DMA_MAP": (_map_layer(0x10000, 0x1000),)}[request_]
    s.command(request_, *layers)                                        # frame 3
    tracker = SessionTracker()
    for _ in Analyzer(sessions=tracker).run(s.messages):
        pass
    state_line = dict(tracker.conns[0].sections())["Migration"][0]
    changes_state = request_ != "DMA_MAP"
    assert state_line.endswith("(in flight: frame 3 has no reply yet)") == changes_state


def test_set_irqs_of_four_billion_vectors_is_bounded():
    """No IRQ_INFO told the count: the state holds at most MSI-X's 2048 vectors."""
    s = Script()
    s.negotiate()
    s.call("DEVICE_SET_IRQS", SetIrqs(flags=0x24, index=2, start=0, count=0xFFFFFFFF),
           fds=(EVENTFD,))
    s.call("DEVICE_SET_IRQS", SetIrqs(flags=0x09, index=2, start=0, count=0xFFFFFFFF))
    tracker = SessionTracker()
    for _ in Analyzer(sessions=tracker).run(s.messages):
        pass
    irq = tracker.conns[0].irqs[2]
    assert len(irq.eventfds) == len(irq.masked) == 2048


def test_a_request_never_answered_does_not_hold_every_later_effect(monkeypatch):
    monkeypatch.setattr("vfu_inspect.session.MAX_INFLIGHT", 8)
    s = Script()
    s.negotiate()
    s.command("DMA_MAP", _map_layer(0x10000, 0x1000), fds=(MEMFD,))      # never answered
    for i in range(20):
        s.map(0x100000 + i * 0x1000, 0x1000)
    tracker = SessionTracker()
    for _ in Analyzer(sessions=tracker).run(s.messages):
        pass
    state = tracker.conns[0]
    assert len(state.effects) <= 8 and len(state.maps) == 21


# --- false alarms the spec's own words rule out ---------------------------------------------

def _warnings_and_errors(s: Script) -> set[str]:
    return {e for ids in _experts_by_frame(s).values() for e in ids}


@pytest.mark.parametrize("version_data", [b"", b"{}\0", b'{"capabilities": {}}\0'],
                         ids=["none", "empty-object", "empty-capabilities"])
def test_version_data_and_capabilities_are_optional(version_data):
    """The version data is optional, and so is its capabilities object: both
    sides then assume every default."""
    s = Script()
    s.call("VERSION", Version(major=0, minor=2, json=version_data),
           answer=(Version(major=0, minor=2, json=version_data),))
    assert _warnings_and_errors(s) == set()


def test_max_msg_fds_has_no_upper_bound_in_the_spec():
    """253 is Linux's SCM_MAX_FD for one sendmsg, not a bound on the capability;
    only QEMU caps what a server states (at 16), and that is a note."""
    s = Script()
    s.negotiate(client={**SPEC_CAPS, "max_msg_fds": 1000}, server={**SPEC_CAPS, "max_msg_fds": 1000})
    assert _warnings_and_errors(s) == set()
    assert "interop.qemu_capability" in s.experts()


def test_io_fds_reply_cut_to_the_clients_argsz_is_only_a_truncation():
    """argsz and count say what is needed; no entries and no fd follow."""
    s = Script()
    s.negotiate()
    s.call("DEVICE_GET_REGION_IO_FDS", RegionIoFds(argsz=16, index=2),
           answer=(RegionIoFds(argsz=16 + 2 * 40, index=2, count=2),))
    assert s.experts() == {"argsz.truncated"}


@pytest.mark.parametrize("value", ["true", "5", '"on"'])
def test_a_known_object_capability_of_the_wrong_type_is_a_type_fault(value):
    s = Script()
    _client_version(s, True, b'{"capabilities": {"twin_socket": %s}}\0' % value.encode())
    found = s.experts()
    assert "version.capability_type" in found and "version.unknown_capability" not in found


# --- DEVICE_FEATURE: argsz holds the reply, for each operation and feature -------------------

def _feature_request(flags: int, data: bytes, reply_data: int, short: bool) -> Script:
    s = Script()
    s.negotiate()
    if flags & 0xFFFF in (7, 8):
        _logging_start(s, 0x1000, length=0x40000)
    needed = 8 + (len(data) if flags & (SET | PROBE) else reply_data)
    s.command("DEVICE_FEATURE", DeviceFeature(argsz=needed - short, flags=flags), payload=data)
    return s


REPORT = bytes(DmaLoggingReport(iova=0, length=0x40000, page_size=0x1000))
LOGGING = bytes(DmaLogging(page_size=0x1000, num_ranges=1)) + bytes(DmaLoggingRange(length=0x1000))
FEATURE_REQUESTS = {
    "probe-migration": (PROBE | GET | 1, b"", 0),
    "probe-logging-start": (PROBE | SET | 6, b"", 0),
    "get-migration": (GET | 1, b"", 8),
    "get-device-state": (GET | 2, b"", 8),
    "set-device-state": (SET | 2, bytes(MigDeviceState(device_state=1)), 0),
    "set-logging-start": (SET | 6, LOGGING, 0),
    "set-logging-stop": (SET | 7, LOGGING, 0),
    "get-logging-report": (GET | 8, REPORT, 24 + 8),        # 64 pages: one u64
}


@pytest.mark.parametrize("request_", FEATURE_REQUESTS.values(), ids=FEATURE_REQUESTS)
def test_device_feature_argsz_must_hold_the_reply(request_):
    assert "argsz.small" in _feature_request(*request_, short=True).experts()
    assert "argsz.small" not in _feature_request(*request_, short=False).experts()


# --- QEMU's DMA_READ reply layout, known per connection --------------------------------------

QEMU_CAPS = {"pgsizes": 4096, "max_msg_fds": 16, "max_dma_maps": 65535,
             "max_data_xfer_size": 1 << 20, "migration": {"max_bitmap_size": 1 << 28,
                                                         "pgsize": 4096}, "write_multiple": True}
ZERO_LED = b"\0\0\0\0ABCD"       # data whose first 4 bytes are zero: both layouts fit


def _qemu_read_reply(s: Script, data: bytes) -> None:
    s.call("DMA_READ", DmaRead(address=0x10000, count=len(data)), direction=S2C,
           answer=(QemuDmaRead(address=0x10000, count=len(data), data=data + bytes(4)),))


def _shown_before(s: Script, evidence: str) -> None:
    if evidence == "version":
        s.call("VERSION", Version(major=0, minor=0, json=caps_json(QEMU_CAPS)),
               answer=(Version(major=0, minor=0, json=caps_json(SPEC_CAPS)),))
    else:
        s.negotiate()
    s.map(0x10000)
    if evidence == "bare-write-reply":
        s.call("DMA_WRITE", DmaWrite(address=0x10000, count=4, data=b"abcd"), direction=S2C)
    elif evidence == "earlier-reply":
        _qemu_read_reply(s, b"WXYZ1234")


def _last_read_reply(s: Script) -> Any:
    return list(Analyzer(find_responses(s.messages), SessionTracker()).run(s.messages))[-1]


@pytest.mark.parametrize("evidence", ["version", "bare-write-reply", "earlier-reply"])
def test_a_client_that_showed_qemus_dma_layout_is_decoded_in_it(evidence):
    s = Script()
    _shown_before(s, evidence)
    _qemu_read_reply(s, ZERO_LED)
    reply = _last_read_reply(s)
    layout = [e.message for e in reply.tree.experts if e.id == "interop.dma_qemu_layout"]
    assert layout and "fit both" in layout[0]
    assert reply.tree.values()["dma_read.data"] == [ZERO_LED + bytes(4)]
    assert "dma_read.count" not in {e.id for e in reply.tree.experts}


@pytest.mark.parametrize("evidence", ["none", "version"])
def test_without_evidence_or_against_the_bytes_the_spec_layout_stands(evidence):
    s = Script()
    _shown_before(s, evidence)
    if evidence == "none":
        _qemu_read_reply(s, ZERO_LED)        # the bytes fit both: nothing says QEMU
    else:                                    # the spec's: its last 4 bytes are data, not padding
        s.call("DMA_READ", DmaRead(address=0x10000, count=8), direction=S2C,
               answer=(DmaRead(address=0x10000, count=8, data=b"ABCDEFGH"),))
    reply = _last_read_reply(s)
    assert "interop.dma_qemu_layout" not in {e.id for e in reply.tree.experts}


@pytest.mark.parametrize("start, expected", [(0, "irq.out_of_range"), (1, "range.overflow")])
def test_set_irqs_count_0xffffffff(start, expected):
    """A count of 0xffffffff is beyond any index; from start 1 the end wraps
    to 0 in 32 bits, which a receiver comparing start + count would accept."""
    s = Script()
    _set_irqs(s, 0x21, 0xFFFFFFFF, start=start)
    assert expected in s.experts()


@pytest.mark.parametrize("cmd", ["MIG_DATA_READ", "MIG_DATA_WRITE"])
def test_mig_data_over_the_servers_max_data_xfer_size(cmd):
    s = Script()
    s.negotiate(server={**SPEC_CAPS, "max_data_xfer_size": 4096})
    _set_state(s, 6 if cmd == "MIG_DATA_READ" else 4)      # PRE_COPY reads, RESUMING writes
    layer = (MigDataRead(argsz=8 + 8192, size=8192) if cmd == "MIG_DATA_READ"
             else MigDataWrite(argsz=8, size=8192, data=bytes(8192)))
    s.call(cmd, layer, error=errno.EINVAL)
    assert "xfer.too_big" in s.experts()


def test_dma_unmap_carrying_an_fd_is_flagged():
    s = Script()
    s.negotiate()
    s.map(0x10000)
    unmap = DmaUnmap(address=0x10000, size=0x10000)
    s.call("DMA_UNMAP", unmap, answer=(unmap,), fds=(MEMFD,))
    assert "fd.count" in _experts_by_frame(s)[5]


@pytest.mark.parametrize("migration_flags, flagged", [(1, True), (5, False)],
                         ids=["stop-copy-only", "with-pre-copy"])
def test_without_pre_copy_no_arc_goes_through_it(migration_flags, flagged):
    s = Script()
    s.negotiate()
    s.call("DEVICE_FEATURE", DeviceFeature(argsz=16, flags=GET | 1),
           answer=(DeviceFeature(argsz=16, flags=GET | 1),
                   proto.MigrationFeature(flags=migration_flags)))
    _set_state(s, 6, error=errno.EINVAL if flagged else None)        # RUNNING -> PRE_COPY
    assert ("migration.transition" in s.experts()) == flagged


def _echo_of(cmd: str, request: tuple, reply: tuple) -> set[str]:
    s = Script()
    s.negotiate()
    s.region(0, 0x1000)
    s.map(0x10000)
    s.call(cmd, *request, answer=reply)
    return s.experts()


ECHOES = {
    "region-read-offset": ("REGION_READ", (RegionRead(offset=0, region=0, count=4),),
                           lambda offset: (RegionRead(offset=offset, region=0, count=4,
                                                      data=bytes(4)),)),
    "unmap-entry": ("DMA_UNMAP", (DmaUnmap(address=0x10000, size=0x10000),),
                    lambda size: (DmaUnmap(address=0x10000, size=0x10000 - size),)),
    "feature-set": ("DEVICE_FEATURE", (DeviceFeature(argsz=16, flags=SET | 2),
                                       MigDeviceState(device_state=1)),
                    lambda state: (DeviceFeature(argsz=16, flags=SET | 2),
                                   MigDeviceState(device_state=1 + state))),
}


@pytest.mark.parametrize("cmd, request_, reply", ECHOES.values(), ids=ECHOES)
def test_a_reply_repeats_what_the_spec_has_it_echo(cmd, request_, reply):
    assert "reply.echo_mismatch" in _echo_of(cmd, request_, reply(4))
    assert "reply.echo_mismatch" not in _echo_of(cmd, request_, reply(0))
