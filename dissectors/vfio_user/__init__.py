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
from . import irq
from .irq import DISABLE_ALL, IrqInfo, SetIrqs
from . import region
from .region import (
    KVM_IOREGION_POSTED_WRITES, IO_FD_TYPE, RegionCap, RegionInfo, RegionIoFds, RegionRead,
    RegionType, RegionWrite, ShadowSubRegion, SparseArea, SparseMmap, SubRegion, WriteMulti,
    WriteMultiEntry)
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
    # server commands and interop
    ("interop.mig_data_padding", "note", "short MIG_DATA_READ reply padded to the buffer", f"{FACTS} § 17/18",
     "libvfio-user sends its whole buffer with the last, short chunk"),
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
    ("device_feature.data", "Feature data", BYTES),
    ("dma_logging_report.bitmap", "Dirty bitmap", BYTES),
    ("mig_data_read.data", "Data", BYTES),
    ("mig_data_write.data", "Data", BYTES),
]:
    _FIELDS.field(_name, _label, _type)


# --- per-command dissectors ------------------------------------------------------

DISSECTORS = Dissectors()


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
FAMILIES: tuple[ModuleType, ...] = (header, version, dma, device, region, irq,)
COMMAND_FAMILIES: tuple[ModuleType, ...] = (version, dma, device, region, irq,)
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
