"""vfio-user protocol dissector (QEMU docs/interop/vfio-user.rst).

The layers below are the one declaration of the wire format: scapy builds
messages from them, `fields.layer` registers their fields under their filter
names and compiles them for decoding.  Each command then has a request and a
reply dissector that walks its variable parts and flags what is wrong.

All integers are little-endian; every struct is packed.
"""

from __future__ import annotations

import errno
import functools
import json
import struct
from dataclasses import dataclass, field as dc_field
from typing import Any, Callable

from scapy.fields import StrField
from scapy.packet import Packet

from vfu_inspect.fields import (
    BOOL, BYTES, FLOAT, FRAME, STRING, FieldDef, all_fields, bits32, bits64, expert_info,
    field, layer, raw, u16, u32, u64)
from vfu_inspect.tree import Item, Tree

HEADER_SIZE = 16

COMMANDS = {
    1: "VERSION", 2: "DMA_MAP", 3: "DMA_UNMAP", 4: "DEVICE_GET_INFO",
    5: "DEVICE_GET_REGION_INFO", 6: "DEVICE_GET_REGION_IO_FDS",
    7: "DEVICE_GET_IRQ_INFO", 8: "DEVICE_SET_IRQS", 9: "REGION_READ",
    10: "REGION_WRITE", 11: "DMA_READ", 12: "DMA_WRITE", 13: "DEVICE_RESET",
    14: "DIRTY_PAGES", 15: "REGION_WRITE_MULTI", 16: "DEVICE_FEATURE",
    17: "MIG_DATA_READ", 18: "MIG_DATA_WRITE",
}
CMD = {name: number for number, name in COMMANDS.items()}
OBSOLETE_COMMANDS = {14}                 # in QEMU's protocol.h, not in the spec
SERVER_COMMANDS = {CMD["DMA_READ"], CMD["DMA_WRITE"]}

TYPE_COMMAND, TYPE_REPLY = 0, 1
MSG_TYPES = {TYPE_COMMAND: "command", TYPE_REPLY: "reply"}
FLAG_TYPE_MASK, FLAG_NO_REPLY, FLAG_ERROR = 0x0F, 0x10, 0x20
ERRNO_NAMES = dict(errno.errorcode)

REGIONS = {0: "BAR0", 1: "BAR1", 2: "BAR2", 3: "BAR3", 4: "BAR4", 5: "BAR5",
           6: "ROM", 7: "CONFIG", 8: "VGA"}
IRQS = {0: "INTx", 1: "MSI", 2: "MSI-X", 3: "ERR", 4: "REQ"}
REGION_CAPS = {1: "SPARSE_MMAP", 2: "TYPE", 3: "MIGRATION"}
IO_FD_TYPES = {0: "IOEVENTFD", 1: "IOREGIONFD", 2: "IOEVENTFD_SHADOW"}
FEATURES = {1: "MIGRATION", 2: "MIG_DEVICE_STATE", 6: "DMA_LOGGING_START",
            7: "DMA_LOGGING_STOP", 8: "DMA_LOGGING_REPORT"}
MIG_STATES = {0: "ERROR", 1: "STOP", 2: "RUNNING", 3: "STOP_COPY",
              4: "RESUMING", 5: "RUNNING_P2P", 6: "PRE_COPY", 7: "PRE_COPY_P2P"}

DMA_MAP_FLAGS = {"read": 1, "write": 2, "mmap": 4, "file_io": 8}
SPEC_DMA_MAP_FLAGS = 0x3
DMA_UNMAP_FLAGS = {"get_dirty_bitmap": 1, "all": 2}
DEVICE_INFO_FLAGS = {"reset": 1, "pci": 2}
REGION_FLAGS = {"read": 1, "write": 2, "mmap": 4, "caps": 8}
IRQ_INFO_FLAGS = {"eventfd": 1, "maskable": 2, "automasked": 4, "noresize": 8}
SET_IRQS_FLAGS = {"data_none": 0x1, "data_bool": 0x2, "data_eventfd": 0x4,
                  "mask": 0x8, "unmask": 0x10, "trigger": 0x20}
SET_IRQS_DATA, SET_IRQS_ACTION = 0x7, 0x38
IO_FD_FLAGS = {"datamatch": 1}
FEATURE_FLAGS = {"feature": (0xFFFF, FEATURES), "get": 1 << 16,
                 "set": 1 << 17, "probe": 1 << 18}
FEATURE_GET, FEATURE_SET, FEATURE_PROBE = 1 << 16, 1 << 17, 1 << 18
MIGRATION_FLAGS = {"stop_copy": 1, "p2p": 2, "pre_copy": 4}

# VERSION capabilities: JSON path -> (type, spec default, label)
CAPABILITIES: dict[str, tuple[type, Any, str]] = {
    "max_msg_fds": (int, 1, "Max fds per message"),
    "max_data_xfer_size": (int, 1048576, "Max data transfer size"),
    "max_dma_maps": (int, 65535, "Max DMA maps"),
    "pgsizes": (int, 4096, "Supported page sizes"),
    "migration.pgsize": (int, 4096, "Migration page size"),
    "migration.max_bitmap_size": (int, None, "Migration max bitmap size"),
    "twin_socket.supported": (bool, False, "Twin socket supported"),
    "twin_socket.fd_index": (int, None, "Twin socket fd index"),
    "write_multiple": (bool, False, "REGION_WRITE_MULTI supported"),
}
SCM_MAX_FD = 253                       # Linux's limit of fds in one message
PAGE_4K, MAX_BITMAP_SIZE = 4096, 256 << 20


def _pow2_multiple_of_4k(v: int) -> str | None:
    return None if v >= PAGE_4K and v & (v - 1) == 0 else "not a power of two >= 4096"


# What each numeric capability may be (None: fine); QEMU rejects the rest.
CAPABILITY_RANGES: dict[str, Callable[[int], str | None]] = {
    "max_msg_fds": lambda v: None if 1 <= v <= SCM_MAX_FD else f"outside 1..{SCM_MAX_FD}",
    "max_data_xfer_size": lambda v: None if v > 0 else "must be positive",
    "max_dma_maps": lambda v: None if v > 0 else "must be positive",
    "pgsizes": lambda v: None if v and not v & (PAGE_4K - 1) else "needs a page size >= 4096",
    "migration.pgsize": _pow2_multiple_of_4k,
    "migration.max_bitmap_size": lambda v: None if 0 < v <= MAX_BITMAP_SIZE else "outside 1..256 MiB",
}


# --- expert infos -------------------------------------------------------------
# Every check, once: id, severity, what it means, where the rule comes from.
# "spec" is QEMU's docs/interop/vfio-user.rst; "facts" is what QEMU 10.2.2 and
# libvfio-user do on the wire (shared/protocol-facts.md).

SPEC, FACTS = "spec", "facts"
for _id, _severity, _summary, _section in [
    # framing
    ("malformed.short", "error", "a structure is cut short by the message end", f"{SPEC} § Protocol Specification"),
    ("malformed.trailing", "warning", "bytes beyond what the command's layout accounts for", f"{SPEC} § Protocol Specification"),
    ("header.size", "error", "msg_size disagrees with the message length", f"{SPEC} § Header"),
    ("header.type", "error", "message type is neither command nor reply", f"{SPEC} § Header"),
    ("header.unknown_command", "warning", "command number not in the spec", f"{SPEC} § Commands"),
    ("header.obsolete_command", "warning", "command number only in QEMU's protocol.h", f"{FACTS} § 2"),
    ("header.error_in_command", "warning", "ERROR flag on a command (flags contradict)", f"{SPEC} § Header"),
    ("header.no_reply_in_reply", "warning", "NO_REPLY flag on a reply (flags contradict)", f"{SPEC} § Header"),
    ("header.flags_unknown", "warning", "flag bits the spec does not define", f"{SPEC} § Header"),
    ("header.errno_zero", "note", "error reply with errno 0", f"{SPEC} § Header"),
    ("header.error_reserved", "note", "error field set without the ERROR flag", f"{SPEC} § Header"),
    ("reply.unmatched", "error", "reply whose msg_id matches no request in flight", f"{SPEC} § Header; QEMU: unexpected reply"),
    ("reply.command_mismatch", "error", "reply's command differs from its request's", f"{SPEC} § Header"),
    ("reply.accepted_invalid", "error", "success reply to a request the receiver must refuse", f"{SPEC} § Protocol Specification"),
    ("reply.to_no_reply", "error", "reply to a NO_REPLY request (desynchronizes QEMU's posted writes)", f"{SPEC} § Header; {FACTS} § 9/10"),
    ("request.duplicate_id", "note", "msg_id reused while a request with it is in flight", f"{FACTS} § 1"),
    ("request.unanswered", "warning", "request never answered", f"{SPEC} § Socket Disconnection Behavior"),
    ("request.timeout", "warning", "request unanswered for longer than the timeout (QEMU: 5 s)", f"{FACTS} § 4"),
    ("fd.count", "warning", "fds where the command carries none, or too few", f"{SPEC} § Protocol Specification"),
    ("fd.over_max", "error", "more fds than the receiver's max_msg_fds", f"{SPEC} § VFIO_USER_VERSION"),
    ("xfer.too_big", "warning", "data transfer over the receiver's max_data_xfer_size", f"{SPEC} § VFIO_USER_VERSION"),
    ("argsz.truncated", "note", "reply truncated to the request's argsz (the client retries)", f"{SPEC} § argsz"),
    ("argsz.mismatch", "warning", "argsz disagrees with the payload", f"{SPEC} § argsz"),
    ("argsz.small", "warning", "request argsz below the reply structure", f"{SPEC} § argsz"),
    # negotiation
    ("version.not_first", "error", "a command before VERSION was answered", f"{SPEC} § VFIO_USER_VERSION"),
    ("version.major", "error", "server's major version differs from the client's", f"{SPEC} § VFIO_USER_VERSION"),
    ("version.minor", "warning", "server's minor version above the client's", f"{SPEC} § VFIO_USER_VERSION"),
    ("version.json_unterminated", "warning", "capabilities JSON not NUL-terminated", f"{FACTS} § 1 VERSION"),
    ("version.json_invalid", "error", "capabilities JSON does not parse", f"{SPEC} § VFIO_USER_VERSION"),
    ("version.no_capabilities", "warning", "JSON without a capabilities object", f"{SPEC} § VFIO_USER_VERSION"),
    ("version.unknown_capability", "note", "capability not in the spec", f"{SPEC} § VFIO_USER_VERSION"),
    ("version.capability_type", "warning", "capability of the wrong JSON type", f"{SPEC} § VFIO_USER_VERSION"),
    ("version.capability_range", "warning", "capability value out of range", f"{SPEC} § VFIO_USER_VERSION; {FACTS} § 1"),
    ("twin.not_negotiated", "error", "twin socket used or offered without negotiation", f"{SPEC} § VFIO_USER_VERSION"),
    # DMA
    ("dma_map.flags_unknown", "warning", "DMA_MAP prot bits beyond READ/WRITE no implementation knows", f"{SPEC} § VFIO_USER_DMA_MAP"),
    ("dma_map.flags_extension", "note", "DMA_MAP MMAP/FILE_IO flags (libvfio-user extensions)", f"{FACTS} § 2 DMA_MAP"),
    ("dma.overlap", "warning", "DMA_MAP overlapping a live map (the server must answer EEXIST)", f"{SPEC} § VFIO_USER_DMA_MAP"),
    ("dma.unmap_unknown", "warning", "DMA_UNMAP of a range that is not a live map", f"{SPEC} § VFIO_USER_DMA_UNMAP"),
    ("dma.misaligned", "warning", "DMA map not aligned to the negotiated page size", f"{SPEC} § VFIO_USER_VERSION pgsizes"),
    ("dma.too_many", "warning", "more live DMA maps than max_dma_maps", f"{SPEC} § VFIO_USER_VERSION"),
    ("dma.access_unmapped", "warning", "DMA_READ/WRITE outside every live map", f"{SPEC} § VFIO_USER_DMA_READ"),
    ("dma_unmap.bitmap_size", "error", "dirty bitmap size disagrees with its header, range or page size", f"{SPEC} § VFIO_USER_DMA_UNMAP"),
    ("dma_logging.bitmap_size", "warning", "DMA_LOGGING_REPORT bitmap size disagrees with range and page size", f"{SPEC} § VFIO_USER_DEVICE_FEATURE"),
    ("dma_logging.ranges_short", "error", "num_ranges exceeds the ranges sent", f"{SPEC} § VFIO_USER_DEVICE_FEATURE"),
    ("dirty.bitmap_too_big", "error", "dirty bitmap over the negotiated max_bitmap_size", f"{FACTS} § 1 VERSION; libvfio-user issue 469"),
    # regions and IRQs
    ("region_info.caps_missing", "warning", "CAPS flag with no capability chain", f"{SPEC} § VFIO_USER_DEVICE_GET_REGION_INFO"),
    ("region_info.mmap_no_fd", "note", "mmap-able region whose reply carries no fd", f"{SPEC} § VFIO_USER_DEVICE_GET_REGION_INFO"),
    ("region_info.fd_per_area", "note", "one fd per sparse area instead of one per region", f"{FACTS} § 3"),
    ("region_info.cap_loop", "error", "region capability chain loops", f"{SPEC} § VFIO_USER_DEVICE_GET_REGION_INFO"),
    ("region_info.cap_unknown", "note", "unknown region capability id", f"{SPEC} § VFIO_USER_DEVICE_GET_REGION_INFO"),
    ("region_info.areas_short", "error", "nr_areas exceeds the areas sent", f"{SPEC} § VFIO_USER_DEVICE_GET_REGION_INFO"),
    ("region_io_fds.entry_size", "error", "IO_FDS entries neither 40 nor 48 bytes", f"{SPEC} § VFIO_USER_DEVICE_GET_REGION_IO_FDS"),
    ("region_io_fds.fd_index", "error", "sub-region names an fd that was not passed", f"{SPEC} § VFIO_USER_DEVICE_GET_REGION_IO_FDS"),
    ("region.unknown", "warning", "access to a region index the device did not report", f"{SPEC} § VFIO_USER_DEVICE_GET_INFO"),
    ("region.out_of_bounds", "warning", "region access beyond the region's size", f"{SPEC} § VFIO_USER_REGION_READ"),
    ("region.access_flags", "warning", "region access against its READ/WRITE flags", f"{SPEC} § VFIO_USER_DEVICE_GET_REGION_INFO"),
    ("region_read.count", "error", "REGION_READ count disagrees with the data", f"{SPEC} § VFIO_USER_REGION_READ"),
    ("region_write.count", "error", "REGION_WRITE count disagrees with the data", f"{SPEC} § VFIO_USER_REGION_WRITE"),
    ("write_multi.count", "error", "wr_cnt exceeds the entries sent", f"{SPEC} § VFIO_USER_REGION_WRITE_MULTI"),
    ("write_multi.entry_count", "error", "write entry count over 8 bytes", f"{SPEC} § VFIO_USER_REGION_WRITE_MULTI"),
    ("set_irqs.flags", "error", "SET_IRQS needs exactly one data type and one action", f"{SPEC} § VFIO_USER_DEVICE_SET_IRQS"),
    ("set_irqs.bool_count", "error", "DATA_BOOL bytes disagree with count", f"{SPEC} § VFIO_USER_DEVICE_SET_IRQS"),
    ("set_irqs.fd_count", "warning", "eventfd count disagrees with count", f"{SPEC} § VFIO_USER_DEVICE_SET_IRQS"),
    ("irq.out_of_range", "warning", "SET_IRQS beyond the index's count", f"{SPEC} § VFIO_USER_DEVICE_SET_IRQS"),
    # server commands, interop and deadlock risk
    ("dma_read.count", "error", "DMA_READ count disagrees with the data", f"{SPEC} § VFIO_USER_DMA_READ"),
    ("dma_write.count", "error", "DMA_WRITE count disagrees with the data", f"{SPEC} § VFIO_USER_DMA_WRITE"),
    ("dma_read.count_mismatch", "warning", "DMA_READ reply count differs from the request's", f"{SPEC} § VFIO_USER_DMA_READ"),
    ("dma_write.count_mismatch", "warning", "DMA_WRITE reply count differs from the request's", f"{SPEC} § VFIO_USER_DMA_WRITE"),
    ("interop.dma_qemu_layout", "warning", "DMA_READ/WRITE in QEMU's layout (u32 count, data at 12)", f"{FACTS} § 11/12"),
    ("interop.dma_write_bare_reply", "error", "DMA_WRITE reply is QEMU's bare header: libvfio-user fails the transfer (\"bad reply to DMA transfer\")", f"{FACTS} § 11/12"),
    ("interop.region_caps_offset", "warning", "CAPS flag with cap_offset outside [32, argsz], as Linux VFIO sends in a truncated reply: QEMU fails (\"failed to get region N info: Invalid argument\")", f"{FACTS} peers: QEMU 10.2.2"),
    ("interop.io_fds_48", "note", "48-byte IO_FDS entries (libvfio-user), the spec has 40", f"{FACTS} § 6 IO_FDS"),
    ("interop.mig_data_padding", "note", "short MIG_DATA_READ reply padded to the buffer (libvfio-user)", f"{FACTS} § 17/18"),
    ("deadlock.server_command", "warning", "server command on the main socket while a client request is in flight, no twin socket", f"{SPEC} § Command Concurrency; libvfio-user issues 279, 466"),
    # features and migration
    ("device_feature.get_and_set", "error", "GET and SET together without PROBE", f"{SPEC} § VFIO_USER_DEVICE_FEATURE"),
    ("device_feature.unknown", "note", "unknown device feature", f"{SPEC} § VFIO_USER_DEVICE_FEATURE"),
    ("migration.transition", "warning", "device-state transition the state machine forbids", f"{SPEC} § VFIO_USER_DEVICE_FEATURE; {FACTS} § 16"),
    ("migration.data_state", "warning", "MIG_DATA_READ/WRITE in a state that allows none", f"{SPEC} § VFIO_USER_MIG_DATA_READ"),
    ("mig_data_read.size", "error", "MIG_DATA_READ size disagrees with the data", f"{SPEC} § VFIO_USER_MIG_DATA_READ"),
    ("mig_data_write.size", "error", "MIG_DATA_WRITE size disagrees with the data", f"{SPEC} § VFIO_USER_MIG_DATA_WRITE"),
    # the tool itself
    ("dissector.bug", "error", "the dissector failed on this message", "vfu-inspect"),
    ("capture.truncated", "warning", "the capture holds only part of the message", "vfu-inspect"),
    ("fault.injected", "note", "the proxy injected a fault here (proxy --fault)", "vfu-inspect"),
]:
    expert_info(_id, _severity, _summary, _section)


# --- layers -------------------------------------------------------------------

@layer("vfio_user")
class Header(Packet):
    name = "vfio-user"
    fields_desc = [
        u16("msg_id", base="hex", label="Message ID"),
        u16("cmd", values=COMMANDS, label="Command"),
        u32("size", None, label="Message size"),
        bits32("flags", {"type": (FLAG_TYPE_MASK, MSG_TYPES),
                         "no_reply": FLAG_NO_REPLY, "error": FLAG_ERROR}),
        u32("error", values=ERRNO_NAMES, label="Error"),
    ]

    def post_build(self, pkt: bytes, pay: bytes) -> bytes:
        if self.size is None:
            pkt = pkt[:4] + struct.pack("<I", len(pkt) + len(pay)) + pkt[8:]
        return pkt + pay


@layer("version")
class Version(Packet):
    name = "VERSION"
    fields_desc = [u16("major"), u16("minor"), StrField("json", b"")]


@layer("dma_map")
class DmaMap(Packet):
    name = "DMA_MAP"
    fields_desc = [
        u32("argsz", 32),
        bits32("flags", DMA_MAP_FLAGS),
        u64("offset", base="hex", label="File offset"),
        u64("address", base="hex", label="IOVA"),
        u64("size", base="hex"),
    ]


@layer("dma_unmap")
class DmaUnmap(Packet):
    name = "DMA_UNMAP"
    fields_desc = [
        u32("argsz", 24),
        bits32("flags", DMA_UNMAP_FLAGS),
        u64("address", base="hex", label="IOVA"),
        u64("size", base="hex"),
    ]


@layer("dma_unmap.bitmap")
class DirtyBitmap(Packet):
    name = "Dirty bitmap"
    fields_desc = [u64("pgsize", base="hex", label="Page size"),
                   u64("size", label="Bitmap size"), StrField("data", b"")]


@layer("device_info")
class DeviceInfo(Packet):
    name = "DEVICE_GET_INFO"
    fields_desc = [u32("argsz", 16), bits32("flags", DEVICE_INFO_FLAGS),
                   u32("num_regions"), u32("num_irqs")]


@layer("region_info")
class RegionInfo(Packet):
    name = "DEVICE_GET_REGION_INFO"
    fields_desc = [
        u32("argsz", 32),
        bits32("flags", REGION_FLAGS),
        u32("index", values=REGIONS, label="Region"),
        u32("cap_offset", base="hex", label="Capability offset"),
        u64("size", base="hex"),
        u64("offset", base="hex", label="mmap offset"),
    ]


@layer("region_info.cap")
class RegionCap(Packet):
    name = "Region capability"
    fields_desc = [u16("id", values=REGION_CAPS), u16("version", 1),
                   u32("next", base="hex", label="Next capability")]


@layer("region_info.sparse")
class SparseMmap(Packet):
    name = "Sparse mmap areas"
    fields_desc = [u32("nr_areas", label="Number of areas"), u32("reserved")]


@layer("region_info.area")
class SparseArea(Packet):
    name = "mmap area"
    fields_desc = [u64("offset", base="hex"), u64("size", base="hex")]


@layer("region_info.type")
class RegionType(Packet):
    name = "Region type"
    fields_desc = [u32("type", base="hex"), u32("subtype", base="hex")]


@layer("region_io_fds")
class RegionIoFds(Packet):
    name = "DEVICE_GET_REGION_IO_FDS"
    fields_desc = [u32("argsz", 16), u32("flags", base="hex"),
                   u32("index", values=REGIONS, label="Region"), u32("count")]


@layer("region_io_fds.sub")
class SubRegion(Packet):
    """The spec's 40-byte sub-region (ioeventfd / ioregionfd)."""

    name = "Sub-region"
    fields_desc = [
        u64("offset", base="hex"),
        u64("size", base="hex"),
        u32("fd_index", label="fd index"),
        u32("type", values=IO_FD_TYPES),
        bits32("flags", IO_FD_FLAGS),
        u32("padding"),
        u64("datamatch", base="hex", label="Datamatch / user data"),
    ]


@layer("region_io_fds.sub")
class ShadowSubRegion(Packet):
    """libvfio-user's 48-byte ioeventfd with a shadow memory fd."""

    name = "Sub-region"
    fields_desc = [
        u64("offset", base="hex"),
        u64("size", base="hex"),
        u32("fd_index", label="fd index"),
        u32("type", values=IO_FD_TYPES),
        bits32("flags", IO_FD_FLAGS),
        u32("shadow_fd_index", label="Shadow memory fd index"),
        u64("shadow_offset", base="hex"),
        u64("datamatch", base="hex", label="Datamatch / user data"),
    ]


@layer("irq_info")
class IrqInfo(Packet):
    name = "DEVICE_GET_IRQ_INFO"
    fields_desc = [u32("argsz", 16), bits32("flags", IRQ_INFO_FLAGS),
                   u32("index", values=IRQS, label="IRQ index"), u32("count")]


@layer("set_irqs")
class SetIrqs(Packet):
    name = "DEVICE_SET_IRQS"
    fields_desc = [u32("argsz", 20), bits32("flags", SET_IRQS_FLAGS),
                   u32("index", values=IRQS, label="IRQ index"),
                   u32("start"), u32("count"), StrField("data", b"")]


class RegionAccess(Packet):
    fields_desc = [u64("offset", base="hex"),
                   u32("region", values=REGIONS), u32("count"),
                   StrField("data", b"")]


@layer("region_read")
class RegionRead(RegionAccess):
    name = "REGION_READ"


@layer("region_write")
class RegionWrite(RegionAccess):
    name = "REGION_WRITE"


@layer("write_multi")
class WriteMulti(Packet):
    name = "REGION_WRITE_MULTI"
    fields_desc = [u64("wr_cnt", label="Write count")]


@layer("write_multi.entry")
class WriteMultiEntry(Packet):
    name = "Write"
    fields_desc = [u64("offset", base="hex"), u32("region", values=REGIONS),
                   u32("count"), raw("data", 8)]


class DmaAccess(Packet):
    """Spec layout of DMA_READ/DMA_WRITE: address u64, count u64, data."""

    fields_desc = [u64("address", base="hex"), u64("count"),
                   StrField("data", b"")]


class QemuDmaAccess(Packet):
    """QEMU 10.2's layout: address u64, count u32, data at 12."""

    fields_desc = [u64("address", base="hex"), u32("count"),
                   StrField("data", b"")]


@layer("dma_read")
class DmaRead(DmaAccess):
    name = "DMA_READ"


@layer("dma_write")
class DmaWrite(DmaAccess):
    name = "DMA_WRITE"


@layer("dma_read")
class QemuDmaRead(QemuDmaAccess):
    name = "DMA_READ"


@layer("dma_write")
class QemuDmaWrite(QemuDmaAccess):
    name = "DMA_WRITE"


@layer("device_feature")
class DeviceFeature(Packet):
    name = "DEVICE_FEATURE"
    fields_desc = [u32("argsz", 8), bits32("flags", FEATURE_FLAGS),
                   StrField("data", b"")]


@layer("migration")
class MigrationFeature(Packet):
    name = "Migration feature"
    vfu_command = "DEVICE_FEATURE"      # a payload of that command
    fields_desc = [bits64("flags", MIGRATION_FLAGS)]


@layer("mig_state")
class MigDeviceState(Packet):
    name = "Device state"
    vfu_command = "DEVICE_FEATURE"      # a payload of that command
    fields_desc = [u32("device_state", values=MIG_STATES, label="Device state"),
                   u32("data_fd", base="hex", label="Data fd (unused)")]


@layer("dma_logging")
class DmaLogging(Packet):
    name = "DMA logging"
    vfu_command = "DEVICE_FEATURE"      # a payload of that command
    fields_desc = [u64("page_size", base="hex"),
                   u32("num_ranges", label="Number of ranges"), u32("reserved")]


@layer("dma_logging.range")
class DmaLoggingRange(Packet):
    name = "Range"
    fields_desc = [u64("iova", base="hex", label="IOVA"), u64("length", base="hex")]


@layer("dma_logging_report")
class DmaLoggingReport(Packet):
    name = "DMA logging report"
    vfu_command = "DEVICE_FEATURE"      # a payload of that command
    fields_desc = [u64("iova", base="hex", label="IOVA"), u64("length", base="hex"),
                   u64("page_size", base="hex"), StrField("bitmap", b"")]


class MigData(Packet):
    fields_desc = [u32("argsz", 8), u32("size"), StrField("data", b"")]


@layer("mig_data_read")
class MigDataRead(MigData):
    name = "MIG_DATA_READ"


@layer("mig_data_write")
class MigDataWrite(MigData):
    name = "MIG_DATA_WRITE"


# Fields that are not a fixed part of a layer.
RESERVED_ERROR = field("vfio_user.reserved", "Error field (reserved: no ERROR flag)")
field("vfio_user.payload", "Undecoded payload", BYTES)
field("vfio_user.trailing", "Trailing bytes", BYTES)
field("vfio_user.response_in", "Response in frame", FRAME)
field("vfio_user.response_to", "Request in frame", FRAME)
field("vfio_user.time", "Response time (s)", FLOAT)
field("version.json", "Capabilities JSON", STRING)
field("version.unknown_capability", "Unknown capability", STRING)
for _path, (_type, _default, _label) in CAPABILITIES.items():
    field(f"version.{_path}", _label, BOOL if _type is bool else "uint",
          base="hex" if _path == "pgsizes" else "dec")
field("dma_unmap.bitmap.data", "Dirty bitmap", BYTES)
field("set_irqs.data", "Data", BYTES)
field("set_irqs.bool", "Bool", "uint")
field("region_read.data", "Data", BYTES)
field("region_write.data", "Data", BYTES)
field("dma_read.data", "Data", BYTES)
field("dma_write.data", "Data", BYTES)
field("device_feature.data", "Feature data", BYTES)
field("dma_logging_report.bitmap", "Dirty bitmap", BYTES)
field("mig_data_read.data", "Data", BYTES)
field("mig_data_write.data", "Data", BYTES)


# --- decoding helpers -----------------------------------------------------------

@dataclass
class Context:
    """What a dissector may know beyond the message's own bytes."""

    direction: str                       # "c2s" or "s2c"
    fds: list[dict[str, Any]]            # metadata of the passed fds
    request: bytes | None = None         # the matched request, for a reply
    fd_purposes: dict[int, str] = dc_field(default_factory=dict)

    def purpose(self, index: int, text: str) -> None:
        if 0 <= index < len(self.fds):
            self.fd_purposes.setdefault(index, text)


def add_layer(tree: Tree, cls: type[Packet], msg: bytes, offset: int,
              parent: Item | None = None) -> tuple[Item, dict[str, int]]:
    """Add a layer's fixed fields; decode as many as fit and flag the rest."""
    compiled = cls.vfu_compiled
    node = tree.add(cls.vfu_field, None, offset, 0, parent, text="")
    available = len(msg) - offset
    if available >= compiled.size:
        raw_values = compiled.struct.unpack_from(msg, offset)
    else:
        raw_values = _unpack_partial(compiled, msg, offset)
        tree.expert("malformed.short",
                    f"{cls.vfu_name}: {max(available, 0)} bytes, "
                    f"{compiled.size} expected", offset, max(available, 0))
    values = {}
    for (fd, rel, size), value in zip(compiled.fields, raw_values):
        tree.add(fd, value, offset + rel, size, node)
        values[fd.name.rsplit(".", 1)[1]] = value
    node.length = sum(size for _, _, size in compiled.fields[:len(raw_values)])
    return node, values


def _unpack_partial(compiled: Any, msg: bytes, offset: int) -> tuple:
    values = []
    for fd, rel, size in compiled.fields:
        if offset + rel + size > len(msg):
            break
        fmt = compiled.struct.format[1:]
        values.append(struct.unpack_from(
            "<" + _member_format(fmt, len(values)), msg, offset + rel)[0])
    return tuple(values)


def _member_format(fmt: str, index: int) -> str:
    """The struct code of member `index` in a compiled format like 'IIQ8s'."""
    members, number = [], ""
    for ch in fmt:
        if ch.isdigit():
            number += ch
        else:
            members.append(number + ch)
            number = ""
    return members[index]


def add_bytes(tree: Tree, name: str, msg: bytes, offset: int, end: int,
              parent: Item | None = None) -> Item:
    return tree.add(name, bytes(msg[offset:end]), offset, max(end - offset, 0), parent)


def expect_end(tree: Tree, msg: bytes, end: int, what: str,
               parent: Item | None = None) -> None:
    """Flag bytes beyond what the layout accounts for."""
    extra = len(msg) - end
    if extra > 0:
        add_bytes(tree, "vfio_user.trailing", msg, end, len(msg), parent)
        tree.expert("malformed.trailing",
                    f"{what}: {extra} unexpected trailing bytes", end, extra)


def expect_empty(tree: Tree, msg: bytes, what: str) -> None:
    expect_end(tree, msg, HEADER_SIZE, what)


def check_reply_argsz(tree: Tree, argsz: int, payload_len: int, what: str) -> None:
    """In a reply, argsz is the size the full payload needs."""
    if argsz > payload_len:
        tree.expert("argsz.truncated",
                    f"{what} reply truncated: argsz asks for {argsz} bytes, "
                    f"{payload_len} sent; the client should retry with a larger buffer")
    elif argsz < payload_len:
        tree.expert("argsz.mismatch",
                    f"{what} reply argsz {argsz} is smaller than its payload ({payload_len})")


def check_request_argsz(tree: Tree, argsz: int, minimum: int, what: str) -> None:
    """In most requests argsz is the largest reply the client accepts."""
    if argsz < minimum:
        tree.expert("argsz.small",
                    f"{what} argsz {argsz} is below the {minimum}-byte reply struct")


def hex_size(n: int) -> str:
    return f"{n:#x}"


def fd_text(ctx: Context, index: int = 0) -> str:
    return ctx.fds[index].get("kind", "fd") if index < len(ctx.fds) else "none"


# --- per-command dissectors ------------------------------------------------------
# Each gets (tree, msg, ctx, off) with off = start of the payload, and returns
# the info string.

Dissector = Callable[[Tree, bytes, Context, int], str]
REQUESTS: dict[int, Dissector] = {}
REPLIES: dict[int, Dissector] = {}


def request(cmd: str) -> Callable[[Dissector], Dissector]:
    def wrap(fn: Dissector) -> Dissector:
        REQUESTS[CMD[cmd]] = fn
        return fn
    return wrap


def reply(cmd: str) -> Callable[[Dissector], Dissector]:
    def wrap(fn: Dissector) -> Dissector:
        REPLIES[CMD[cmd]] = fn
        return fn
    return wrap


def bare(cmd: str, kind: str) -> None:
    """A command or reply that has no payload."""
    def fn(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
        expect_empty(tree, msg, f"{cmd} {kind}")
        return ""
    (REQUESTS if kind == "request" else REPLIES)[CMD[cmd]] = fn


@request("VERSION")
@reply("VERSION")
def _version(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
    node, v = add_layer(tree, Version, msg, off)
    start = off + Version.vfu_compiled.size
    if len(msg) <= start:
        return f"{v.get('major', '?')}.{v.get('minor', '?')}"
    text = bytes(msg[start:])
    if not text.endswith(b"\0"):
        tree.expert("version.json_unterminated",
                    "capabilities JSON is not NUL-terminated (QEMU rejects such a reply)",
                    start, len(text))
    text = text.rstrip(b"\0")
    try:
        source = text.decode("utf-8")
        caps = json.loads(source) if source.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        # shown up to its first NUL, as QEMU reads it and Wireshark shows strings
        shown = text.split(b"\0", 1)[0].decode("utf-8", "replace")
        tree.add("version.json", shown, start, len(text), node)
        tree.expert("version.json_invalid", f"capabilities JSON invalid: {exc}",
                    start, len(text))
        return f"{v['major']}.{v['minor']} (invalid JSON)"
    json_item = tree.add("version.json", source, start, len(text), node)
    _capabilities(tree, caps, json_item, start, len(text), ctx)
    return f"{v['major']}.{v['minor']} {json.dumps(caps, separators=(',', ':'))}"


def _capabilities(tree: Tree, doc: Any, parent: Item, start: int, length: int,
                  ctx: Context) -> None:
    caps = doc.get("capabilities") if isinstance(doc, dict) else None
    if not isinstance(caps, dict):
        tree.expert("version.no_capabilities",
                    "JSON has no \"capabilities\" object", start, length)
        return
    for path, value in _flatten(caps):
        spec = CAPABILITIES.get(path)
        if spec is None:
            tree.add("version.unknown_capability", f"{path}={json.dumps(value)}",
                     start, length, parent)
            tree.expert("version.unknown_capability",
                        f"capability {path!r} is not in the spec", start, length)
            continue
        kind = spec[0]
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)) \
                or kind is bool and not isinstance(value, bool):
            tree.expert("version.capability_type",
                        f"capability {path} should be a {kind.__name__}, "
                        f"got {json.dumps(value)}", start, length)
            continue
        tree.add(f"version.{path}", value, start, length, parent)
        problem = CAPABILITY_RANGES.get(path, lambda v: None)(value)
        if problem:
            tree.expert("version.capability_range", f"{path}={value}: {problem}", start, length)
        if path == "twin_socket.fd_index":
            ctx.purpose(value, "twin socket (server-to-client commands)")


def _flatten(obj: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for key, value in obj.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and any(p.startswith(path + ".") for p in CAPABILITIES):
            out.extend(_flatten(value, path + "."))
        else:
            out.append((path, value))
    return out


@request("DMA_MAP")
def _dma_map(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
    _, v = add_layer(tree, DmaMap, msg, off)
    expect_end(tree, msg, off + DmaMap.vfu_compiled.size, "DMA_MAP request")
    if "size" not in v:
        return ""
    if v["argsz"] != DmaMap.vfu_compiled.size:
        tree.expert("argsz.mismatch",
                    f"DMA_MAP argsz {v['argsz']}, the request struct is 32 bytes")
    if v["flags"] & ~0xF:
        tree.expert("dma_map.flags_unknown",
                    f"DMA_MAP flags {v['flags']:#x} has bits no implementation knows")
    elif v["flags"] & ~SPEC_DMA_MAP_FLAGS:
        tree.expert("dma_map.flags_extension",
                    f"DMA_MAP flags {v['flags']:#x}: MMAP/FILE_IO are libvfio-user extensions")
    end = v["address"] + v["size"]
    ctx.purpose(0, f"DMA memory for iova {v['address']:#x}-{end:#x} "
                   f"(file offset {v['offset']:#x})")
    if len(ctx.fds) > 1:
        tree.expert("fd.count", f"DMA_MAP carries {len(ctx.fds)} fds, at most 1 expected")
    prot = ("R" if v["flags"] & 1 else "") + ("W" if v["flags"] & 2 else "")
    return (f"iova={v['address']:#x} size={hex_size(v['size'])} prot={prot or '-'} "
            f"fd={fd_text(ctx)}" + (f" offset={v['offset']:#x}" if ctx.fds else ""))


bare("DMA_MAP", "reply")


@request("DMA_UNMAP")
@reply("DMA_UNMAP")
def _dma_unmap(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
    node, v = add_layer(tree, DmaUnmap, msg, off)
    if "size" not in v:
        return ""
    end = off + DmaUnmap.vfu_compiled.size
    info = f"iova={v['address']:#x} size={hex_size(v['size'])}"
    if v["flags"] & DMA_UNMAP_FLAGS["all"]:
        info += " ALL"
    if v["flags"] & DMA_UNMAP_FLAGS["get_dirty_bitmap"]:
        _, bm = add_layer(tree, DirtyBitmap, msg, end, node)
        end += DirtyBitmap.vfu_compiled.size
        if "size" in bm and len(msg) > end:
            add_bytes(tree, "dma_unmap.bitmap.data", msg, end, len(msg), node)
            if len(msg) - end != bm["size"]:
                tree.expert("dma_unmap.bitmap_size",
                            f"dirty bitmap has {len(msg) - end} bytes, header says {bm['size']}")
            end = len(msg)
        info += " +dirty bitmap"
    expect_end(tree, msg, end, "DMA_UNMAP")
    return info


@request("DEVICE_GET_INFO")
def _device_info_request(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
    _, v = add_layer(tree, DeviceInfo, msg, off)
    expect_end(tree, msg, off + DeviceInfo.vfu_compiled.size, "DEVICE_GET_INFO request")
    if "argsz" in v:
        check_request_argsz(tree, v["argsz"], DeviceInfo.vfu_compiled.size, "DEVICE_GET_INFO")
    return ""


@reply("DEVICE_GET_INFO")
def _device_info_reply(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
    _, v = add_layer(tree, DeviceInfo, msg, off)
    expect_end(tree, msg, off + DeviceInfo.vfu_compiled.size, "DEVICE_GET_INFO reply")
    if "num_irqs" not in v:
        return ""
    check_reply_argsz(tree, v["argsz"], len(msg) - off, "DEVICE_GET_INFO")
    return f"regions={v['num_regions']} irqs={v['num_irqs']} flags={v['flags']:#x}"


def region_name(index: int) -> str:
    return REGIONS.get(index, f"region {index}")


@request("DEVICE_GET_REGION_INFO")
def _region_info_request(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
    _, v = add_layer(tree, RegionInfo, msg, off)
    if "index" not in v:
        return ""
    check_request_argsz(tree, v["argsz"], RegionInfo.vfu_compiled.size, "DEVICE_GET_REGION_INFO")
    # libvfio-user's client sends an argsz-sized buffer: padding, not an error.
    return f"{region_name(v['index'])} argsz={v['argsz']}"


@reply("DEVICE_GET_REGION_INFO")
def _region_info_reply(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
    node, v = add_layer(tree, RegionInfo, msg, off)
    if "offset" not in v:
        return ""
    payload_len = len(msg) - off
    check_reply_argsz(tree, v["argsz"], payload_len, "DEVICE_GET_REGION_INFO")
    name = region_name(v["index"])
    info = f"{name} size={hex_size(v['size'])} flags={_flag_letters(v['flags'], REGION_FLAGS)}"
    end = off + RegionInfo.vfu_compiled.size
    if v["flags"] & REGION_FLAGS["caps"]:
        if not RegionInfo.vfu_compiled.size <= v["cap_offset"] <= v["argsz"]:
            tree.expert("interop.region_caps_offset",
                        f"CAPS with cap_offset {v['cap_offset']} outside "
                        f"[{RegionInfo.vfu_compiled.size}, {v['argsz']}]: QEMU fails with "
                        f"\"failed to get region {v['index']} info: Invalid argument\"")
        if v["argsz"] > payload_len:
            info += " (truncated, argsz=%d)" % v["argsz"]
        elif not v["cap_offset"]:
            tree.expert("region_info.caps_missing",
                        "CAPS flag set but cap_offset is 0: no capability chain")
        else:
            end = _region_caps(tree, msg, off, v["cap_offset"], node)
            info += " caps"
    if v["flags"] & REGION_FLAGS["mmap"]:
        ctx.purpose(0, f"mmap fd of region {name} (offset {v['offset']:#x})")
        if not ctx.fds and v["argsz"] <= payload_len:
            tree.expert("region_info.mmap_no_fd",
                        f"{name} is mmap-able but the reply carries no fd")
    if len(ctx.fds) > 1:
        tree.expert("region_info.fd_per_area",
                    f"{len(ctx.fds)} fds with one region: one per sparse area, "
                    "as some servers send (the spec says 1)")
        for i in range(1, len(ctx.fds)):
            ctx.purpose(i, f"mmap fd of region {name}, area {i}")
    expect_end(tree, msg, end, "DEVICE_GET_REGION_INFO reply")
    return info


def _flag_letters(flags: int, names: dict[str, int]) -> str:
    return "|".join(n.upper() for n, m in names.items() if flags & m) or "0"


def _region_caps(tree: Tree, msg: bytes, base: int, cap_offset: int,
                 parent: Item) -> int:
    """Walk the capability chain; offsets count from the region-info struct."""
    seen, end, offset = set(), base + RegionInfo.vfu_compiled.size, cap_offset
    while offset:
        if offset in seen or offset < RegionInfo.vfu_compiled.size:
            tree.expert("region_info.cap_loop",
                        f"capability chain points back to offset {offset}")
            break
        seen.add(offset)
        node, cap = add_layer(tree, RegionCap, msg, base + offset, parent)
        if "next" not in cap:
            break
        body = base + offset + RegionCap.vfu_compiled.size
        if cap["id"] == 1:
            end = max(end, _sparse_areas(tree, msg, body, node))
        elif cap["id"] == 2:
            add_layer(tree, RegionType, msg, body, node)
            end = max(end, body + RegionType.vfu_compiled.size)
        else:
            tree.expert("region_info.cap_unknown", f"unknown region capability {cap['id']}")
            end = max(end, body)
        offset = cap["next"]
    return min(end, len(msg))


def _sparse_areas(tree: Tree, msg: bytes, offset: int, parent: Item) -> int:
    _, sp = add_layer(tree, SparseMmap, msg, offset, parent)
    offset += SparseMmap.vfu_compiled.size
    count = sp.get("nr_areas", 0)
    room = max(len(msg) - offset, 0) // SparseArea.vfu_compiled.size
    if count > room:
        tree.expert("region_info.areas_short",
                    f"nr_areas is {count} but only {room} areas fit in the message")
        count = room
    for _ in range(count):
        add_layer(tree, SparseArea, msg, offset, parent)
        offset += SparseArea.vfu_compiled.size
    return offset


@request("DEVICE_GET_REGION_IO_FDS")
def _io_fds_request(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
    _, v = add_layer(tree, RegionIoFds, msg, off)
    expect_end(tree, msg, off + RegionIoFds.vfu_compiled.size, "DEVICE_GET_REGION_IO_FDS request")
    return region_name(v["index"]) if "index" in v else ""


@reply("DEVICE_GET_REGION_IO_FDS")
def _io_fds_reply(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
    node, v = add_layer(tree, RegionIoFds, msg, off)
    if "count" not in v:
        return ""
    start = off + RegionIoFds.vfu_compiled.size
    check_reply_argsz(tree, v["argsz"], len(msg) - off, "DEVICE_GET_REGION_IO_FDS")
    count, body = v["count"], len(msg) - start
    if count == 0:
        expect_end(tree, msg, start, "DEVICE_GET_REGION_IO_FDS reply")
        return f"{region_name(v['index'])} 0 sub-regions"
    entry = body // count if body % count == 0 else 0
    layout = {40: SubRegion, 48: ShadowSubRegion}.get(entry)
    if layout is None:
        tree.expert("region_io_fds.entry_size",
                    f"{body} bytes for {count} sub-regions: entries must be 40 or 48 bytes")
        layout = SubRegion
        count = min(count, body // SubRegion.vfu_compiled.size)
    elif entry == 48:
        tree.expert("interop.io_fds_48",
                    "48-byte sub-regions (libvfio-user's shadow ioeventfd layout), the spec has 40")
    offset = start
    for i in range(count):
        _, sub = add_layer(tree, layout, msg, offset, node)
        if "fd_index" in sub:
            kind = IO_FD_TYPES.get(sub["type"], f"type {sub['type']}").lower()
            ctx.purpose(sub["fd_index"], f"{kind} for {region_name(v['index'])} "
                                         f"offset {sub['offset']:#x} (sub-region {i})")
            if sub["fd_index"] >= len(ctx.fds):
                tree.expert("region_io_fds.fd_index",
                            f"sub-region {i} names fd {sub['fd_index']}, "
                            f"{len(ctx.fds)} fds were passed")
        offset += layout.vfu_compiled.size
    if not ctx.fds:
        tree.expert("fd.count", "REGION_IO_FDS reply carries no fd (at least 1 expected)")
    expect_end(tree, msg, offset, "DEVICE_GET_REGION_IO_FDS reply")
    return f"{region_name(v['index'])} {v['count']} sub-regions"


@request("DEVICE_GET_IRQ_INFO")
def _irq_info_request(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
    _, v = add_layer(tree, IrqInfo, msg, off)
    expect_end(tree, msg, off + IrqInfo.vfu_compiled.size, "DEVICE_GET_IRQ_INFO request")
    if "index" not in v:
        return ""
    check_request_argsz(tree, v["argsz"], IrqInfo.vfu_compiled.size, "DEVICE_GET_IRQ_INFO")
    return IRQS.get(v["index"], f"index {v['index']}")


@reply("DEVICE_GET_IRQ_INFO")
def _irq_info_reply(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
    _, v = add_layer(tree, IrqInfo, msg, off)
    expect_end(tree, msg, off + IrqInfo.vfu_compiled.size, "DEVICE_GET_IRQ_INFO reply")
    if "count" not in v:
        return ""
    check_reply_argsz(tree, v["argsz"], len(msg) - off, "DEVICE_GET_IRQ_INFO")
    return (f"{IRQS.get(v['index'], v['index'])} count={v['count']} "
            f"flags={_flag_letters(v['flags'], IRQ_INFO_FLAGS)}")


@request("DEVICE_SET_IRQS")
def _set_irqs(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
    node, v = add_layer(tree, SetIrqs, msg, off)
    if "count" not in v:
        return ""
    data = off + SetIrqs.vfu_compiled.size
    flags, count, start = v["flags"], v["count"], v["start"]
    kind, action = flags & SET_IRQS_DATA, flags & SET_IRQS_ACTION
    if kind not in (0x1, 0x2, 0x4) or action not in (0x8, 0x10, 0x20):
        tree.expert("set_irqs.flags",
                    f"flags {flags:#x}: exactly one data type and one action must be set")
    irq = IRQS.get(v["index"], f"index {v['index']}")
    if kind == SET_IRQS_FLAGS["data_bool"]:
        add_bytes(tree, "set_irqs.data", msg, data, len(msg), node)
        for i, b in enumerate(msg[data:data + count]):
            tree.add("set_irqs.bool", b, data + i, 1, node, text=f"vector {start + i}: {b}")
        if len(msg) - data != count:
            tree.expert("set_irqs.bool_count",
                        f"DATA_BOOL with count {count} carries {len(msg) - data} bytes")
    else:
        expect_end(tree, msg, data, "DEVICE_SET_IRQS request")
    if kind == SET_IRQS_FLAGS["data_eventfd"]:
        for i in range(len(ctx.fds)):
            ctx.purpose(i, f"eventfd of {irq} vector {start + i}")
        if ctx.fds and len(ctx.fds) != count:
            tree.expert("set_irqs.fd_count",
                        f"{len(ctx.fds)} eventfds for count {count}")
    elif ctx.fds:
        tree.expert("fd.count", f"{len(ctx.fds)} fds without DATA_EVENTFD")
    if v["argsz"] not in (SetIrqs.vfu_compiled.size, len(msg) - off):
        tree.expert("argsz.mismatch",
                    f"SET_IRQS argsz {v['argsz']}, request is {len(msg) - off} bytes")
    action_name = {0x8: "MASK", 0x10: "UNMASK", 0x20: "TRIGGER"}.get(action, "?")
    kind_name = {0x1: "none", 0x2: "bool", 0x4: "eventfd"}.get(kind, "?")
    return f"{irq} {action_name} start={start} count={count} data={kind_name}" + (
        f" fds={len(ctx.fds)}" if ctx.fds else "")


bare("DEVICE_SET_IRQS", "reply")


def _region_access(cls: type[Packet], with_data: bool) -> Dissector:
    prefix = cls.vfu_field.name

    def fn(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
        node, v = add_layer(tree, cls, msg, off)
        if "count" not in v:
            return ""
        data = off + cls.vfu_compiled.size
        if with_data:
            add_bytes(tree, f"{prefix}.data", msg, data, len(msg), node)
            if len(msg) - data != v["count"]:
                tree.expert(f"{prefix}.count",
                            f"count is {v['count']} but {len(msg) - data} data bytes follow")
        else:
            expect_end(tree, msg, data, cls.vfu_name)
        info = f"{region_name(v['region'])} offset={v['offset']:#x} count={v['count']}"
        if with_data and v["count"] <= 8 and len(msg) - data == v["count"]:
            info += f" data={_le_value(msg[data:])}"
        return info

    return fn


def _le_value(data: bytes) -> str:
    return f"{int.from_bytes(data, 'little'):#0{2 + 2 * len(data)}x}"


REQUESTS[CMD["REGION_READ"]] = _region_access(RegionRead, with_data=False)
REPLIES[CMD["REGION_READ"]] = _region_access(RegionRead, with_data=True)
REQUESTS[CMD["REGION_WRITE"]] = _region_access(RegionWrite, with_data=True)
REPLIES[CMD["REGION_WRITE"]] = _region_access(RegionWrite, with_data=False)


@request("REGION_WRITE_MULTI")
def _write_multi(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
    node, v = add_layer(tree, WriteMulti, msg, off)
    if "wr_cnt" not in v:
        return ""
    offset = off + WriteMulti.vfu_compiled.size
    size = WriteMultiEntry.vfu_compiled.size
    room = (len(msg) - offset) // size
    if v["wr_cnt"] != room or (len(msg) - offset) % size:
        tree.expert("write_multi.count",
                    f"wr_cnt is {v['wr_cnt']} but the payload holds {room} entries")
    for _ in range(min(v["wr_cnt"], room)):
        _, e = add_layer(tree, WriteMultiEntry, msg, offset, node)
        if e["count"] > 8:
            tree.expert("write_multi.entry_count",
                        f"entry count {e['count']} exceeds the 8-byte data field")
        offset += size
    expect_end(tree, msg, offset, "REGION_WRITE_MULTI request")
    return f"{v['wr_cnt']} writes"


@reply("REGION_WRITE_MULTI")
def _write_multi_reply(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
    _, v = add_layer(tree, WriteMulti, msg, off)
    expect_end(tree, msg, off + WriteMulti.vfu_compiled.size, "REGION_WRITE_MULTI reply")
    return f"{v['wr_cnt']} completed" if "wr_cnt" in v else ""


def _dma_access(spec: type[Packet], qemu: type[Packet], data_in_request: bool,
                data_in_reply: bool) -> tuple[Dissector, Dissector]:
    """DMA_READ/DMA_WRITE, decoding QEMU's layout where the bytes show it."""
    prefix = spec.vfu_field.name

    def body(tree: Tree, msg: bytes, off: int, layout: type[Packet],
             with_data: bool) -> dict[str, int]:
        node, v = add_layer(tree, layout, msg, off)
        data = off + layout.vfu_compiled.size
        if with_data and "count" in v:
            add_bytes(tree, f"{prefix}.data", msg, data, len(msg), node)
        else:
            expect_end(tree, msg, data, spec.vfu_name)
        return v

    def on_request(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
        v = body(tree, msg, off, spec, data_in_request)
        if data_in_request and "count" in v and len(msg) - off - 16 != v["count"]:
            tree.expert(f"{prefix}.count",
                        f"count is {v['count']} but {len(msg) - off - 16} data bytes follow")
        return f"addr={v.get('address', 0):#x} count={v.get('count', '?')}"

    def on_reply(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
        asked = _request_count(ctx.request)
        if not data_in_reply and len(msg) == off:
            tree.expert("interop.dma_write_bare_reply",
                        f"{spec.vfu_name} reply is the bare header (QEMU's layout); "
                        "the spec and libvfio-user expect address and count")
            return "bare reply (QEMU layout)"
        layout = spec
        if _looks_like_qemu(msg, off, asked, data_in_reply):
            layout = qemu
            tree.expert("interop.dma_qemu_layout",
                        f"{spec.vfu_name} reply in QEMU's layout (u32 count, data at offset 12), "
                        "not the spec's (u64 count, data at 16)")
        v = body(tree, msg, off, layout, data_in_reply)
        if data_in_reply and "count" in v:
            got = len(msg) - off - layout.vfu_compiled.size
            if layout is qemu:
                got -= 4  # QEMU pads 4 zero bytes after the data
            if got != v["count"]:
                tree.expert(f"{prefix}.count",
                            f"count is {v['count']} but {got} data bytes follow")
        if asked is not None and v.get("count") not in (None, asked):
            tree.expert(f"{prefix}.count_mismatch",
                        f"reply count {v['count']} differs from the request's {asked}")
        return f"addr={v.get('address', 0):#x} count={v.get('count', '?')}"

    return on_request, on_reply


def _request_count(req: bytes | None) -> int | None:
    if req is None or len(req) < HEADER_SIZE + 16:
        return None
    return struct.unpack_from("<Q", req, HEADER_SIZE + 8)[0]


def _looks_like_qemu(msg: bytes, off: int, asked: int | None, with_data: bool) -> bool:
    """Spec count is a u64 at 8; QEMU's is a u32 at 8 followed by data."""
    if not with_data or asked is None or len(msg) < off + 16:
        return False
    spec_count = struct.unpack_from("<Q", msg, off + 8)[0]
    qemu_count = struct.unpack_from("<I", msg, off + 8)[0]
    return spec_count != asked and qemu_count == asked


REQUESTS[CMD["DMA_READ"]], REPLIES[CMD["DMA_READ"]] = _dma_access(
    DmaRead, QemuDmaRead, data_in_request=False, data_in_reply=True)
REQUESTS[CMD["DMA_WRITE"]], REPLIES[CMD["DMA_WRITE"]] = _dma_access(
    DmaWrite, QemuDmaWrite, data_in_request=True, data_in_reply=False)

bare("DEVICE_RESET", "request")
bare("DEVICE_RESET", "reply")


@request("DEVICE_FEATURE")
@reply("DEVICE_FEATURE")
def _device_feature(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
    node, v = add_layer(tree, DeviceFeature, msg, off)
    if "flags" not in v:
        return ""
    flags = v["flags"]
    feature = flags & 0xFFFF
    ops = [n for n, bit in (("GET", FEATURE_GET), ("SET", FEATURE_SET),
                            ("PROBE", FEATURE_PROBE)) if flags & bit]
    if flags & FEATURE_GET and flags & FEATURE_SET and not flags & FEATURE_PROBE:
        tree.expert("device_feature.get_and_set",
                    "GET and SET together are only allowed with PROBE")
    if feature not in FEATURES:
        tree.expert("device_feature.unknown", f"unknown feature {feature}")
    data = off + DeviceFeature.vfu_compiled.size
    is_reply = ctx.direction == "s2c"
    if is_reply:
        check_reply_argsz(tree, v["argsz"], len(msg) - off, "DEVICE_FEATURE")
    info = f"{'|'.join(ops) or 'no-op'} {FEATURES.get(feature, f'feature {feature}')}"
    if len(msg) > data:
        info += _feature_data(tree, msg, data, feature, node)
    return info


def _feature_data(tree: Tree, msg: bytes, offset: int, feature: int,
                  parent: Item) -> str:
    if feature == 1:
        _, f = add_layer(tree, MigrationFeature, msg, offset, parent)
        expect_end(tree, msg, offset + MigrationFeature.vfu_compiled.size, "MIGRATION feature")
        return f" flags={_flag_letters(f.get('flags', 0), MIGRATION_FLAGS)}"
    if feature == 2:
        _, f = add_layer(tree, MigDeviceState, msg, offset, parent)
        expect_end(tree, msg, offset + MigDeviceState.vfu_compiled.size, "MIG_DEVICE_STATE")
        state = f.get("device_state")
        return f" state={MIG_STATES.get(state, state)}"
    if feature in (6, 7):
        node, f = add_layer(tree, DmaLogging, msg, offset, parent)
        offset += DmaLogging.vfu_compiled.size
        count = f.get("num_ranges", 0)
        room = max(len(msg) - offset, 0) // DmaLoggingRange.vfu_compiled.size
        if count > room:
            tree.expert("dma_logging.ranges_short",
                        f"num_ranges is {count} but {room} ranges fit")
        for _ in range(min(count, room)):
            add_layer(tree, DmaLoggingRange, msg, offset, node)
            offset += DmaLoggingRange.vfu_compiled.size
        expect_end(tree, msg, offset, "DMA logging")
        return f" page_size={f.get('page_size', 0):#x} ranges={count or 'all'}"
    if feature == 8:
        node, f = add_layer(tree, DmaLoggingReport, msg, offset, parent)
        bitmap = offset + DmaLoggingReport.vfu_compiled.size
        if len(msg) > bitmap:
            add_bytes(tree, "dma_logging_report.bitmap", msg, bitmap, len(msg), node)
            if f["page_size"]:
                want = bitmap_bytes(f["length"], f["page_size"])
                if len(msg) - bitmap != want:
                    tree.expert("dma_logging.bitmap_size",
                                f"bitmap is {len(msg) - bitmap} bytes; "
                                f"{f['length']:#x} bytes of {f['page_size']:#x}-byte pages need {want}")
        return f" iova={f.get('iova', 0):#x} length={f.get('length', 0):#x}"
    add_bytes(tree, "device_feature.data", msg, offset, len(msg), parent)
    return ""


def bitmap_bytes(length: int, page: int) -> int:
    """Size of a dirty bitmap: one bit per page, in whole u64 words."""
    pages = -(-length // page)
    return -(-pages // 64) * 8


def _mig_data(cls: type[Packet], with_data: bool, is_reply: bool) -> Dissector:
    prefix = cls.vfu_field.name

    def fn(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
        node, v = add_layer(tree, cls, msg, off)
        if "size" not in v:
            return ""
        data = off + cls.vfu_compiled.size
        if with_data:
            _mig_payload(tree, msg, data, v["size"], prefix, node)
        else:
            expect_end(tree, msg, data, cls.vfu_name)
        if is_reply:
            used = min(len(msg) - off, cls.vfu_compiled.size + v["size"])
            check_reply_argsz(tree, v["argsz"], used, cls.vfu_name)
            asked = _mig_request_size(ctx.request)
            if asked is not None and v["size"] < asked:
                return f"size={v['size']} (end of stream: {asked} asked)"
        return f"size={v['size']}"

    return fn


def _mig_payload(tree: Tree, msg: bytes, data: int, size: int, prefix: str,
                 node: Item) -> None:
    end = data + size
    add_bytes(tree, f"{prefix}.data", msg, data, min(end, len(msg)), node)
    if len(msg) < end:
        tree.expert(f"{prefix}.size",
                    f"size is {size} but {len(msg) - data} data bytes follow")
    elif len(msg) > end:
        # libvfio-user sends its whole buffer with the last, short chunk.
        add_bytes(tree, "vfio_user.trailing", msg, end, len(msg), node)
        tree.expert("interop.mig_data_padding",
                    f"{len(msg) - end} padding bytes after the {size} data bytes", end,
                    len(msg) - end)


def _mig_request_size(req: bytes | None) -> int | None:
    if req is None or len(req) < HEADER_SIZE + 8:
        return None
    return struct.unpack_from("<I", req, HEADER_SIZE + 4)[0]


REQUESTS[CMD["MIG_DATA_READ"]] = _mig_data(MigDataRead, with_data=False, is_reply=False)
REPLIES[CMD["MIG_DATA_READ"]] = _mig_data(MigDataRead, with_data=True, is_reply=True)
REQUESTS[CMD["MIG_DATA_WRITE"]] = _mig_data(MigDataWrite, with_data=True, is_reply=False)
bare("MIG_DATA_WRITE", "reply")


# --- the message ------------------------------------------------------------------

field("fd", "File descriptor", "protocol")
field("fd.index", "Index")
field("fd.kind", "Kind", STRING)
field("fd.size", "Size", base="hex")
field("fd.inode", "Inode")
field("fd.purpose", "Purpose", STRING)


@dataclass(slots=True)
class HeaderInfo:
    msg_id: int
    cmd: int
    size: int
    flags: int
    error: int

    @property
    def type(self) -> int:
        return self.flags & FLAG_TYPE_MASK

    @property
    def is_reply(self) -> bool:
        return self.type == TYPE_REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & FLAG_NO_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & FLAG_ERROR)

    @property
    def kind(self) -> str:
        """command / reply / error, as the summary line shows it."""
        if self.is_error and self.is_reply:
            return "error"
        return MSG_TYPES.get(self.type, "invalid")

    @property
    def command_name(self) -> str:
        return COMMANDS.get(self.cmd, f"CMD_{self.cmd}")


_HEADER = Header.vfu_compiled.struct


def parse_header(msg: bytes) -> HeaderInfo | None:
    """The header's fields, or None when the message is shorter than a header."""
    if len(msg) < HEADER_SIZE:
        return None
    return HeaderInfo(*_HEADER.unpack_from(msg))


def dissect_message(msg: bytes, ctx: Context) -> tuple[Tree, HeaderInfo | None]:
    """Dissect one whole message; never raises on bad input."""
    tree = Tree()
    node, _ = add_layer(tree, Header, msg, 0)
    header = parse_header(msg)
    if header is None:
        tree.info = f"short message ({len(msg)} bytes)"
        return tree, None
    if not header.is_error:
        # `vfio_user.error` is present only on error replies, so that it can be
        # tested for presence as in Wireshark.
        node.children[-1].field = RESERVED_ERROR
    _header_checks(tree, header, len(msg))
    table = REPLIES if header.is_reply else REQUESTS
    fn = table.get(header.cmd)
    if header.is_error and header.is_reply:
        expect_empty(tree, msg, "error reply")
        tree.info = ERRNO_NAMES.get(header.error, f"errno {header.error}")
    elif fn is None or header.type not in MSG_TYPES:
        if len(msg) > HEADER_SIZE:
            add_bytes(tree, "vfio_user.payload", msg, HEADER_SIZE, len(msg))
        tree.info = f"{len(msg) - HEADER_SIZE} payload bytes not decoded"
    else:
        try:
            tree.info = fn(tree, msg, ctx, HEADER_SIZE)
        except (struct.error, KeyError, ValueError, IndexError) as exc:
            # A dissector bug must not stop the capture: flag it and go on.
            tree.expert("dissector.bug",
                        f"dissector failed: {type(exc).__name__}: {exc}")
    _fd_items(tree, ctx)
    return tree, header


def _header_checks(tree: Tree, h: HeaderInfo, length: int) -> None:
    if h.size != length:
        tree.expert("header.size",
                    f"msg_size is {h.size} but the message has {length} bytes", 4, 4)
    if h.type not in MSG_TYPES:
        tree.expert("header.type", f"invalid message type {h.type}", 8, 4)
    if h.cmd not in COMMANDS:
        tree.expert("header.unknown_command", f"unknown command {h.cmd}", 2, 2)
    elif h.cmd in OBSOLETE_COMMANDS:
        tree.expert("header.obsolete_command",
                    f"command {h.cmd} ({COMMANDS[h.cmd]}) is not in the current spec", 2, 2)
    if h.is_error and not h.is_reply:
        tree.expert("header.error_in_command",
                    "ERROR flag set on a message whose type says command", 8, 4)
    if h.no_reply and h.is_reply:
        tree.expert("header.no_reply_in_reply", "NO_REPLY flag set on a reply", 8, 4)
    if h.flags & ~(FLAG_TYPE_MASK | FLAG_NO_REPLY | FLAG_ERROR):
        tree.expert("header.flags_unknown", f"unknown flag bits in {h.flags:#x}", 8, 4)
    if h.is_error and h.is_reply and h.error == 0:
        tree.expert("header.errno_zero", "error reply with errno 0", 12, 4)
    if h.error and not h.is_error:
        tree.expert("header.error_reserved",
                    f"error field {h.error} set without the ERROR flag", 12, 4)


def _fd_items(tree: Tree, ctx: Context) -> None:
    for i, meta in enumerate(ctx.fds):
        node = tree.add("fd", None, text=f"fd {i}: {meta.get('kind', '?')}")
        tree.add("fd.index", i, parent=node)
        for key in ("kind", "size", "inode"):
            if meta.get(key) is not None:
                tree.add(f"fd.{key}", meta[key], parent=node)
        purpose = ctx.fd_purposes.get(i)
        if purpose:
            tree.add("fd.purpose", purpose, parent=node)
            node.text += f", {purpose}"


# --- what the layers say about the protocol -------------------------------------------

def layers() -> list[type[Packet]]:
    """The protocol's layers, in declaration order."""
    return [cls for cls in globals().values() if isinstance(cls, type)
            and issubclass(cls, Packet) and "vfu_compiled" in vars(cls)]


@functools.cache
def _layer_commands() -> dict[str, frozenset[int]]:
    out: dict[str, frozenset[int]] = {}
    for cls in layers():
        command = getattr(cls, "vfu_command", cls.vfu_name)
        if "." not in cls.vfu_field.name and command in CMD:
            out[cls.vfu_field.name] = frozenset({CMD[command]})
    return out


def member_widths() -> dict[str, int]:
    """Bytes of each fixed-width layer member; the widest where layouts differ
    (QEMU's DMA)."""
    widths: dict[str, int] = {}
    for cls in layers():
        for fd, _, size in cls.vfu_compiled.fields:
            widths[fd.name] = max(size, widths.get(fd.name, 0))
    return widths


def protocol_fields() -> list[FieldDef]:
    """Registry entries a message's own bytes give (not frames, fds or devices)."""
    prefixes = {cls.vfu_field.name.split(".")[0] for cls in layers()}
    return [fd for fd in all_fields()
            if fd.name.split(".")[0] in prefixes and fd.name != "vfio_user"]


def field_commands(name: str) -> frozenset[int] | None:
    """The commands whose messages can carry field `name`; None when any can
    (header, payload, trailing bytes) or the field is not this protocol's."""
    return _layer_commands().get(name.split(".", 1)[0])
