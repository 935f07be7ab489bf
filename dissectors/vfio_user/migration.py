"""Migration: DEVICE_FEATURE (the MIGRATION and MIG_DEVICE_STATE features,
DMA logging), MIG_DATA_READ and MIG_DATA_WRITE.

Their layers, dissectors and checks (which operations each feature
defines, argsz, the dirty-logging ranges and report bitmap), and the
session side: the device state machine, dirty logging, and which states
allow migration data, applied ahead of the replies.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from scapy.fields import StrField
from scapy.packet import Packet

from vfu_inspect.fields import BYTES, Fields, bits32, bits64, u32, u64
from vfu_inspect.records import C2S
from vfu_inspect.tree import Tree

from .core import (
    FACTS, LVU, REPLY, REQUEST, SPEC, Array, Context, Dissector, Dissectors, Payload, add_bytes,
    check_range, check_reply_argsz, check_request_argsz, expect_end, flag_letters, render_info,
    walk)
from .dma import bitmap_bytes, check_bitmap_limit, check_logging_on
from .protocol import (
    CMD, ERROR_STATE, FEATURE_FLAGS, FEATURE_GET, FEATURE_PROBE, FEATURE_SET, FEATURES,
    HEADER_SIZE, MIG_STATES, MIGRATION_FLAGS, PRE_COPY, RESUMING, RUNNING, STOP, STOP_COPY)
from .state import (
    Conflict, ConnState, Effect, EffectKind, Pending, SessionRules, check_xfer, raise_conflict)

if TYPE_CHECKING:
    from vfu_inspect.packet import Dissected

CHECKS: list[tuple[str, ...]] = [
    # DEVICE_FEATURE and the migration state machine
    ("device_feature.get_and_set", "error", "GET and SET together without PROBE", f"{SPEC} § VFIO_USER_DEVICE_FEATURE"),
    ("device_feature.unknown", "note", "device feature the spec does not list", f"{SPEC} § VFIO_USER_DEVICE_FEATURE (Device Features)"),
    ("device_feature.op_undefined", "warning", "GET or SET of a feature that defines no such operation (SET MIGRATION, GET DMA_LOGGING_START ...)", f"{SPEC} § VFIO_USER_DEVICE_FEATURE (Device Features)"),
    ("device_feature.probe_undefined", "note", "PROBE of an operation the feature does not define: the probe must fail", f"{SPEC} § VFIO_USER_DEVICE_FEATURE"),
    ("migration.flags", "warning", "MIGRATION feature without VFIO_MIGRATION_STOP_COPY", f"{SPEC} § VFIO_DEVICE_FEATURE_MIGRATION"),
    ("migration.transition", "warning", "device-state transition the state machine forbids", f"{SPEC} § VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE"),
    ("migration.data_state", "warning", "MIG_DATA_READ/WRITE in a state that allows none", f"{SPEC} § VFIO_USER_MIG_DATA_READ"),
    # DMA logging
    ("dma_logging.bitmap_size", "warning", "DMA_LOGGING_REPORT bitmap size disagrees with range and page size", f"{SPEC} § VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT"),
    ("dma_logging.bitmap_bits", "warning", "DMA_LOGGING_REPORT bitmap sets bits beyond the requested range", f"{SPEC} § VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT"),
    ("dma_logging.ranges_short", "error", "num_ranges exceeds the ranges sent", f"{SPEC} § VFIO_DEVICE_FEATURE_DMA_LOGGING_START"),
    ("dma_logging.page_size", "warning", "DMA logging page size zero, or a REPORT page size not a power of two", f"{SPEC} § VFIO_DEVICE_FEATURE_DMA_LOGGING_START / _REPORT"),
    ("dma_logging.unaligned", "note", "DMA logging range or report not aligned to its page size", f"{LVU} (the spec sets no alignment)",
     "libvfio-user refuses it (EINVAL, ENOTSUP)"),
    ("dma_logging.unmapped", "note", "DMA_LOGGING_REPORT of a range no live DMA map with an fd holds", f"{LVU} (the spec sets no such rule)",
     "libvfio-user logs only the memory it maps, and refuses other ranges (EINVAL, ENOENT)"),
    # MIG_DATA_READ and MIG_DATA_WRITE
    ("mig_data_read.size", "error", "MIG_DATA_READ size disagrees with the data", f"{SPEC} § VFIO_USER_MIG_DATA_READ"),
    ("mig_data_write.size", "error", "MIG_DATA_WRITE size disagrees with the data", f"{SPEC} § VFIO_USER_MIG_DATA_WRITE"),
    ("interop.mig_data_padding", "note", "short MIG_DATA_READ reply padded to the buffer", f"{FACTS} § 17/18",
     "libvfio-user sends its whole buffer with the last, short chunk"),
]

FIELDS = Fields()


@FIELDS.layer("device_feature")
class DeviceFeature(Packet):
    name = "DEVICE_FEATURE"
    fields_desc = [u32("argsz", 8), bits32("flags", FEATURE_FLAGS),
                   StrField("data", b"")]


@FIELDS.layer("migration")
class MigrationFeature(Packet):
    name = "Migration feature"
    vfu_command = "DEVICE_FEATURE"      # a payload of that command
    fields_desc = [bits64("flags", MIGRATION_FLAGS)]


@FIELDS.layer("mig_state")
class MigDeviceState(Packet):
    name = "Device state"
    vfu_command = "DEVICE_FEATURE"      # a payload of that command
    fields_desc = [u32("device_state", values=MIG_STATES, label="Device state"),
                   u32("data_fd", base="hex", label="Data fd (unused)")]


@FIELDS.layer("dma_logging")
class DmaLogging(Packet):
    name = "DMA logging"
    vfu_command = "DEVICE_FEATURE"      # a payload of that command
    fields_desc = [u64("page_size", base="hex"),
                   u32("num_ranges", label="Number of ranges"), u32("reserved")]


@FIELDS.layer("dma_logging.range")
class DmaLoggingRange(Packet):
    name = "Range"
    fields_desc = [u64("iova", base="hex", label="IOVA"), u64("length", base="hex")]


@FIELDS.layer("dma_logging_report")
class DmaLoggingReport(Packet):
    name = "DMA logging report"
    vfu_command = "DEVICE_FEATURE"      # a payload of that command
    fields_desc = [u64("iova", base="hex", label="IOVA"), u64("length", base="hex"),
                   u64("page_size", base="hex"), StrField("bitmap", b"")]


class MigData(Packet):
    fields_desc = [u32("argsz", 8), u32("size"), StrField("data", b"")]


@FIELDS.layer("mig_data_read")
class MigDataRead(MigData):
    name = "MIG_DATA_READ"


@FIELDS.layer("mig_data_write")
class MigDataWrite(MigData):
    name = "MIG_DATA_WRITE"


FIELDS.field("device_feature.data", "Feature data", BYTES)
FIELDS.field("dma_logging_report.bitmap", "Dirty bitmap", BYTES)
FIELDS.field("mig_data_read.data", "Data", BYTES)
FIELDS.field("mig_data_write.data", "Data", BYTES)


# --- dissectors ---------------------------------------------------------------------

DISSECTORS = Dissectors()
# a feature's data is walked by hand: which part it is depends on the feature
DEVICE_FEATURE = DISSECTORS.declare("DEVICE_FEATURE", REQUEST, Payload(DeviceFeature, ends=False))
DISSECTORS.declare("DEVICE_FEATURE", REPLY, DEVICE_FEATURE)
MIGRATION_FEATURE = DISSECTORS.part("MIGRATION_FEATURE", Payload(
    MigrationFeature, label="MIGRATION feature"))
MIG_DEVICE_STATE = DISSECTORS.part("MIG_DEVICE_STATE", Payload(
    MigDeviceState, label="MIG_DEVICE_STATE"))
DMA_LOGGING = DISSECTORS.part("DMA_LOGGING", Payload(
    DmaLogging, Array(DmaLoggingRange, "num_ranges", "dma_logging.ranges_short"), ends=False))
DMA_LOGGING_REPORT = DISSECTORS.part("DMA_LOGGING_REPORT", Payload(DmaLoggingReport, ends=False))


# The operations each feature defines, and the layout of its data.
FEATURE_OPS = {1: FEATURE_GET, 2: FEATURE_GET | FEATURE_SET, 6: FEATURE_SET, 7: FEATURE_SET,
               8: FEATURE_GET}
FEATURE_OP_NAMES = {FEATURE_GET: "GET", FEATURE_SET: "SET", FEATURE_PROBE: "PROBE"}


@DISSECTORS.request("DEVICE_FEATURE")
@DISSECTORS.reply("DEVICE_FEATURE")
def _device_feature(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
    walked = walk(tree, msg, off, DEVICE_FEATURE)
    node, v = walked.node, walked.values
    if not walked.whole:
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
        f = walk(tree, msg, offset, MIGRATION_FEATURE, parent).values
        return f" flags={flag_letters(f.get('flags', 0), MIGRATION_FLAGS)}", f
    if feature == 2:
        f = walk(tree, msg, offset, MIG_DEVICE_STATE, parent).values
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
    walked = walk(tree, msg, offset, DMA_LOGGING, parent)
    f = walked.values
    page = f.get("page_size")
    if check and page == 0:
        tree.expert("dma_logging.page_size", "DMA_LOGGING_START page size 0")
    for i, r in enumerate(walked.entries if check else ()):
        what = f"DMA_LOGGING_START range {i}"
        check_range(tree, r["iova"], r["length"], 64, what)
        _check_logging_alignment(tree, r["iova"], r["length"], page, what)
    expect_end(tree, msg, walked.end, "DMA logging")
    return f


def _logging_report(tree: Tree, msg: bytes, offset: int, parent: int,
                    is_request: bool) -> dict[str, int]:
    walked = walk(tree, msg, offset, DMA_LOGGING_REPORT, parent)
    node, f = walked.node, walked.values
    if not walked.whole:
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
    """A MIG_DATA_READ or _WRITE message; the data and its padding are walked by hand."""
    prefix = cls.vfu_field.name
    payload = DISSECTORS.declare(cls.vfu_name, REPLY if is_reply else REQUEST, Payload(
        cls, ends=not with_data, label=cls.vfu_name, info="size={size}"))

    def fn(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
        walked = walk(tree, msg, off, payload)
        node, v = walked.node, walked.values
        if not walked.whole:
            return ""
        data = off + cls.vfu_compiled.size
        if with_data:
            _mig_payload(tree, msg, data, v["size"], prefix, node)
        if not with_data and not is_reply:         # a READ request: argsz holds the data asked
            check_request_argsz(tree, v["argsz"], cls.vfu_compiled.size + v["size"], cls.vfu_name)
        if is_reply:
            used = min(len(msg) - off, cls.vfu_compiled.size + v["size"])
            check_reply_argsz(tree, v["argsz"], used, cls.vfu_name)
            asked = _mig_request_size(ctx.request)
            if asked is not None and v["size"] < asked:
                return f"{render_info(payload, v)} (end of stream: {asked} asked)"
        return render_info(payload, v)

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


# --- the session -----------------------------------------------------------------------

SESSION = SessionRules(
    must_refuse={"migration.transition", "migration.data_state", "dma_logging.page_size"},
    argsz_bounded=("DEVICE_FEATURE", "MIG_DATA_READ", "MIG_DATA_WRITE"))
# The device state (DEVICE_RESET's effect sets it too), the MIGRATION
# feature's flags once read, and dirty logging (None when off).
SESSION.table("mig_state", lambda: RUNNING)
SESSION.table("mig_flags", lambda: None)
SESSION.table("logging", lambda: None)


@SESSION.section("Migration")
def _migration_lines(state: ConnState) -> list[str]:
    pending = next((e for e in reversed(state.effects)
                    if e.kind.migration and not e.answered), None)
    return [f"device state {MIG_STATES.get(state.mig_state, state.mig_state)}"
            + (f" (in flight: frame {pending.number} has no reply yet)" if pending else ""),
            f"dirty logging {state.logging or 'off'}"]

SAVING = {STOP_COPY, PRE_COPY}
MIG_ARCS = {(RUNNING, STOP), (STOP_COPY, STOP), (RESUMING, STOP), (PRE_COPY, RUNNING),
            (STOP, RUNNING), (RUNNING, PRE_COPY), (STOP, STOP_COPY), (PRE_COPY, STOP_COPY),
            (STOP, RESUMING)}
MIG_READ_STATES, MIG_WRITE_STATES = {STOP_COPY, PRE_COPY, 7}, {RESUMING}
FEATURE = {name: number for number, name in FEATURES.items()}


@SESSION.on_command("DEVICE_FEATURE")
def _feature_request(state: ConnState, p: Dissected) -> dict[str, Any]:
    v = p.tree.prefixed("device_feature")
    flags = v.get("flags", 0)
    new = p.tree.prefixed("mig_state").get("device_state")
    if new is not None and flags & FEATURE_SET and not flags & FEATURE_PROBE:
        v["device_state"] = new
        raise_conflict(p.tree, _transition_conflict(state, v))
    report = p.tree.prefixed("dma_logging_report")
    if flags & FEATURE_GET and report.get("page_size"):
        check_bitmap_limit(state, p.tree, report["length"], report["page_size"])
        check_logging_on(state, p.tree, "DMA_LOGGING_REPORT")
        mapped = state.maps.containing(report["iova"], report["length"])
        if mapped is None or mapped.fd == "none":
            p.tree.expert("dma_logging.unmapped", f"{report['iova']:#x}+{report['length']:#x} "
                          "is in no live DMA map with an fd: libvfio-user logs only the memory "
                          "it maps, and refuses this")
    v["logging"] = p.tree.prefixed("dma_logging")
    return v


@SESSION.on_command("MIG_DATA_READ", "MIG_DATA_WRITE")
def _mig_data_request(state: ConnState, p: Dissected) -> None:
    reading = p.header.cmd == CMD["MIG_DATA_READ"]
    if state.mig_state not in (MIG_READ_STATES if reading else MIG_WRITE_STATES):
        p.tree.expert("migration.data_state", f"{p.header.command_name} in state "
                      f"{MIG_STATES.get(state.mig_state, state.mig_state)}")
    v = p.tree.prefixed("mig_data_read" if reading else "mig_data_write")
    if "size" in v:
        check_xfer(state, p.tree, C2S, v["size"])


def migration_path(current: int, new: int, pre_copy: bool = True) -> list[int] | None:
    """The states a transition passes through (spec: shortest path of direct
    arcs with no saving state inside it); None when the spec forbids it.
    Without PRE_COPY support, the arcs touching it are removed."""
    if current == ERROR_STATE or new not in (STOP, RUNNING, STOP_COPY, RESUMING, PRE_COPY) \
            or (current, new) == (STOP_COPY, PRE_COPY) \
            or not pre_copy and PRE_COPY in (current, new):
        return None
    paths, frontier = {current: []}, [current]
    while frontier:
        state = frontier.pop(0)
        if state == new:
            return paths[state]
        if state != current and state in SAVING:
            continue
        for a, b in sorted(MIG_ARCS):
            if a == state and b not in paths and (pre_copy or b != PRE_COPY):
                paths[b] = paths[state] + [b]
                frontier.append(b)
    return None


@SESSION.echo("DEVICE_FEATURE")
def _feature_echo(p: Dissected, request: Pending) -> None:
    """A SET or PROBE reply is the request's payload (argsz aside: it says the
    size needed; DMA_LOGGING_START may change page_size)."""
    flags = request.values.get("flags", 0)
    if flags & FEATURE_GET and not flags & FEATURE_PROBE:
        return
    skip = 8 if flags & 0xFFFF == FEATURE["DMA_LOGGING_START"] else 0
    kept = min(len(request.data), len(p.msg.data))
    asked, got = request.data[HEADER_SIZE + 4:kept], p.msg.data[HEADER_SIZE + 4:kept]
    size = struct.unpack_from("<I", request.data, 4)[0]
    if size != p.msg.wire_size or asked[:4] + asked[4 + skip:] != got[:4] + got[4 + skip:]:
        p.tree.expert("reply.echo_mismatch", f"{'PROBE' if flags & FEATURE_PROBE else 'SET'}"
                      f" reply differs from its request (frame {request.number}): the spec "
                      "says it is the same payload")


@SESSION.on_reply("DEVICE_FEATURE")
def _feature_reply(state: ConnState, p: Dissected, request: Pending) -> None:
    flags = request.values.get("flags", 0)
    if flags & FEATURE_GET and flags & 0xFFFF == FEATURE["MIGRATION"]:
        state.mig_flags = p.tree.prefixed("migration").get("flags", state.mig_flags)


def _transition_conflict(state: ConnState, v: dict[str, Any]) -> Conflict:
    new = v.get("device_state")
    pre_copy = state.mig_flags is None or bool(state.mig_flags & MIGRATION_FLAGS["pre_copy"])
    if new is None or migration_path(state.mig_state, new, pre_copy) is not None:
        return None
    return ("migration.transition", f"{MIG_STATES.get(state.mig_state)} → "
                                    f"{MIG_STATES.get(new, new)} is not a transition "
                                    "the spec allows" + ("" if pre_copy else
                                                         " (the device has no PRE_COPY)"))


def _feature_apply(state: ConnState, e: Effect) -> tuple[int, str | None]:
    saved = state.mig_state, state.logging
    v, flags = e.values, e.values.get("flags", 0)
    if "device_state" in v:
        state.mig_state = v["device_state"]
    if flags & FEATURE_SET and not flags & FEATURE_PROBE:
        feature = flags & 0xFFFF
        if feature == FEATURE["DMA_LOGGING_START"]:
            logging = v.get("logging", {})
            ranges = logging.get("num_ranges") or "all"
            state.logging = f"page {logging.get('page_size', 0):#x}, ranges {ranges}"
        elif feature == FEATURE["DMA_LOGGING_STOP"]:
            state.logging = None
    return saved


def _feature_undo(state: ConnState, e: Effect) -> None:
    state.mig_state, state.logging = e.saved


def _feature_text(v: dict[str, Any]) -> str:
    if "device_state" in v:
        return f"device state → {MIG_STATES.get(v['device_state'], v['device_state'])}"
    return FEATURES.get(v.get("flags", 0) & 0xFFFF, "feature")


SESSION.effect("DEVICE_FEATURE", EffectKind(_feature_apply, _feature_undo, _feature_text,
                                            _transition_conflict, migration=True))
