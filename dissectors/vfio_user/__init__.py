"""vfio-user protocol dissector (QEMU docs/interop/vfio-user.rst).

The layers below are the one declaration of the wire format: scapy builds
messages from them, `FIELDS.layer` declares their fields under their filter
names (`registry.load()` registers them) and compiles them for decoding.  Each command then has a request and a
reply dissector that walks its variable parts and flags what is wrong.

All integers are little-endian; every struct is packed.
"""

from __future__ import annotations

import functools
import json
import struct
from types import ModuleType
from typing import Any

from scapy.fields import StrField
from scapy.packet import Packet

from vfu_inspect.fields import (
    BOOL, BYTES, FLOAT, FRAME, STRING, UINT, FieldDef, Fields, bits32, bits64, raw, u16, u32, u64)
from vfu_inspect.tree import Tree

from .core import (
    FACTS, LVU, SPEC, Context, Dissector, Dissectors, add_bytes, add_layer, check_range,
    check_reply_argsz, check_request_argsz, check_zero, expect_end, fd_text,
    fitting, flag_letters, hex_size)
from .protocol import *  # noqa: F401,F403  (moved there; split next)
from . import header
from . import device
from .device import DeviceInfo
from . import dma
from .dma import (
    QEMU_DMA_SIGNS, DirtyBitmap, DmaMap, DmaRead, DmaUnmap, DmaWrite, QemuDmaRead, QemuDmaWrite,
    bitmap_bytes)
from . import version
from .version import Version
from .header import (
    CLIENT_COMMANDS, FD_CARRIERS, RESERVED, Header, HeaderInfo, fd_items, header_checks,
    parse_header)
from .state import SessionRules


# --- expert infos -------------------------------------------------------------
# Every check, once: id, severity, what triggers it, where the rule comes from
# and, for interop items, which implementation does what.  "spec" is QEMU's
# docs/interop/vfio-user.rst, by section; a rule that is not the spec's says
# whose it is, and is a note unless the message also breaks the spec.

_CHECKS: list[tuple[str, ...]] = [
    # negotiation
    # DMA
    ("dma_logging.bitmap_size", "warning", "DMA_LOGGING_REPORT bitmap size disagrees with range and page size", f"{SPEC} § VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT"),
    ("dma_logging.bitmap_bits", "warning", "DMA_LOGGING_REPORT bitmap sets bits beyond the requested range", f"{SPEC} § VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT"),
    ("dma_logging.ranges_short", "error", "num_ranges exceeds the ranges sent", f"{SPEC} § VFIO_DEVICE_FEATURE_DMA_LOGGING_START"),
    ("dma_logging.page_size", "warning", "DMA logging page size zero, or a REPORT page size not a power of two", f"{SPEC} § VFIO_DEVICE_FEATURE_DMA_LOGGING_START / _REPORT"),
    ("dma_logging.unaligned", "note", "DMA logging range or report not aligned to its page size", f"{LVU} (the spec sets no alignment)",
     "libvfio-user refuses it (EINVAL, ENOTSUP)"),
    ("dma_logging.unmapped", "note", "DMA_LOGGING_REPORT of a range no live DMA map with an fd holds", f"{LVU} (the spec sets no such rule)",
     "libvfio-user logs only the memory it maps, and refuses other ranges (EINVAL, ENOENT)"),
    # the device, regions and IRQs
    ("region_info.caps_missing", "warning", "CAPS flag with no capability chain", f"{SPEC} § VFIO_USER_DEVICE_GET_REGION_INFO"),
    ("region_info.mmap_no_fd", "warning", "MMAP region whose reply carries no fd", f"{SPEC} § VFIO_USER_DEVICE_GET_REGION_INFO"),
    ("region_info.fd_per_area", "note", "one fd per sparse area instead of one per region", f"{FACTS} § 3"),
    ("region_info.cap_loop", "error", "region capability chain loops", f"{SPEC} § VFIO_USER_DEVICE_GET_REGION_INFO"),
    ("region_info.cap_unknown", "note", "unknown region capability id", f"{SPEC} § VFIO_USER_DEVICE_GET_REGION_INFO"),
    ("region_info.cap_version", "warning", "SPARSE_MMAP capability whose version is not 1", f"{SPEC} § VFIO_USER_DEVICE_GET_REGION_INFO (sparse mmap cap header)"),
    ("region_info.areas_short", "error", "nr_areas exceeds the areas sent", f"{SPEC} § VFIO_USER_DEVICE_GET_REGION_INFO"),
    ("region_io_fds.entry_size", "error", "IO_FDS sub-regions do not divide into count entries of at least 40 bytes", f"{SPEC} § VFIO_USER_DEVICE_GET_REGION_IO_FDS"),
    ("region_io_fds.fd_index", "error", "sub-region names an fd that was not passed", f"{SPEC} § VFIO_USER_DEVICE_GET_REGION_IO_FDS"),
    ("region_io_fds.posted_writes", "warning", "zero-size ioregionfd sub-region without KVM_IOREGION_POSTED_WRITES", f"{SPEC} § VFIO_USER_DEVICE_GET_REGION_IO_FDS (ioregionfd)"),
    ("region.unknown", "warning", "access to a region index the device did not report", f"{SPEC} § VFIO_USER_DEVICE_GET_INFO"),
    ("region.out_of_bounds", "warning", "region access beyond the region's size", f"{SPEC} § VFIO_USER_REGION_READ"),
    ("region.access_flags", "warning", "region access against its READ/WRITE flags", f"{SPEC} § VFIO_USER_DEVICE_GET_REGION_INFO"),
    ("region_read.count", "error", "REGION_READ count disagrees with the data", f"{SPEC} § VFIO_USER_REGION_READ"),
    ("region_write.count", "error", "REGION_WRITE count disagrees with the data", f"{SPEC} § VFIO_USER_REGION_WRITE"),
    ("write_multi.count", "error", "wr_cnt exceeds the entries sent", f"{SPEC} § VFIO_USER_REGION_WRITE_MULTI"),
    ("write_multi.entry_count", "error", "write entry count over 8 bytes", f"{SPEC} § VFIO_USER_REGION_WRITE_MULTI"),
    ("write_multi.not_negotiated", "warning", "REGION_WRITE_MULTI to a server that did not state write_multiple", f"{SPEC} § VFIO_USER_VERSION"),
    ("set_irqs.flags", "error", "SET_IRQS needs exactly one data type and one action", f"{SPEC} § VFIO_USER_DEVICE_SET_IRQS"),
    ("set_irqs.bool_count", "error", "DATA_BOOL bytes disagree with count", f"{SPEC} § VFIO_USER_DEVICE_SET_IRQS"),
    ("set_irqs.fd_count", "warning", "eventfd count disagrees with count", f"{SPEC} § VFIO_USER_DEVICE_SET_IRQS"),
    ("set_irqs.count_zero", "note", "SET_IRQS count 0 other than start 0 with DATA_NONE|TRIGGER", f"{SPEC} § VFIO_USER_DEVICE_SET_IRQS",
     "the spec's disable-all case names DATA_NONE and no action; libvfio-user and Linux VFIO accept it only with TRIGGER and refuse the others (EINVAL)"),
    ("irq.unknown", "warning", "SET_IRQS or GET_IRQ_INFO of an index beyond the device's num_irqs", f"{SPEC} § VFIO_USER_DEVICE_GET_INFO"),
    ("irq.out_of_range", "warning", "SET_IRQS beyond the index's count", f"{SPEC} § VFIO_USER_DEVICE_SET_IRQS"),
    ("irq.action_unsupported", "warning", "SET_IRQS MASK/UNMASK on an index without MASKABLE, or eventfds for one without EVENTFD", f"{SPEC} § VFIO_USER_DEVICE_GET_IRQ_INFO; § VFIO_USER_DEVICE_SET_IRQS"),
    # server commands and interop
    ("interop.region_caps_offset", "note", "REGION_INFO CAPS with cap_offset outside [32, argsz] in a truncated reply", f"{FACTS} peers: QEMU 10.2.2",
     "Linux VFIO keeps CAPS with cap_offset 0 when it truncates; QEMU 10.2.2 fails (\"failed to get region N info: Invalid argument\"); libvfio-user sets CAPS only when the capabilities fit"),
    ("interop.io_fds_48", "note", "48-byte IO_FDS entries (libvfio-user's shadow ioeventfd)", f"{FACTS} § 6 IO_FDS",
     "libvfio-user inserts shadow_offset (type 2); the spec's entries are 40 bytes"),
    ("interop.mig_data_padding", "note", "short MIG_DATA_READ reply padded to the buffer", f"{FACTS} § 17/18",
     "libvfio-user sends its whole buffer with the last, short chunk"),
    ("interop.irq_mask_eventfd", "note", "SET_IRQS MASK/UNMASK with eventfds", f"{SPEC} § VFIO_USER_DEVICE_SET_IRQS; {FACTS} § 8",
     "libvfio-user closes them (\"closing unexpected fd\") and replies success: no mask event is ever signalled; QEMU 10.2.2 sends its INTx resample fd so"),
    # features and migration
    ("device_feature.get_and_set", "error", "GET and SET together without PROBE", f"{SPEC} § VFIO_USER_DEVICE_FEATURE"),
    ("device_feature.unknown", "note", "device feature the spec does not list", f"{SPEC} § VFIO_USER_DEVICE_FEATURE (Device Features)"),
    ("device_feature.op_undefined", "warning", "GET or SET of a feature that defines no such operation (SET MIGRATION, GET DMA_LOGGING_START ...)", f"{SPEC} § VFIO_USER_DEVICE_FEATURE (Device Features)"),
    ("device_feature.probe_undefined", "note", "PROBE of an operation the feature does not define: the probe must fail", f"{SPEC} § VFIO_USER_DEVICE_FEATURE"),
    ("migration.flags", "warning", "MIGRATION feature without VFIO_MIGRATION_STOP_COPY", f"{SPEC} § VFIO_DEVICE_FEATURE_MIGRATION"),
    ("migration.transition", "warning", "device-state transition the state machine forbids", f"{SPEC} § VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE"),
    ("migration.data_state", "warning", "MIG_DATA_READ/WRITE in a state that allows none", f"{SPEC} § VFIO_USER_MIG_DATA_READ"),
    ("mig_data_read.size", "error", "MIG_DATA_READ size disagrees with the data", f"{SPEC} § VFIO_USER_MIG_DATA_READ"),
    ("mig_data_write.size", "error", "MIG_DATA_WRITE size disagrees with the data", f"{SPEC} § VFIO_USER_MIG_DATA_WRITE"),
]


# --- layers -------------------------------------------------------------------

_FIELDS = Fields()

@_FIELDS.layer("region_info")
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


@_FIELDS.layer("region_info.cap")
class RegionCap(Packet):
    name = "Region capability"
    fields_desc = [u16("id", values=REGION_CAPS), u16("version", 1),
                   u32("next", base="hex", label="Next capability")]


@_FIELDS.layer("region_info.sparse")
class SparseMmap(Packet):
    name = "Sparse mmap areas"
    fields_desc = [u32("nr_areas", label="Number of areas"), u32("reserved")]


@_FIELDS.layer("region_info.area")
class SparseArea(Packet):
    name = "mmap area"
    fields_desc = [u64("offset", base="hex"), u64("size", base="hex")]


@_FIELDS.layer("region_info.type")
class RegionType(Packet):
    name = "Region type"
    fields_desc = [u32("type", base="hex"), u32("subtype", base="hex")]


@_FIELDS.layer("region_io_fds")
class RegionIoFds(Packet):
    name = "DEVICE_GET_REGION_IO_FDS"
    fields_desc = [u32("argsz", 16), u32("flags", base="hex"),
                   u32("index", values=REGIONS, label="Region"), u32("count")]


@_FIELDS.layer("region_io_fds.sub")
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


@_FIELDS.layer("region_io_fds.sub")
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


@_FIELDS.layer("irq_info")
class IrqInfo(Packet):
    name = "DEVICE_GET_IRQ_INFO"
    fields_desc = [u32("argsz", 16), bits32("flags", IRQ_INFO_FLAGS),
                   u32("index", values=IRQS, label="IRQ index"), u32("count")]


@_FIELDS.layer("set_irqs")
class SetIrqs(Packet):
    name = "DEVICE_SET_IRQS"
    fields_desc = [u32("argsz", 20), bits32("flags", SET_IRQS_FLAGS),
                   u32("index", values=IRQS, label="IRQ index"),
                   u32("start"), u32("count"), StrField("data", b"")]


class RegionAccess(Packet):
    fields_desc = [u64("offset", base="hex"),
                   u32("region", values=REGIONS), u32("count"),
                   StrField("data", b"")]


@_FIELDS.layer("region_read")
class RegionRead(RegionAccess):
    name = "REGION_READ"


@_FIELDS.layer("region_write")
class RegionWrite(RegionAccess):
    name = "REGION_WRITE"


@_FIELDS.layer("write_multi")
class WriteMulti(Packet):
    name = "REGION_WRITE_MULTI"
    fields_desc = [u64("wr_cnt", label="Write count")]


@_FIELDS.layer("write_multi.entry")
class WriteMultiEntry(Packet):
    name = "Write"
    fields_desc = [u64("offset", base="hex"), u32("region", values=REGIONS),
                   u32("count"), raw("data", 8)]


@_FIELDS.layer("device_feature")
class DeviceFeature(Packet):
    name = "DEVICE_FEATURE"
    fields_desc = [u32("argsz", 8), bits32("flags", FEATURE_FLAGS),
                   StrField("data", b"")]


@_FIELDS.layer("migration")
class MigrationFeature(Packet):
    name = "Migration feature"
    vfu_command = "DEVICE_FEATURE"      # a payload of that command
    fields_desc = [bits64("flags", MIGRATION_FLAGS)]


@_FIELDS.layer("mig_state")
class MigDeviceState(Packet):
    name = "Device state"
    vfu_command = "DEVICE_FEATURE"      # a payload of that command
    fields_desc = [u32("device_state", values=MIG_STATES, label="Device state"),
                   u32("data_fd", base="hex", label="Data fd (unused)")]


@_FIELDS.layer("dma_logging")
class DmaLogging(Packet):
    name = "DMA logging"
    vfu_command = "DEVICE_FEATURE"      # a payload of that command
    fields_desc = [u64("page_size", base="hex"),
                   u32("num_ranges", label="Number of ranges"), u32("reserved")]


@_FIELDS.layer("dma_logging.range")
class DmaLoggingRange(Packet):
    name = "Range"
    fields_desc = [u64("iova", base="hex", label="IOVA"), u64("length", base="hex")]


@_FIELDS.layer("dma_logging_report")
class DmaLoggingReport(Packet):
    name = "DMA logging report"
    vfu_command = "DEVICE_FEATURE"      # a payload of that command
    fields_desc = [u64("iova", base="hex", label="IOVA"), u64("length", base="hex"),
                   u64("page_size", base="hex"), StrField("bitmap", b"")]


class MigData(Packet):
    fields_desc = [u32("argsz", 8), u32("size"), StrField("data", b"")]


@_FIELDS.layer("mig_data_read")
class MigDataRead(MigData):
    name = "MIG_DATA_READ"


@_FIELDS.layer("mig_data_write")
class MigDataWrite(MigData):
    name = "MIG_DATA_WRITE"


# Fields that are not a fixed part of a layer.
for _name, _label, _type in [
    ("set_irqs.data", "Data", BYTES),
    ("set_irqs.bool", "Bool", UINT),
    ("region_read.data", "Data", BYTES),
    ("region_write.data", "Data", BYTES),
    ("device_feature.data", "Feature data", BYTES),
    ("dma_logging_report.bitmap", "Dirty bitmap", BYTES),
    ("mig_data_read.data", "Data", BYTES),
    ("mig_data_write.data", "Data", BYTES),
]:
    _FIELDS.field(_name, _label, _type)


# --- per-command dissectors ------------------------------------------------------

DISSECTORS = Dissectors()


@DISSECTORS.request("DEVICE_GET_REGION_INFO")
def _region_info_request(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
    _, v = add_layer(tree, RegionInfo, msg, off)
    if "index" not in v:
        return ""
    check_request_argsz(tree, v["argsz"], RegionInfo.vfu_compiled.size, "DEVICE_GET_REGION_INFO")
    check_zero(tree, v, ("flags", "cap_offset", "size", "offset"), "DEVICE_GET_REGION_INFO request")
    # libvfio-user's client sends an argsz-sized buffer: padding, not an error.
    return f"{region_name(v['index'])} argsz={v['argsz']}"


@DISSECTORS.reply("DEVICE_GET_REGION_INFO")
def _region_info_reply(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
    node, v = add_layer(tree, RegionInfo, msg, off)
    if "offset" not in v:
        return ""
    payload_len = len(msg) - off
    check_reply_argsz(tree, v["argsz"], payload_len, "DEVICE_GET_REGION_INFO")
    name = region_name(v["index"])
    info = f"{name} size={hex_size(v['size'])} flags={flag_letters(v['flags'], REGION_FLAGS)}"
    end = off + RegionInfo.vfu_compiled.size
    if v["flags"] & REGION_FLAGS["caps"]:
        if v["argsz"] > payload_len:
            info += " (truncated, argsz=%d)" % v["argsz"]
            if not RegionInfo.vfu_compiled.size <= v["cap_offset"] <= v["argsz"]:
                tree.expert("interop.region_caps_offset",
                            f"CAPS with cap_offset {v['cap_offset']} outside "
                            f"[{RegionInfo.vfu_compiled.size}, {v['argsz']}]: QEMU fails with "
                            f"\"failed to get region {v['index']} info: Invalid argument\"")
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


def _region_caps(tree: Tree, msg: bytes, base: int, cap_offset: int,
                 parent: int) -> int:
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
            if cap["version"] != 1:
                tree.expert("region_info.cap_version",
                            f"SPARSE_MMAP capability version {cap['version']}, the spec's is 1")
            end = max(end, _sparse_areas(tree, msg, body, node))
        elif cap["id"] == 2:
            add_layer(tree, RegionType, msg, body, node)
            end = max(end, body + RegionType.vfu_compiled.size)
        else:
            tree.expert("region_info.cap_unknown", f"unknown region capability {cap['id']}")
            end = max(end, body)
        offset = cap["next"]
    return min(end, len(msg))


def _sparse_areas(tree: Tree, msg: bytes, offset: int, parent: int) -> int:
    _, sp = add_layer(tree, SparseMmap, msg, offset, parent)
    offset += SparseMmap.vfu_compiled.size
    count = fitting(tree, sp.get("nr_areas", 0), msg, offset, SparseArea,
                    "region_info.areas_short", "nr_areas")
    for _ in range(count):
        add_layer(tree, SparseArea, msg, offset, parent)
        offset += SparseArea.vfu_compiled.size
    return offset


@DISSECTORS.request("DEVICE_GET_REGION_IO_FDS")
def _io_fds_request(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
    _, v = add_layer(tree, RegionIoFds, msg, off)
    expect_end(tree, msg, off + RegionIoFds.vfu_compiled.size, "DEVICE_GET_REGION_IO_FDS request")
    if "count" not in v:
        return ""
    check_request_argsz(tree, v["argsz"], RegionIoFds.vfu_compiled.size,
                        "DEVICE_GET_REGION_IO_FDS")
    check_zero(tree, v, ("flags", "count"), "DEVICE_GET_REGION_IO_FDS request")
    return region_name(v["index"])


@DISSECTORS.reply("DEVICE_GET_REGION_IO_FDS")
def _io_fds_reply(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
    node, v = add_layer(tree, RegionIoFds, msg, off)
    if "count" not in v:
        return ""
    start, header = off + RegionIoFds.vfu_compiled.size, RegionIoFds.vfu_compiled.size
    check_reply_argsz(tree, v["argsz"], len(msg) - off, "DEVICE_GET_REGION_IO_FDS")
    check_zero(tree, v, ("flags",), "DEVICE_GET_REGION_IO_FDS reply")
    info = f"{region_name(v['index'])} {v['count']} sub-regions"
    # argsz and count say what the whole array needs; a truncated reply
    # carries only what fit (often none of it) and needs no fd.
    truncated = v["argsz"] > len(msg) - off
    array = max(v["argsz"] - header, len(msg) - start)
    if v["count"] == 0 or (truncated and len(msg) == start):
        expect_end(tree, msg, start, "DEVICE_GET_REGION_IO_FDS reply")
        return info
    entry = array // v["count"] if array % v["count"] == 0 else 0
    if entry < SubRegion.vfu_compiled.size:
        tree.expert("region_io_fds.entry_size", f"{array} bytes for {v['count']} sub-regions: "
                    f"not {v['count']} entries of at least {SubRegion.vfu_compiled.size} bytes")
        entry = SubRegion.vfu_compiled.size
    elif entry == ShadowSubRegion.vfu_compiled.size:
        tree.expert("interop.io_fds_48",
                    "48-byte sub-regions (libvfio-user's shadow ioeventfd layout), the spec has 40")
    offset = _sub_regions(tree, msg, start, entry, v, ctx, node, check_fds=not truncated)
    if not ctx.fds and not truncated:
        tree.expert("fd.count", "REGION_IO_FDS reply carries no fd (at least 1 expected)")
    expect_end(tree, msg, offset, "DEVICE_GET_REGION_IO_FDS reply")
    return info


KVM_IOREGION_POSTED_WRITES = 1 << 1         # linux/kvm.h of the ioregionfd series
IO_FD_TYPE = {name: number for number, name in IO_FD_TYPES.items()}


def _sub_regions(tree: Tree, msg: bytes, offset: int, entry: int, v: dict[str, int],
                 ctx: Context, parent: int, check_fds: bool) -> int:
    """Decode the entries present, `entry` bytes apart: the spec's 40-byte
    layout, libvfio-user's 48-byte one, or 40 known bytes and the rest."""
    layout = ShadowSubRegion if entry == ShadowSubRegion.vfu_compiled.size else SubRegion
    for i in range(min(v["count"], (len(msg) - offset) // entry)):
        _, sub = add_layer(tree, layout, msg, offset, parent)
        if entry > layout.vfu_compiled.size:
            add_bytes(tree, "vfio_user.trailing", msg, offset + layout.vfu_compiled.size,
                      offset + entry, parent)
        offset += entry
        kind = IO_FD_TYPES.get(sub["type"], f"type {sub['type']}").lower()
        ctx.purpose(sub["fd_index"], f"{kind} for {region_name(v['index'])} "
                                     f"offset {sub['offset']:#x} (sub-region {i})")
        if check_fds and sub["fd_index"] >= len(ctx.fds):
            tree.expert("region_io_fds.fd_index", f"sub-region {i} names fd {sub['fd_index']}, "
                        f"{len(ctx.fds)} fds were passed")
        if (sub["type"] == IO_FD_TYPE["IOREGIONFD"] and not sub["size"]
                and not sub["flags"] & KVM_IOREGION_POSTED_WRITES):
            tree.expert("region_io_fds.posted_writes", f"sub-region {i}: ioregionfd of size 0 "
                        "without KVM_IOREGION_POSTED_WRITES")
    return offset


@DISSECTORS.request("DEVICE_GET_IRQ_INFO")
def _irq_info_request(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
    _, v = add_layer(tree, IrqInfo, msg, off)
    expect_end(tree, msg, off + IrqInfo.vfu_compiled.size, "DEVICE_GET_IRQ_INFO request")
    if "index" not in v:
        return ""
    check_request_argsz(tree, v["argsz"], IrqInfo.vfu_compiled.size, "DEVICE_GET_IRQ_INFO")
    check_zero(tree, v, ("flags", "count"), "DEVICE_GET_IRQ_INFO request")
    return IRQS.get(v["index"], f"index {v['index']}")


@DISSECTORS.reply("DEVICE_GET_IRQ_INFO")
def _irq_info_reply(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
    _, v = add_layer(tree, IrqInfo, msg, off)
    expect_end(tree, msg, off + IrqInfo.vfu_compiled.size, "DEVICE_GET_IRQ_INFO reply")
    if "count" not in v:
        return ""
    check_reply_argsz(tree, v["argsz"], len(msg) - off, "DEVICE_GET_IRQ_INFO")
    return (f"{IRQS.get(v['index'], v['index'])} count={v['count']} "
            f"flags={flag_letters(v['flags'], IRQ_INFO_FLAGS)}")


@DISSECTORS.request("DEVICE_SET_IRQS")
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
    action_name = {0x8: "MASK", 0x10: "UNMASK", 0x20: "TRIGGER"}.get(action, "?")
    if kind == SET_IRQS_FLAGS["data_eventfd"]:
        for i in range(len(ctx.fds)):
            ctx.purpose(i, f"eventfd of {irq} vector {start + i}")
        if ctx.fds and len(ctx.fds) != count:
            tree.expert("set_irqs.fd_count",
                        f"{len(ctx.fds)} eventfds for count {count}")
        if ctx.fds and action != SET_IRQS_FLAGS["trigger"]:
            tree.expert("interop.irq_mask_eventfd", f"{action_name} with eventfds "
                        f"({len(ctx.fds)}): libvfio-user closes them and replies success")
    elif ctx.fds:
        tree.expert("fd.count", f"{len(ctx.fds)} fds without DATA_EVENTFD")
    if v["argsz"] != len(msg) - off:
        tree.expert("argsz.mismatch", f"SET_IRQS argsz {v['argsz']}, the request payload "
                    f"(data included) is {len(msg) - off} bytes")
    check_range(tree, start, count, 32, "SET_IRQS start+count")
    if count == 0 and (start or flags & (SET_IRQS_DATA | SET_IRQS_ACTION) != DISABLE_ALL):
        tree.expert("set_irqs.count_zero", f"count 0 with start {start}, {kind_name(kind)} "
                    f"{action_name}: libvfio-user and Linux VFIO take count 0 only as start 0 "
                    "DATA_NONE|TRIGGER (disable the index) and refuse the rest")
    return f"{irq} {action_name} start={start} count={count} data={kind_name(kind)}" + (
        f" fds={len(ctx.fds)}" if ctx.fds else "")


def kind_name(kind: int) -> str:
    return {0x1: "none", 0x2: "bool", 0x4: "eventfd"}.get(kind, "?")


DISABLE_ALL = SET_IRQS_FLAGS["data_none"] | SET_IRQS_FLAGS["trigger"]
DISSECTORS.bare("DEVICE_SET_IRQS", "reply")


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
        if ctx.direction == "c2s":
            check_range(tree, v["offset"], v["count"], 64, f"{cls.vfu_name} offset+count")
        info = f"{region_name(v['region'])} offset={v['offset']:#x} count={v['count']}"
        if with_data and v["count"] <= 8 and len(msg) - data == v["count"]:
            info += f" data={_le_value(msg[data:])}"
        return info

    return fn


def _le_value(data: bytes) -> str:
    return f"{int.from_bytes(data, 'little'):#0{2 + 2 * len(data)}x}"


DISSECTORS.requests[CMD["REGION_READ"]] = _region_access(RegionRead, with_data=False)
DISSECTORS.replies[CMD["REGION_READ"]] = _region_access(RegionRead, with_data=True)
DISSECTORS.requests[CMD["REGION_WRITE"]] = _region_access(RegionWrite, with_data=True)
DISSECTORS.replies[CMD["REGION_WRITE"]] = _region_access(RegionWrite, with_data=False)


@DISSECTORS.request("REGION_WRITE_MULTI")
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
        check_range(tree, e["offset"], e["count"], 64, "REGION_WRITE_MULTI entry offset+count")
        offset += size
    expect_end(tree, msg, offset, "REGION_WRITE_MULTI request")
    return f"{v['wr_cnt']} writes"


@DISSECTORS.reply("REGION_WRITE_MULTI")
def _write_multi_reply(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
    _, v = add_layer(tree, WriteMulti, msg, off)
    expect_end(tree, msg, off + WriteMulti.vfu_compiled.size, "REGION_WRITE_MULTI reply")
    return f"{v['wr_cnt']} completed" if "wr_cnt" in v else ""


# The operations each feature defines, and the layout of its data.
FEATURE_OPS = {1: FEATURE_GET, 2: FEATURE_GET | FEATURE_SET, 6: FEATURE_SET, 7: FEATURE_SET,
               8: FEATURE_GET}
FEATURE_OP_NAMES = {FEATURE_GET: "GET", FEATURE_SET: "SET", FEATURE_PROBE: "PROBE"}


@DISSECTORS.request("DEVICE_FEATURE")
@DISSECTORS.reply("DEVICE_FEATURE")
def _device_feature(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
    node, v = add_layer(tree, DeviceFeature, msg, off)
    if "flags" not in v:
        return ""
    flags = v["flags"]
    feature = flags & 0xFFFF
    ops = [name for bit, name in FEATURE_OP_NAMES.items() if flags & bit]
    if flags & FEATURE_GET and flags & FEATURE_SET and not flags & FEATURE_PROBE:
        tree.expert("device_feature.get_and_set",
                    "GET and SET together are only allowed with PROBE")
    if feature not in FEATURES:
        tree.expert("device_feature.unknown", f"unknown feature {feature}")
    data = off + DeviceFeature.vfu_compiled.size
    is_request = ctx.direction == "c2s"
    if is_request:
        _feature_operation(tree, flags, feature)
    else:
        check_reply_argsz(tree, v["argsz"], len(msg) - off, "DEVICE_FEATURE")
    info = f"{'|'.join(ops) or 'no-op'} {FEATURES.get(feature, f'feature {feature}')}"
    values: dict[str, int] = {}
    if len(msg) > data and is_request and feature == 1:
        expect_end(tree, msg, data, "MIGRATION request (it has no data)")
    elif len(msg) > data:
        text, values = _feature_data(tree, msg, data, feature, node, is_request)
        info += text
    if is_request and feature in FEATURES:
        _feature_argsz(tree, v, feature, len(msg) - off, values)
    elif flags & FEATURE_GET and feature == 1 and "flags" in values \
            and not values["flags"] & MIGRATION_FLAGS["stop_copy"]:
        tree.expert("migration.flags", f"MIGRATION flags {values['flags']:#x}: the spec "
                    "requires VFIO_MIGRATION_STOP_COPY")
    return info


def _feature_operation(tree: Tree, flags: int, feature: int) -> None:
    """GET and SET of what the feature defines; a PROBE of anything else must fail."""
    undefined = flags & (FEATURE_GET | FEATURE_SET) & ~FEATURE_OPS.get(feature, ~0)
    if not undefined:
        return
    names = "|".join(name for bit, name in FEATURE_OP_NAMES.items() if undefined & bit)
    if flags & FEATURE_PROBE:
        tree.expert("device_feature.probe_undefined", f"PROBE of {names} {FEATURES[feature]}, "
                    "which the feature does not define: the probe must fail")
    else:
        tree.expert("device_feature.op_undefined",
                    f"{names} of {FEATURES[feature]}, which defines no such operation")


def _feature_argsz(tree: Tree, v: dict[str, int], feature: int, payload: int,
                   data: dict[str, int]) -> None:
    """argsz must hold the reply: the request itself for SET and PROBE, the
    header and the feature's data for GET."""
    flags, what = v["flags"], f"DEVICE_FEATURE {FEATURES[feature]}"
    needed = payload
    if flags & FEATURE_GET and not flags & FEATURE_PROBE:
        needed = DeviceFeature.vfu_compiled.size + _get_reply_data(feature, data)
    if v["argsz"] < needed:
        tree.expert("argsz.small", f"{what} argsz {v['argsz']}: the reply needs {needed} bytes")


def _get_reply_data(feature: int, report: dict[str, int]) -> int:
    if feature == 8:
        size = DmaLoggingReport.vfu_compiled.size
        if _power_of_two(report.get("page_size", 0)):
            size += bitmap_bytes(report["length"], report["page_size"])
        return size
    return {1: MigrationFeature, 2: MigDeviceState}.get(feature, DeviceFeature).vfu_compiled.size


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _feature_data(tree: Tree, msg: bytes, offset: int, feature: int, parent: int,
                  is_request: bool) -> tuple[str, dict[str, int]]:
    if feature == 1:
        _, f = add_layer(tree, MigrationFeature, msg, offset, parent)
        expect_end(tree, msg, offset + MigrationFeature.vfu_compiled.size, "MIGRATION feature")
        return f" flags={flag_letters(f.get('flags', 0), MIGRATION_FLAGS)}", f
    if feature == 2:
        _, f = add_layer(tree, MigDeviceState, msg, offset, parent)
        expect_end(tree, msg, offset + MigDeviceState.vfu_compiled.size, "MIG_DEVICE_STATE")
        state = f.get("device_state")
        return f" state={MIG_STATES.get(state, state)}", f
    if feature in (6, 7):
        f = _logging_ranges(tree, msg, offset, parent, check=is_request and feature == 6)
        return f" page_size={f.get('page_size', 0):#x} ranges={f.get('num_ranges') or 'all'}", f
    if feature == 8:
        f = _logging_report(tree, msg, offset, parent, is_request)
        return f" iova={f.get('iova', 0):#x} length={f.get('length', 0):#x}", f
    add_bytes(tree, "device_feature.data", msg, offset, len(msg), parent)
    return "", {}


def _logging_ranges(tree: Tree, msg: bytes, offset: int, parent: int,
                    check: bool) -> dict[str, int]:
    """DMA_LOGGING_START/STOP data; `check` the page size and ranges of a START."""
    node, f = add_layer(tree, DmaLogging, msg, offset, parent)
    offset += DmaLogging.vfu_compiled.size
    page = f.get("page_size")
    count = fitting(tree, f.get("num_ranges", 0), msg, offset, DmaLoggingRange,
                    "dma_logging.ranges_short", "num_ranges")
    if check and page == 0:
        tree.expert("dma_logging.page_size", "DMA_LOGGING_START page size 0")
    for i in range(count):
        _, r = add_layer(tree, DmaLoggingRange, msg, offset, node)
        offset += DmaLoggingRange.vfu_compiled.size
        if check:
            what = f"DMA_LOGGING_START range {i}"
            check_range(tree, r["iova"], r["length"], 64, what)
            _check_logging_alignment(tree, r["iova"], r["length"], page, what)
    expect_end(tree, msg, offset, "DMA logging")
    return f


def _logging_report(tree: Tree, msg: bytes, offset: int, parent: int,
                    is_request: bool) -> dict[str, int]:
    node, f = add_layer(tree, DmaLoggingReport, msg, offset, parent)
    if "page_size" not in f:
        return f
    bitmap = offset + DmaLoggingReport.vfu_compiled.size
    if is_request:
        expect_end(tree, msg, bitmap, "DMA_LOGGING_REPORT request")
        if not _power_of_two(f["page_size"]):
            tree.expert("dma_logging.page_size", f"DMA_LOGGING_REPORT page size "
                        f"{f['page_size']:#x}: the spec says a power of two")
        check_range(tree, f["iova"], f["length"], 64, "DMA_LOGGING_REPORT")
        _check_logging_alignment(tree, f["iova"], f["length"], f["page_size"],
                                 "DMA_LOGGING_REPORT")
    elif len(msg) > bitmap:
        add_bytes(tree, "dma_logging_report.bitmap", msg, bitmap, len(msg), node)
        if _power_of_two(f["page_size"]):
            _check_report_bitmap(tree, msg[bitmap:], f["length"], f["page_size"])
    return f


def _check_logging_alignment(tree: Tree, iova: int, length: int, page: int | None,
                             what: str) -> None:
    if page and (iova % page or length % page):
        tree.expert("dma_logging.unaligned", f"{what} {iova:#x}+{length:#x} is not aligned to "
                    f"its {page:#x}-byte pages (libvfio-user refuses it)")


def _check_report_bitmap(tree: Tree, bitmap: bytes, length: int, page: int) -> None:
    want = bitmap_bytes(length, page)
    if len(bitmap) != want:
        tree.expert("dma_logging.bitmap_size", f"bitmap is {len(bitmap)} bytes; "
                    f"{length:#x} bytes of {page:#x}-byte pages need {want}")
    pages = -(-length // page)
    if int.from_bytes(bitmap, "little") >> pages:
        tree.expert("dma_logging.bitmap_bits", f"bits set beyond the {pages} pages of the "
                    "requested range; the spec says they must be zero")


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
        if not with_data and not is_reply:         # a READ request: argsz holds the data asked
            check_request_argsz(tree, v["argsz"], cls.vfu_compiled.size + v["size"], cls.vfu_name)
        if is_reply:
            used = min(len(msg) - off, cls.vfu_compiled.size + v["size"])
            check_reply_argsz(tree, v["argsz"], used, cls.vfu_name)
            asked = _mig_request_size(ctx.request)
            if asked is not None and v["size"] < asked:
                return f"size={v['size']} (end of stream: {asked} asked)"
        return f"size={v['size']}"

    return fn


def _mig_payload(tree: Tree, msg: bytes, data: int, size: int, prefix: str,
                 node: int) -> None:
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


DISSECTORS.requests[CMD["MIG_DATA_READ"]] = _mig_data(MigDataRead, with_data=False, is_reply=False)
DISSECTORS.replies[CMD["MIG_DATA_READ"]] = _mig_data(MigDataRead, with_data=True, is_reply=True)
DISSECTORS.requests[CMD["MIG_DATA_WRITE"]] = _mig_data(MigDataWrite, with_data=True, is_reply=False)
DISSECTORS.bare("MIG_DATA_WRITE", "reply")


# --- the families together --------------------------------------------------------

# The families, in the order their fields and checks are registered.
FAMILIES: tuple[ModuleType, ...] = (header, version, dma, device,)
COMMAND_FAMILIES: tuple[ModuleType, ...] = (version, dma, device,)
FIELDS = Fields(*(family.FIELDS for family in FAMILIES), _FIELDS)
CHECKS = [row for family in FAMILIES for row in family.CHECKS] + _CHECKS
DISSECTORS_ALL = Dissectors.merged([*(family.DISSECTORS for family in COMMAND_FAMILIES), DISSECTORS])
REQUESTS, REPLIES = DISSECTORS_ALL.requests, DISSECTORS_ALL.replies
SESSION = SessionRules.merged([SessionRules(must_refuse=header.MUST_REFUSE),
                               *(family.SESSION for family in COMMAND_FAMILIES)])


# --- the message ------------------------------------------------------------------

def dissect_message(msg: bytes, ctx: Context, header: HeaderInfo | None = None
                    ) -> tuple[Tree, HeaderInfo | None]:
    """Dissect one whole message (whose header the caller may have parsed);
    never raises on bad input."""
    tree = Tree()
    if header is None:
        header = parse_header(msg)
    # `vfio_user.error` is present only on error replies, so that it can be
    # tested for presence as in Wireshark.
    add_layer(tree, Header, msg, 0, compiled=None if header and header.is_error else RESERVED)
    if header is None:
        tree.info = f"short message ({len(msg)} bytes)"
        return tree, None
    header_checks(tree, header, len(msg), ctx)
    table = REPLIES if header.is_reply else REQUESTS
    fn = table.get(header.cmd)
    if header.is_error and header.is_reply:
        if len(msg) > HEADER_SIZE:
            add_bytes(tree, "vfio_user.trailing", msg, HEADER_SIZE, len(msg))
            tree.expert("reply.error_payload", f"error reply carries {len(msg) - HEADER_SIZE} "
                        "payload bytes; an error reply is the header alone", HEADER_SIZE,
                        len(msg) - HEADER_SIZE)
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
    if ctx.fds and (header.cmd, header.kind) not in FD_CARRIERS:
        tree.expert("fd.count", f"{len(ctx.fds)} fds with a {header.command_name} "
                    f"{header.kind}, which carries none")
    fd_items(tree, ctx)
    return tree, header


# --- what the layers say about the protocol -------------------------------------------

def layers() -> list[type[Packet]]:
    """The protocol's layers, family by family, in declaration order."""
    return [cls for namespace in [*(vars(family) for family in FAMILIES), globals()]
            for cls in namespace.values() if isinstance(cls, type)
            and issubclass(cls, Packet) and "vfu_compiled" in vars(cls)
            and cls.__module__ == namespace["__name__"]]       # not one it imports


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
    """Fields a message's own bytes give (not frames, fds or devices)."""
    prefixes = {cls.vfu_field.name.split(".")[0] for cls in layers()}
    return [fd for fd in FIELDS
            if fd.name.split(".")[0] in prefixes and fd.name != "vfio_user"]


def field_commands(name: str) -> frozenset[int] | None:
    """The commands whose messages can carry field `name`; None when any can
    (header, payload, trailing bytes) or the field is not this protocol's."""
    return _layer_commands().get(name.split(".", 1)[0])
