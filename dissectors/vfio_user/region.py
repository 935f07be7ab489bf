"""Regions: DEVICE_GET_REGION_INFO (with its capability chain),
DEVICE_GET_REGION_IO_FDS, REGION_READ/WRITE and REGION_WRITE_MULTI.

Their layers, dissectors and checks, and the session side: the regions a
device describes (size, flags, mmap areas, io fds), accesses checked
against them, and a region access handed to the device layer that knows
its registers (PCI config space, a device plug-in).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from scapy.fields import StrField
from scapy.packet import Packet

from vfu_inspect.devices import add_registers, device_for
from vfu_inspect.fields import BYTES, Fields, bits32, raw, u16, u32, u64
from vfu_inspect.records import C2S
from vfu_inspect.tree import Tree

from ..pci_config import CONFIG_REGION, ConfigShadow, dissect_config_access
from .core import (
    FACTS, IOEVENTFDS, REGION_MMAP, REPLY, REQUEST, SPEC, Array, Context, Dissector, Dissectors,
    Payload, Rest, add_bytes, add_layer, bit_letters, check_range, expect_end, render_info, walk)
from .protocol import (
    CMD, IO_FD_FLAGS, IO_FD_TYPES, REGION_CAPS, REGION_FLAGS, REGIONS, region_name)
from .state import ConnState, Pending, SessionRules, check_xfer, describe_fd, echoed_fields

if TYPE_CHECKING:
    from vfu_inspect.packet import Dissected

CHECKS: list[tuple[str, ...]] = [
    # DEVICE_GET_REGION_INFO and _IO_FDS
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
    ("interop.region_caps_offset", "note", "REGION_INFO CAPS with cap_offset outside [32, argsz] in a truncated reply", f"{FACTS} peers: QEMU 10.2.2",
     "Linux VFIO keeps CAPS with cap_offset 0 when it truncates; QEMU 10.2.2 fails (\"failed to get region N info: Invalid argument\"); libvfio-user sets CAPS only when the capabilities fit"),
    ("interop.io_fds_48", "note", "48-byte IO_FDS entries (libvfio-user's shadow ioeventfd)", f"{FACTS} § 6 IO_FDS",
     "libvfio-user inserts shadow_offset (type 2); the spec's entries are 40 bytes"),
    # region accesses
    ("region.unknown", "warning", "access to a region index the device did not report", f"{SPEC} § VFIO_USER_DEVICE_GET_INFO"),
    ("region.out_of_bounds", "warning", "region access beyond the region's size", f"{SPEC} § VFIO_USER_REGION_READ"),
    ("region.access_flags", "warning", "region access against its READ/WRITE flags", f"{SPEC} § VFIO_USER_DEVICE_GET_REGION_INFO"),
    ("region_read.count", "error", "REGION_READ count disagrees with the data", f"{SPEC} § VFIO_USER_REGION_READ"),
    ("region_write.count", "error", "REGION_WRITE count disagrees with the data", f"{SPEC} § VFIO_USER_REGION_WRITE"),
    ("write_multi.count", "error", "wr_cnt exceeds the entries sent", f"{SPEC} § VFIO_USER_REGION_WRITE_MULTI"),
    ("write_multi.entry_count", "error", "write entry count over 8 bytes", f"{SPEC} § VFIO_USER_REGION_WRITE_MULTI"),
    ("write_multi.not_negotiated", "warning", "REGION_WRITE_MULTI to a server that did not state write_multiple", f"{SPEC} § VFIO_USER_VERSION"),
]

FIELDS = Fields()


@FIELDS.layer("region_info")
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


@FIELDS.layer("region_info.cap")
class RegionCap(Packet):
    name = "Region capability"
    fields_desc = [u16("id", values=REGION_CAPS), u16("version", 1),
                   u32("next", base="hex", label="Next capability")]


@FIELDS.layer("region_info.sparse")
class SparseMmap(Packet):
    name = "Sparse mmap areas"
    fields_desc = [u32("nr_areas", label="Number of areas"), u32("reserved")]


@FIELDS.layer("region_info.area")
class SparseArea(Packet):
    name = "mmap area"
    fields_desc = [u64("offset", base="hex"), u64("size", base="hex")]


@FIELDS.layer("region_info.type")
class RegionType(Packet):
    name = "Region type"
    fields_desc = [u32("type", base="hex"), u32("subtype", base="hex")]


@FIELDS.layer("region_io_fds")
class RegionIoFds(Packet):
    name = "DEVICE_GET_REGION_IO_FDS"
    fields_desc = [u32("argsz", 16), u32("flags", base="hex"),
                   u32("index", values=REGIONS, label="Region"), u32("count")]


@FIELDS.layer("region_io_fds.sub")
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


@FIELDS.layer("region_io_fds.sub")
class ShadowSubRegion(Packet):
    """libvfio-user's 48-byte ioeventfd with a shadow memory fd."""

    name = "Sub-region"
    fields_desc = [
        *SubRegion.fields_desc[:5],           # offset to flags, as the spec's
        u32("shadow_fd_index", label="Shadow memory fd index"),
        u64("shadow_offset", base="hex"),
        u64("datamatch", base="hex", label="Datamatch / user data"),
    ]


class RegionAccess(Packet):
    fields_desc = [u64("offset", base="hex"),
                   u32("region", values=REGIONS), u32("count"),
                   StrField("data", b"")]


@FIELDS.layer("region_read")
class RegionRead(RegionAccess):
    name = "REGION_READ"


@FIELDS.layer("region_write")
class RegionWrite(RegionAccess):
    name = "REGION_WRITE"


@FIELDS.layer("write_multi")
class WriteMulti(Packet):
    name = "REGION_WRITE_MULTI"
    fields_desc = [u64("wr_cnt", label="Write count")]


@FIELDS.layer("write_multi.entry")
class WriteMultiEntry(Packet):
    name = "Write"
    fields_desc = [u64("offset", base="hex"), u32("region", values=REGIONS),
                   u32("count"), raw("data", 8)]


FIELDS.field("region_read.data", "Data", BYTES)
FIELDS.field("region_write.data", "Data", BYTES)


# --- dissectors ---------------------------------------------------------------------

DISSECTORS = Dissectors()
# libvfio-user's client sends an argsz-sized buffer: padding, not an error.
DISSECTORS.declare("DEVICE_GET_REGION_INFO", REQUEST, Payload(
    RegionInfo, ends=False, argsz=REQUEST, zero=("flags", "cap_offset", "size", "offset"),
    info="{index:region} argsz={argsz}"))
REGION_INFO_REPLY = DISSECTORS.declare("DEVICE_GET_REGION_INFO", REPLY, Payload(
    RegionInfo, ends=False, argsz=REPLY, info="{index:region} size={size:#x} flags={flags:flags}"))
SPARSE_AREAS = DISSECTORS.part("SPARSE_AREAS", Payload(
    SparseMmap, Array(SparseArea, "nr_areas", "region_info.areas_short", beside=True),
    ends=False))
DISSECTORS.declare("DEVICE_GET_REGION_IO_FDS", REQUEST, Payload(
    RegionIoFds, argsz=REQUEST, zero=("flags", "count"), info="{index:region}"))
IO_FDS_REPLY = DISSECTORS.declare("DEVICE_GET_REGION_IO_FDS", REPLY, Payload(
    RegionIoFds, ends=False, argsz=REPLY, zero=("flags",), info="{index:region} {count} sub-regions"))


@DISSECTORS.reply("DEVICE_GET_REGION_INFO", fds=REGION_MMAP)
def _region_info_reply(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
    walked = walk(tree, msg, off, REGION_INFO_REPLY)
    node, v = walked.node, walked.values
    if not walked.whole:
        return ""
    payload_len = len(msg) - off
    name = region_name(v["index"])
    info = render_info(REGION_INFO_REPLY, v)
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
            end = max(end, walk(tree, msg, body, SPARSE_AREAS, node).end)
        elif cap["id"] == 2:
            add_layer(tree, RegionType, msg, body, node)
            end = max(end, body + RegionType.vfu_compiled.size)
        else:
            tree.expert("region_info.cap_unknown", f"unknown region capability {cap['id']}")
            end = max(end, body)
        offset = cap["next"]
    return min(end, len(msg))


@DISSECTORS.reply("DEVICE_GET_REGION_IO_FDS", fds=IOEVENTFDS)
def _io_fds_reply(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
    walked = walk(tree, msg, off, IO_FDS_REPLY)
    node, v = walked.node, walked.values
    if not walked.whole:
        return ""
    start, header = off + RegionIoFds.vfu_compiled.size, RegionIoFds.vfu_compiled.size
    info = render_info(IO_FDS_REPLY, v)
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


def _region_access(cls: type[Packet], kind: str, with_data: bool) -> Dissector:
    """REGION_READ or _WRITE's request or reply: the access, and the data it carries."""
    prefix = cls.vfu_field.name
    payload = DISSECTORS.declare(cls.vfu_name, kind, Payload(
        cls, Rest(f"{prefix}.data", "count", f"{prefix}.count") if with_data else None,
        wraps=("offset", "count") if kind == REQUEST else None, label=cls.vfu_name,
        info="{region:region} offset={offset:#x} count={count}"))

    def fn(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
        v = walk(tree, msg, off, payload).values
        if "count" not in v:
            return ""
        data = off + cls.vfu_compiled.size
        info = render_info(payload, v)
        if with_data and v["count"] <= 8 and len(msg) - data == v["count"]:
            info += f" data={_le_value(msg[data:])}"
        return info

    return fn


def _le_value(data: bytes) -> str:
    return f"{int.from_bytes(data, 'little'):#0{2 + 2 * len(data)}x}"


DISSECTORS.requests[CMD["REGION_READ"]] = _region_access(RegionRead, REQUEST, with_data=False)
DISSECTORS.replies[CMD["REGION_READ"]] = _region_access(RegionRead, REPLY, with_data=True)
DISSECTORS.requests[CMD["REGION_WRITE"]] = _region_access(RegionWrite, REQUEST, with_data=True)
DISSECTORS.replies[CMD["REGION_WRITE"]] = _region_access(RegionWrite, REPLY, with_data=False)
WRITE_MULTI_REQUEST = DISSECTORS.declare("REGION_WRITE_MULTI", REQUEST, Payload(
    WriteMulti, ends=False, info="{wr_cnt} writes"))
DISSECTORS.declare("REGION_WRITE_MULTI", REPLY, Payload(WriteMulti, info="{wr_cnt} completed"))


@DISSECTORS.request("REGION_WRITE_MULTI")
def _write_multi(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
    walked = walk(tree, msg, off, WRITE_MULTI_REQUEST)
    node, v = walked.node, walked.values
    if not walked.whole:
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
    return render_info(WRITE_MULTI_REQUEST, v)


# --- the session -----------------------------------------------------------------------

SESSION = SessionRules(
    must_refuse={"region.unknown", "region.out_of_bounds", "region.access_flags"},
    argsz_bounded=("DEVICE_GET_REGION_INFO", "DEVICE_GET_REGION_IO_FDS"),
    echoes={"DEVICE_GET_REGION_INFO": echoed_fields("region_info", ("index",)),
            "DEVICE_GET_REGION_IO_FDS": echoed_fields("region_io_fds", ("index",)),
            "REGION_READ": echoed_fields("region_read", ("offset", "region")),
            "REGION_WRITE": echoed_fields("region_write", ("offset", "region"))})


@dataclass(slots=True)
class RegionState:
    index: int
    size: int
    flags: int
    offset: int
    fd: str
    areas: list[tuple[int, int]] = field(default_factory=list)
    caps: list[str] = field(default_factory=list)
    io_fds: list[str] = field(default_factory=list)


SESSION.table("regions", dict)           # RegionState by index
SESSION.table("config", ConfigShadow)    # the config space bytes reads have shown


@SESSION.section("Regions")
def _region_lines(state: ConnState) -> list[str]:
    lines = []
    for r in sorted(state.regions.values(), key=lambda r: r.index):
        line = (f"{region_name(r.index)}: size {r.size:#x} "
                f"flags {bit_letters(r.flags, 'RWMC')} fd {r.fd}")
        if r.areas:
            line += " mmap " + ", ".join(f"{o:#x}+{s:#x}" for o, s in r.areas)
        if r.caps:
            line += " caps " + ",".join(r.caps)
        lines.append(line)
        lines.extend(f"    io fd: {text}" for text in r.io_fds)
    return lines or ["none described"]


REGION_READ_FLAG, REGION_WRITE_FLAG = REGION_FLAGS["read"], REGION_FLAGS["write"]


@SESSION.on_command("REGION_READ", "REGION_WRITE")
def _region_access_request(state: ConnState, p: Dissected) -> dict[str, Any]:
    write = p.header.cmd == CMD["REGION_WRITE"]
    prefix = "region_write" if write else "region_read"
    v = p.tree.prefixed(prefix)
    if "count" in v:
        _check_region_access(state, p, v["region"], v["offset"], v["count"], write)
        if write:
            _device_access(state, p, prefix, write=True)
    return v                                    # what the reply echoes


@SESSION.on_command("REGION_WRITE_MULTI")
def _write_multi_request(state: ConnState, p: Dissected) -> None:
    if state.server_version is not None and not state.cap(state.server_caps, "write_multiple"):
        p.tree.expert("write_multi.not_negotiated",
                      "the server's VERSION reply did not state write_multiple: true")
    for entry in p.tree.children_of("write_multi.entry"):
        if "count" in entry:
            _check_region_access(state, p, entry["region"], entry["offset"], entry["count"],
                                 write=True)


def _check_region_access(state: ConnState, p: Dissected, index: int, offset: int,
                         count: int, write: bool) -> None:
    tree, name = p.tree, region_name(index)
    if state.device and index >= state.device["num_regions"]:
        tree.expert("region.unknown", f"{name}: the device reported "
                    f"{state.device['num_regions']} regions")
    region = state.regions.get(index)
    if region is not None:
        if offset + count > region.size:
            tree.expert("region.out_of_bounds", f"{name} {offset:#x}+{count:#x} is beyond "
                        f"its size {region.size:#x}")
        needed = REGION_WRITE_FLAG if write else REGION_READ_FLAG
        if not region.flags & needed:
            tree.expert("region.access_flags", f"{'write to' if write else 'read of'} {name}, "
                        f"whose flags {bit_letters(region.flags, 'RWMC')} forbid it")
    check_xfer(state, tree, C2S, count)


def _device_access(state: ConnState, p: Dissected, prefix: str, write: bool) -> None:
    """Hand the data of a region access to the device layer that knows it."""
    v = p.tree.prefixed(prefix)
    data = p.tree.find(f"{prefix}.data")
    if data is None or "region" not in v:
        return
    _, value, offset, length, _ = data
    if v["region"] == CONFIG_REGION:
        note = dissect_config_access(p.tree, state.config, v["offset"], value, offset, write)
        if note:
            p.tree.info += f"  {note}"
        return
    device = device_for(state.config.identity)
    registers = device.regions.get(v["region"]) if device else None
    if registers is not None:
        node = p.tree.add(registers.vfu_field, None, offset, length,
                          text=f"{device.name}, {region_name(v['region'])}")
        add_registers(p.tree, node, registers, 0, v["offset"], value, offset)


@SESSION.on_command("DEVICE_GET_REGION_INFO", "DEVICE_GET_REGION_IO_FDS")
def _indexed_request(state: ConnState, p: Dissected) -> dict[str, Any]:
    prefix = ("region_info" if p.header.cmd == CMD["DEVICE_GET_REGION_INFO"]
              else "region_io_fds")
    return p.tree.prefixed(prefix)              # what the reply echoes


@SESSION.on_reply("DEVICE_GET_REGION_INFO")
def _apply_region_info_reply(state: ConnState, p: Dissected, request: Pending) -> None:
    v = p.tree.prefixed("region_info")
    if "offset" not in v or any(e.id == "argsz.truncated" for e in p.tree.experts):
        return                      # truncated: the client asks again with a larger argsz
    region = RegionState(v["index"], v["size"], v["flags"], v["offset"], describe_fd(p.msg.fds))
    region.areas = [(a["offset"], a["size"]) for a in p.tree.children_of("region_info.area")]
    region.caps = [REGION_CAPS.get(c["id"], str(c["id"]))
                   for c in p.tree.children_of("region_info.cap") if "id" in c]
    old = state.regions.get(region.index)
    if old is not None:
        region.io_fds = old.io_fds
    state.regions[region.index] = region


@SESSION.on_reply("DEVICE_GET_REGION_IO_FDS")
def _apply_io_fds_reply(state: ConnState, p: Dissected, request: Pending) -> None:
    index = request.values.get("index")
    region = state.regions.get(index)
    if region is None:
        region = state.regions[index] = RegionState(index, 0, 0, 0, "none")
    region.io_fds = [f"{s['offset']:#x}+{s['size']:#x} {IO_FD_TYPES.get(s['type'], s['type'])}"
                     f" fd {describe_fd(p.msg.fds, s['fd_index'])} datamatch {s['datamatch']:#x}"
                     for s in p.tree.children_of("region_io_fds.sub") if "datamatch" in s]


@SESSION.on_reply("REGION_READ")
def _region_read_reply(state: ConnState, p: Dissected, request: Pending) -> None:
    _device_access(state, p, "region_read", write=False)


# --- for the statistics ---------------------------------------------------------------

# The requests that write device memory, by the layer whose region and offset
# say where (`-z irq` times a write to a BAR until the next interrupt).
MMIO_WRITES = {CMD["REGION_WRITE"]: "region_write", CMD["REGION_WRITE_MULTI"]: "write_multi.entry"}
