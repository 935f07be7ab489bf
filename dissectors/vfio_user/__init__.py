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
from . import version
from .version import Version
from .header import (
    CLIENT_COMMANDS, FD_CARRIERS, RESERVED, Header, HeaderInfo, fd_items, header_checks,
    parse_header)
from .state import SessionRules

# The expert items whose message shows its client uses QEMU's DMA layout.
QEMU_DMA_SIGNS = {"interop.dma_write_bare_reply": "a bare DMA_WRITE reply",
                  "interop.dma_qemu_layout": "a DMA_READ reply in QEMU's layout"}


# --- expert infos -------------------------------------------------------------
# Every check, once: id, severity, what triggers it, where the rule comes from
# and, for interop items, which implementation does what.  "spec" is QEMU's
# docs/interop/vfio-user.rst, by section; a rule that is not the spec's says
# whose it is, and is a note unless the message also breaks the spec.

_CHECKS: list[tuple[str, ...]] = [
    # negotiation
    # DMA
    ("dma_map.flags_unknown", "note", "DMA_MAP flag bits neither the spec (READ, WRITE) nor libvfio-user (MMAP, FILE_IO) defines", f"{SPEC} § VFIO_USER_DMA_MAP",
     "libvfio-user refuses them (EINVAL)"),
    ("dma_map.flags_extension", "note", "DMA_MAP MMAP/FILE_IO flags (libvfio-user extensions)", f"{FACTS} § 2 DMA_MAP"),
    ("dma_map.offset_no_fd", "warning", "DMA_MAP without an fd but with a non-zero offset", f"{SPEC} § VFIO_USER_DMA_MAP"),
    ("dma.overlap", "warning", "DMA_MAP over a live map (the server must fail it with EEXIST)", f"{SPEC} § VFIO_USER_DMA_MAP"),
    ("dma.overlap_errno", "warning", "DMA_MAP over a live map refused with an errno other than EEXIST", f"{SPEC} § VFIO_USER_DMA_MAP",
     "libvfio-user answers EINVAL, and accepts a map identical to a live one"),
    ("dma.unmap_unknown", "warning", "DMA_UNMAP of a range that is not exactly a live map", f"{SPEC} § VFIO_USER_DMA_UNMAP"),
    ("dma_unmap.flags", "note", "DMA_UNMAP flags (unused in the spec) set as libvfio-user refuses: unknown bits, ALL with an address or size", f"{SPEC} § VFIO_USER_DMA_UNMAP",
     "libvfio-user: GET_DIRTY_BITMAP = 1, ALL = 2 with address = size = 0, other bits EINVAL; QEMU 10.2.2 sends ALL only for a whole 2^64 section"),
    ("dma.misaligned", "warning", "DMA map not aligned to the smallest page size of pgsizes", f"{SPEC} § VFIO_USER_VERSION pgsizes"),
    ("dma.too_many", "warning", "more live DMA maps than max_dma_maps", f"{SPEC} § VFIO_USER_VERSION"),
    ("dma.access_unmapped", "warning", "DMA_READ/WRITE outside every live map", f"{SPEC} § VFIO_USER_DMA_READ"),
    ("dma_unmap.bitmap_size", "error", "DMA_UNMAP dirty bitmap size disagrees with its header, range or page size", f"{LVU} (GET_DIRTY_BITMAP; not in the spec)"),
    ("dma_logging.bitmap_size", "warning", "DMA_LOGGING_REPORT bitmap size disagrees with range and page size", f"{SPEC} § VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT"),
    ("dma_logging.bitmap_bits", "warning", "DMA_LOGGING_REPORT bitmap sets bits beyond the requested range", f"{SPEC} § VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT"),
    ("dma_logging.ranges_short", "error", "num_ranges exceeds the ranges sent", f"{SPEC} § VFIO_DEVICE_FEATURE_DMA_LOGGING_START"),
    ("dma_logging.page_size", "warning", "DMA logging page size zero, or a REPORT page size not a power of two", f"{SPEC} § VFIO_DEVICE_FEATURE_DMA_LOGGING_START / _REPORT"),
    ("dma_logging.unaligned", "note", "DMA logging range or report not aligned to its page size", f"{LVU} (the spec sets no alignment)",
     "libvfio-user refuses it (EINVAL, ENOTSUP)"),
    ("dma_logging.unmapped", "note", "DMA_LOGGING_REPORT of a range no live DMA map with an fd holds", f"{LVU} (the spec sets no such rule)",
     "libvfio-user logs only the memory it maps, and refuses other ranges (EINVAL, ENOENT)"),
    ("dma_logging.not_started", "warning", "DMA_LOGGING_REPORT, or a DMA_UNMAP dirty bitmap, while dirty logging is off", f"{SPEC} § VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT"),
    ("dirty.bitmap_too_big", "note", "dirty bitmap over the client's migration.max_bitmap_size", f"{FACTS} § 1 VERSION (migration is not in the spec)",
     "QEMU 10.2.2 and libvfio-user negotiate max_bitmap_size; libvfio-user issue 469"),
    # the device, regions and IRQs
    ("device_info.pci", "warning", "DEVICE_GET_INFO reply that is not a PCI device with at least the 9 PCI regions", f"{SPEC} § VFIO_USER_DEVICE_GET_INFO; § Device-Specific Regions"),
    ("device_reset.unsupported", "warning", "DEVICE_RESET to a device whose GET_INFO reply lacked RESET", f"{SPEC} § VFIO_USER_DEVICE_GET_INFO"),
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
    ("dma_read.count", "error", "DMA_READ count disagrees with the data", f"{SPEC} § VFIO_USER_DMA_READ"),
    ("dma_write.count", "error", "DMA_WRITE count disagrees with the data", f"{SPEC} § VFIO_USER_DMA_WRITE"),
    ("dma_read.count_mismatch", "note", "DMA_READ reply count differs from the request's", f"{LVU} (the spec allows it)",
     "libvfio-user fails the transfer (\"bad reply to DMA transfer\")"),
    ("dma_write.count_mismatch", "note", "DMA_WRITE reply count differs from the request's", f"{LVU} (the spec allows it)",
     "libvfio-user fails the transfer (\"bad reply to DMA transfer\")"),
    ("interop.dma_qemu_layout", "warning", "DMA_READ reply in QEMU's layout (u32 count, data at 12)", f"{SPEC} § VFIO_USER_DMA_READ; {FACTS} § 11/12",
     "QEMU 10.2.2 reads and writes u32 count, data at offset 12; libvfio-user and the spec: u64 count, data at 16"),
    ("interop.dma_write_bare_reply", "error", "DMA_WRITE reply that is the bare header", f"{SPEC} § VFIO_USER_DMA_WRITE; {FACTS} § 11/12",
     "QEMU 10.2.2 replies with the header alone; libvfio-user fails the transfer (\"bad reply to DMA transfer\")"),
    ("interop.dma_write_spec_reply", "note", "DMA_WRITE reply with the spec table's u32 count (12 bytes)", f"{SPEC} § VFIO_USER_DMA_WRITE (Reply); {FACTS} § 11/12",
     "the spec's reply table gives count 4 bytes, its request 8; libvfio-user sends and expects 8 and fails a 12-byte reply (\"bad reply to DMA transfer\"); QEMU 10.2.2 sends the bare header"),
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

@_FIELDS.layer("dma_map")
class DmaMap(Packet):
    name = "DMA_MAP"
    fields_desc = [
        u32("argsz", 32),
        bits32("flags", DMA_MAP_FLAGS),
        u64("offset", base="hex", label="File offset"),
        u64("address", base="hex", label="IOVA"),
        u64("size", base="hex"),
    ]


@_FIELDS.layer("dma_unmap")
class DmaUnmap(Packet):
    name = "DMA_UNMAP"
    fields_desc = [
        u32("argsz", 24),
        bits32("flags", DMA_UNMAP_FLAGS),
        u64("address", base="hex", label="IOVA"),
        u64("size", base="hex"),
    ]


@_FIELDS.layer("dma_unmap.bitmap")
class DirtyBitmap(Packet):
    name = "Dirty bitmap"
    fields_desc = [u64("pgsize", base="hex", label="Page size"),
                   u64("size", label="Bitmap size"), StrField("data", b"")]


@_FIELDS.layer("device_info")
class DeviceInfo(Packet):
    name = "DEVICE_GET_INFO"
    fields_desc = [u32("argsz", 16), bits32("flags", DEVICE_INFO_FLAGS),
                   u32("num_regions"), u32("num_irqs")]


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


class DmaAccess(Packet):
    """Spec layout of DMA_READ/DMA_WRITE: address u64, count u64, data."""

    fields_desc = [u64("address", base="hex"), u64("count"),
                   StrField("data", b"")]


class QemuDmaAccess(Packet):
    """QEMU 10.2's layout: address u64, count u32, data at 12."""

    fields_desc = [u64("address", base="hex"), u32("count"),
                   StrField("data", b"")]


@_FIELDS.layer("dma_read")
class DmaRead(DmaAccess):
    name = "DMA_READ"


@_FIELDS.layer("dma_write")
class DmaWrite(DmaAccess):
    name = "DMA_WRITE"


@_FIELDS.layer("dma_read")
class QemuDmaRead(QemuDmaAccess):
    name = "DMA_READ"


@_FIELDS.layer("dma_write")
class QemuDmaWrite(QemuDmaAccess):
    name = "DMA_WRITE"


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
    ("dma_unmap.bitmap.data", "Dirty bitmap", BYTES),
    ("set_irqs.data", "Data", BYTES),
    ("set_irqs.bool", "Bool", UINT),
    ("region_read.data", "Data", BYTES),
    ("region_write.data", "Data", BYTES),
    ("dma_read.data", "Data", BYTES),
    ("dma_write.data", "Data", BYTES),
    ("device_feature.data", "Feature data", BYTES),
    ("dma_logging_report.bitmap", "Dirty bitmap", BYTES),
    ("mig_data_read.data", "Data", BYTES),
    ("mig_data_write.data", "Data", BYTES),
]:
    _FIELDS.field(_name, _label, _type)


# --- per-command dissectors ------------------------------------------------------

DISSECTORS = Dissectors()


@DISSECTORS.request("DMA_MAP")
def _dma_map(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
    _, v = add_layer(tree, DmaMap, msg, off)
    expect_end(tree, msg, off + DmaMap.vfu_compiled.size, "DMA_MAP request")
    if "size" not in v:
        return ""
    if v["argsz"] != DmaMap.vfu_compiled.size:
        tree.expert("argsz.mismatch",
                    f"DMA_MAP argsz {v['argsz']}, the request struct is 32 bytes")
    if v["flags"] & ~sum(DMA_MAP_FLAGS.values()):
        tree.expert("dma_map.flags_unknown", f"DMA_MAP flags {v['flags']:#x} has bits neither "
                    "the spec nor libvfio-user defines (libvfio-user refuses them)")
    elif v["flags"] & ~SPEC_DMA_MAP_FLAGS:
        tree.expert("dma_map.flags_extension",
                    f"DMA_MAP flags {v['flags']:#x}: MMAP/FILE_IO are libvfio-user extensions")
    check_range(tree, v["address"], v["size"], 64, "DMA_MAP")
    if not ctx.fds and v["offset"]:
        tree.expert("dma_map.offset_no_fd", f"DMA_MAP offset {v['offset']:#x} without an fd: "
                    "the offset is zero when the region is not mappable")
    end = v["address"] + v["size"]
    ctx.purpose(0, f"DMA memory for iova {v['address']:#x}-{end:#x} "
                   f"(file offset {v['offset']:#x})")
    if len(ctx.fds) > 1:
        tree.expert("fd.count", f"DMA_MAP carries {len(ctx.fds)} fds, at most 1 expected")
    prot = ("R" if v["flags"] & 1 else "") + ("W" if v["flags"] & 2 else "")
    return (f"iova={v['address']:#x} size={hex_size(v['size'])} prot={prot or '-'} "
            f"fd={fd_text(ctx)}" + (f" offset={v['offset']:#x}" if ctx.fds else ""))


DISSECTORS.bare("DMA_MAP", "reply")


@DISSECTORS.request("DMA_UNMAP")
@DISSECTORS.reply("DMA_UNMAP")
def _dma_unmap(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
    node, v = add_layer(tree, DmaUnmap, msg, off)
    if "size" not in v:
        return ""
    end = off + DmaUnmap.vfu_compiled.size
    info = f"iova={v['address']:#x} size={hex_size(v['size'])}"
    if ctx.direction == "c2s":
        _unmap_request_checks(tree, v)
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


def _unmap_request_checks(tree: Tree, v: dict[str, int]) -> None:
    check_request_argsz(tree, v["argsz"], DmaUnmap.vfu_compiled.size, "DMA_UNMAP")
    if v["flags"] & ~sum(DMA_UNMAP_FLAGS.values()):
        tree.expert("dma_unmap.flags", f"DMA_UNMAP flags {v['flags']:#x}: bits libvfio-user "
                    "does not define (it refuses them); the spec leaves flags unused")
    elif v["flags"] & DMA_UNMAP_FLAGS["all"] and (v["address"] or v["size"]):
        tree.expert("dma_unmap.flags", f"DMA_UNMAP ALL with iova {v['address']:#x} size "
                    f"{v['size']:#x}: libvfio-user refuses ALL unless both are 0")
    check_range(tree, v["address"], v["size"], 64, "DMA_UNMAP")


@DISSECTORS.request("DEVICE_GET_INFO")
def _device_info_request(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
    _, v = add_layer(tree, DeviceInfo, msg, off)
    expect_end(tree, msg, off + DeviceInfo.vfu_compiled.size, "DEVICE_GET_INFO request")
    if "argsz" in v:
        check_request_argsz(tree, v["argsz"], DeviceInfo.vfu_compiled.size, "DEVICE_GET_INFO")
        check_zero(tree, v, ("flags", "num_regions", "num_irqs"), "DEVICE_GET_INFO request")
    return ""


@DISSECTORS.reply("DEVICE_GET_INFO")
def _device_info_reply(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
    _, v = add_layer(tree, DeviceInfo, msg, off)
    expect_end(tree, msg, off + DeviceInfo.vfu_compiled.size, "DEVICE_GET_INFO reply")
    if "num_irqs" not in v:
        return ""
    check_reply_argsz(tree, v["argsz"], len(msg) - off, "DEVICE_GET_INFO")
    if not v["flags"] & DEVICE_INFO_FLAGS["pci"] or v["num_regions"] < PCI_NUM_REGIONS:
        tree.expert("device_info.pci", f"flags {v['flags']:#x}, {v['num_regions']} regions: "
                    f"the spec supports only PCI devices, with at least {PCI_NUM_REGIONS} regions")
    return f"regions={v['num_regions']} irqs={v['num_irqs']} flags={v['flags']:#x}"


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
        if "count" in v:
            check_range(tree, v["address"], v["count"], 64, f"{spec.vfu_name} address+count")
        return f"addr={v.get('address', 0):#x} count={v.get('count', '?')}"

    def on_reply(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
        asked = _request_count(ctx.request)
        if not data_in_reply and len(msg) == off:
            tree.expert("interop.dma_write_bare_reply",
                        f"{spec.vfu_name} reply is the bare header (QEMU's layout); "
                        "the spec and libvfio-user expect address and count")
            return "bare reply (QEMU layout)"
        layout = spec
        why = _qemu_layout(msg, off, asked, ctx.qemu_dma) if data_in_reply else None
        if not data_in_reply and len(msg) - off == qemu.vfu_compiled.size:
            layout = qemu
            tree.expert("interop.dma_write_spec_reply", f"{spec.vfu_name} reply as the spec's "
                        "table has it, a u32 count (12 bytes): libvfio-user expects a u64 count "
                        "and fails the transfer")
        elif why:
            layout = qemu
            tree.expert("interop.dma_qemu_layout",
                        f"{spec.vfu_name} reply in QEMU's layout (u32 count, data at offset 12), "
                        f"not the spec's (u64 count, data at 16): {why}")
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


def _qemu_layout(msg: bytes, off: int, asked: int | None, known: str | None) -> str | None:
    """Why a DMA_READ reply is in QEMU's layout, or None for the spec's.  Both
    layouts give `count` bytes the same message size; QEMU's u32 count is
    followed by data and ends with 4 zero bytes, the spec's count is a u64."""
    if asked is None or len(msg) < off + 16:
        return None
    spec_count = struct.unpack_from("<Q", msg, off + 8)[0]
    qemu_count = spec_count & 0xFFFFFFFF
    if spec_count != asked and qemu_count == asked:
        return "its u32 count matches the request and the u64 does not"
    if known and spec_count == asked and not any(msg[-4:]):
        return f"the bytes fit both (data starts with 4 zero bytes), and {known}"
    return None


DISSECTORS.requests[CMD["DMA_READ"]], DISSECTORS.replies[CMD["DMA_READ"]] = _dma_access(
    DmaRead, QemuDmaRead, data_in_request=False, data_in_reply=True)
DISSECTORS.requests[CMD["DMA_WRITE"]], DISSECTORS.replies[CMD["DMA_WRITE"]] = _dma_access(
    DmaWrite, QemuDmaWrite, data_in_request=True, data_in_reply=False)

DISSECTORS.bare("DEVICE_RESET", "request")
DISSECTORS.bare("DEVICE_RESET", "reply")


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
FAMILIES: tuple[ModuleType, ...] = (header, version,)
COMMAND_FAMILIES: tuple[ModuleType, ...] = (version,)
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
