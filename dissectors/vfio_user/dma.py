"""DMA: the client's DMA_MAP and DMA_UNMAP, the server's DMA_READ and DMA_WRITE,
and the dirty bitmaps of DMA memory.

Their layers (QEMU's DMA_READ/WRITE layout beside the spec's), their
dissectors and checks, and the session side: the map table each request
changes ahead of its reply (overlaps, unknown unmaps, accesses outside every
map), and the dirty bitmap sizes DMA_UNMAP and DMA_LOGGING_REPORT share.
"""

from __future__ import annotations

import bisect
import errno
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from scapy.fields import StrField
from scapy.packet import Packet

from vfu_inspect.fields import BYTES, Fields, bits32, u32, u64
from vfu_inspect.records import S2C
from vfu_inspect.tree import Tree

from .core import (
    DMA_MEMORY, EXACT, FACTS, LVU, REPLY, REQUEST, SPEC, Context, Dissector, Dissectors, Payload,
    Rest, add_bytes, add_layer, bit_letters, check_range, check_request_argsz, expect_end, fd_text,
    render_info, walk)
from .protocol import (
    CMD, DMA_MAP_FLAGS, DMA_UNMAP_FLAGS, HEADER_SIZE, MAX_BITMAP_SIZE, SPEC_DMA_MAP_FLAGS)
from .state import (
    Conflict, ConnState, Effect, EffectKind, Pending, SessionRules, check_xfer,
    describe_fd, echoed_fields, raise_conflict)

if TYPE_CHECKING:
    from vfu_inspect.packet import Dissected

CHECKS: list[tuple[str, ...]] = [
    # DMA_MAP and DMA_UNMAP
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
    # dirty bitmaps
    ("dma_unmap.bitmap_size", "error", "DMA_UNMAP dirty bitmap size disagrees with its header, range or page size", f"{LVU} (GET_DIRTY_BITMAP; not in the spec)"),
    ("dma_logging.not_started", "warning", "DMA_LOGGING_REPORT, or a DMA_UNMAP dirty bitmap, while dirty logging is off", f"{SPEC} § VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT"),
    ("dirty.bitmap_too_big", "note", "dirty bitmap over the client's migration.max_bitmap_size", f"{FACTS} § 1 VERSION (migration is not in the spec)",
     "QEMU 10.2.2 and libvfio-user negotiate max_bitmap_size; libvfio-user issue 469"),
    # DMA_READ and DMA_WRITE, the server's commands
    ("dma.access_unmapped", "warning", "DMA_READ/WRITE outside every live map", f"{SPEC} § VFIO_USER_DMA_READ"),
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
]

FIELDS = Fields()


@FIELDS.layer("dma_map")
class DmaMap(Packet):
    name = "DMA_MAP"
    fields_desc = [
        u32("argsz", 32),
        bits32("flags", DMA_MAP_FLAGS),
        u64("offset", base="hex", label="File offset"),
        u64("address", base="hex", label="IOVA"),
        u64("size", base="hex"),
    ]


@FIELDS.layer("dma_unmap")
class DmaUnmap(Packet):
    name = "DMA_UNMAP"
    fields_desc = [
        u32("argsz", 24),
        bits32("flags", DMA_UNMAP_FLAGS),
        u64("address", base="hex", label="IOVA"),
        u64("size", base="hex"),
    ]


@FIELDS.layer("dma_unmap.bitmap")
class DirtyBitmap(Packet):
    name = "Dirty bitmap"
    fields_desc = [u64("pgsize", base="hex", label="Page size"),
                   u64("size", label="Bitmap size"), StrField("data", b"")]


class DmaAccess(Packet):
    """Spec layout of DMA_READ/DMA_WRITE: address u64, count u64, data."""

    fields_desc = [u64("address", base="hex"), u64("count"),
                   StrField("data", b"")]


class QemuDmaAccess(Packet):
    """QEMU 10.2's layout: address u64, count u32, data at 12."""

    fields_desc = [u64("address", base="hex"), u32("count"),
                   StrField("data", b"")]


@FIELDS.layer("dma_read")
class DmaRead(DmaAccess):
    name = "DMA_READ"


@FIELDS.layer("dma_write")
class DmaWrite(DmaAccess):
    name = "DMA_WRITE"


@FIELDS.layer("dma_read")
class QemuDmaRead(QemuDmaAccess):
    name = "DMA_READ"


@FIELDS.layer("dma_write")
class QemuDmaWrite(QemuDmaAccess):
    name = "DMA_WRITE"


FIELDS.field("dma_unmap.bitmap.data", "Dirty bitmap", BYTES)
FIELDS.field("dma_read.data", "Data", BYTES)
FIELDS.field("dma_write.data", "Data", BYTES)


# --- dissectors ---------------------------------------------------------------------

DISSECTORS = Dissectors()
DMA_MAP_REQUEST = DISSECTORS.declare("DMA_MAP", REQUEST, Payload(
    DmaMap, argsz=EXACT, info="iova={address:#x} size={size:#x}"))
# the dirty bitmap that GET_DIRTY_BITMAP adds is walked by hand
DMA_UNMAP = DISSECTORS.declare("DMA_UNMAP", REQUEST, Payload(
    DmaUnmap, ends=False, info="iova={address:#x} size={size:#x}"))
DISSECTORS.declare("DMA_UNMAP", REPLY, DMA_UNMAP)


@DISSECTORS.request("DMA_MAP", fds=DMA_MEMORY)
def _dma_map(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
    v = walk(tree, msg, off, DMA_MAP_REQUEST).values
    if "size" not in v:
        return ""
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
    return (f"{render_info(DMA_MAP_REQUEST, v)} prot={prot or '-'} fd={fd_text(ctx)}"
            + (f" offset={v['offset']:#x}" if ctx.fds else ""))


DISSECTORS.bare("DMA_MAP", "reply")


@DISSECTORS.request("DMA_UNMAP")
@DISSECTORS.reply("DMA_UNMAP")
def _dma_unmap(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
    walked = walk(tree, msg, off, DMA_UNMAP)
    node, v = walked.node, walked.values
    if not walked.whole:
        return ""
    end = off + DmaUnmap.vfu_compiled.size
    info = render_info(DMA_UNMAP, v)
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


def _dma_access(spec: type[Packet], qemu: type[Packet], data_in_request: bool,
                data_in_reply: bool) -> Dissector:
    """DMA_READ/DMA_WRITE: the declared request, and the reply's dissector,
    which decodes QEMU's layout where the bytes show it (chosen by hand)."""
    prefix = spec.vfu_field.name
    DISSECTORS.declare(spec.vfu_name, REQUEST, Payload(
        spec, Rest(f"{prefix}.data", "count", f"{prefix}.count") if data_in_request else None,
        wraps=("address", "count"), label=spec.vfu_name, info="addr={address:#x} count={count}"))

    def body(tree: Tree, msg: bytes, off: int, layout: type[Packet],
             with_data: bool) -> dict[str, int]:
        node, v = add_layer(tree, layout, msg, off)
        data = off + layout.vfu_compiled.size
        if with_data and "count" in v:
            add_bytes(tree, f"{prefix}.data", msg, data, len(msg), node)
        else:
            expect_end(tree, msg, data, spec.vfu_name)
        return v

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

    return on_reply


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


DISSECTORS.replies[CMD["DMA_READ"]] = _dma_access(
    DmaRead, QemuDmaRead, data_in_request=False, data_in_reply=True)
DISSECTORS.replies[CMD["DMA_WRITE"]] = _dma_access(
    DmaWrite, QemuDmaWrite, data_in_request=True, data_in_reply=False)


def bitmap_bytes(length: int, page: int) -> int:
    """Size of a dirty bitmap: one bit per page, in whole u64 words."""
    pages = -(-length // page)
    return -(-pages // 64) * 8


# --- the session -----------------------------------------------------------------------

# The expert items whose message shows its client uses QEMU's DMA layout.
QEMU_DMA_SIGNS = {"interop.dma_write_bare_reply": "a bare DMA_WRITE reply",
                  "interop.dma_qemu_layout": "a DMA_READ reply in QEMU's layout"}

SESSION = SessionRules(
    must_refuse={"dma.overlap", "dma.unmap_unknown", "dma.too_many", "dma.access_unmapped",
                 "dma_logging.not_started"},
    refusal_errno={"dma.overlap": ("dma.overlap_errno", errno.EEXIST)},
    argsz_bounded=("DMA_UNMAP",),
    echoes={"DMA_UNMAP": echoed_fields("dma_unmap", ("address", "size"))})


@dataclass(slots=True)
class DmaMapping:
    iova: int
    size: int
    offset: int
    flags: int
    fd: str               # what was passed: "memfd 0x10000 inode 12", or "none"
    number: int           # the DMA_MAP request that made it

    @property
    def end(self) -> int:
        return self.iova + self.size


class DmaMaps:
    """A connection's DMA maps by iova, their starts sorted for lookups."""

    def __init__(self) -> None:
        self.by_iova: dict[int, DmaMapping] = {}
        self.starts: list[int] = []

    def __len__(self) -> int:
        return len(self.by_iova)

    def __iter__(self) -> Iterator[DmaMapping]:
        return (self.by_iova[iova] for iova in self.starts)

    def get(self, iova: int) -> DmaMapping | None:
        return self.by_iova.get(iova)

    def overlapping(self, iova: int, size: int) -> DmaMapping | None:
        i = bisect.bisect_left(self.starts, iova + size)
        if i and self.by_iova[self.starts[i - 1]].end > iova:
            return self.by_iova[self.starts[i - 1]]
        return None

    def containing(self, addr: int, count: int) -> DmaMapping | None:
        i = bisect.bisect_right(self.starts, addr)
        if i:
            m = self.by_iova[self.starts[i - 1]]
            if addr + count <= m.end:
                return m
        return None

    def add(self, m: DmaMapping) -> None:
        if m.iova not in self.by_iova:
            bisect.insort(self.starts, m.iova)
        self.by_iova[m.iova] = m

    def remove(self, iova: int) -> None:
        del self.by_iova[iova]
        self.starts.remove(iova)

    def clear(self) -> None:
        self.by_iova.clear()
        self.starts.clear()


SESSION.table("maps", DmaMaps)


@SESSION.section("DMA maps")
def _map_lines(state: ConnState) -> list[str]:
    awaiting = {e.number for e in state.effects if not e.answered}
    return [f"{m.iova:#014x}-{m.end - 1:#014x} size {m.size:#x} "
            f"{bit_letters(m.flags, 'RW')} fd {m.fd} offset {m.offset:#x} (frame {m.number}"
            + (", in flight: no reply yet)" if m.number in awaiting else ")")
            for m in state.maps] or ["none"]


@SESSION.on_command("DMA_MAP")
def _dma_map_request(state: ConnState, p: Dissected) -> dict[str, Any] | None:
    v = p.tree.prefixed("dma_map")
    if "size" not in v:
        return None
    raise_conflict(p.tree, _map_conflict(state, v))
    page = state.page_size
    bad = [name for name in ("address", "size", "offset") if v[name] % page]
    if bad:
        p.tree.expert("dma.misaligned", f"{', '.join(bad)} not a multiple of the "
                      f"{page:#x}-byte page size")
    if state.server_version is not None:
        limit = state.cap(state.server_caps, "max_dma_maps")
        if len(state.maps) >= limit:
            p.tree.expert("dma.too_many", f"{len(state.maps)} maps live, max_dma_maps is {limit}")
    return v


@SESSION.on_command("DMA_UNMAP")
def _dma_unmap_request(state: ConnState, p: Dissected) -> dict[str, Any] | None:
    v = p.tree.prefixed("dma_unmap")
    if "size" not in v:
        return None
    raise_conflict(p.tree, _unmap_conflict(state, v))
    bitmap = p.tree.prefixed("dma_unmap.bitmap")
    if "size" in bitmap and bitmap.get("pgsize"):
        _check_bitmap(state, p.tree, v["size"], bitmap["pgsize"], bitmap["size"],
                      "dma_unmap.bitmap_size")
        check_logging_on(state, p.tree, "DMA_UNMAP with GET_DIRTY_BITMAP")
    return v


def _check_bitmap(state: ConnState, tree: Tree, length: int, page: int, size: int,
                  mismatch_id: str) -> None:
    want = bitmap_bytes(length, page)
    if size != want:
        tree.expert(mismatch_id, f"bitmap of {size} bytes for {length:#x} bytes of "
                    f"{page:#x}-byte pages: {want} expected")
    check_bitmap_limit(state, tree, length, page)


def check_bitmap_limit(state: ConnState, tree: Tree, length: int, page: int) -> None:
    want = bitmap_bytes(length, page)
    limit = state.cap(state.client_caps, "migration.max_bitmap_size") or MAX_BITMAP_SIZE
    if want > limit:
        tree.expert("dirty.bitmap_too_big", f"{length:#x} bytes of {page:#x}-byte pages need "
                    f"a {want}-byte bitmap, max_bitmap_size is {limit}")


@SESSION.on_command("DMA_READ", "DMA_WRITE")
def _server_dma_request(state: ConnState, p: Dissected) -> None:
    prefix = "dma_read" if p.header.cmd == CMD["DMA_READ"] else "dma_write"
    v = p.tree.prefixed(prefix)
    if "count" not in v or p.msg.direction != S2C:
        return
    if state.maps.containing(v["address"], v["count"]) is None:
        p.tree.expert("dma.access_unmapped",
                      f"{v['address']:#x}+{v['count']:#x} is outside every live DMA map")
    check_xfer(state, p.tree, S2C, v["count"])


def check_logging_on(state: ConnState, tree: Tree, what: str) -> None:
    if state.logging is None:
        tree.expert("dma_logging.not_started", f"{what} while dirty logging is off "
                    "(no DMA_LOGGING_START is in effect)")


@SESSION.on_reply("DMA_READ", "DMA_WRITE")
def _server_dma_reply(state: ConnState, p: Dissected, request: Pending) -> None:
    """Remember a reply in QEMU's layout: the client's next ones are too."""
    shown = next((e.id for e in p.tree.experts if e.id in QEMU_DMA_SIGNS), None)
    if shown and state.qemu_dma is None:
        state.qemu_dma = f"frame {p.number}, {QEMU_DMA_SIGNS[shown]}, was QEMU's"


def _map_conflict(state: ConnState, v: dict[str, Any]) -> Conflict:
    old = state.maps.overlapping(v["address"], v["size"])
    if old is None:
        return None
    return ("dma.overlap", f"{v['address']:#x}+{v['size']:#x} overlaps the map "
                           f"{old.iova:#x}+{old.size:#x} of frame {old.number}")


def _map_apply(state: ConnState, e: Effect) -> DmaMapping | None:
    v = e.values
    replaced = state.maps.get(v["address"])
    state.maps.add(DmaMapping(v["address"], v["size"], v["offset"], v["flags"],
                             describe_fd(e.fds), e.number))
    return replaced


def _map_undo(state: ConnState, e: Effect) -> None:
    state.maps.remove(e.values["address"])
    if e.saved is not None:
        state.maps.add(e.saved)


def _unmap_conflict(state: ConnState, v: dict[str, Any]) -> Conflict:
    if v["flags"] & DMA_UNMAP_FLAGS["all"]:
        return None
    m = state.maps.get(v["address"])
    if m is not None and m.size == v["size"]:
        return None
    return ("dma.unmap_unknown", f"{v['address']:#x}+{v['size']:#x} is not a live map"
                                 + (f" (the map there is {m.size:#x} bytes)" if m else ""))


def _unmap_apply(state: ConnState, e: Effect) -> list[DmaMapping]:
    if e.values["flags"] & DMA_UNMAP_FLAGS["all"]:
        removed = list(state.maps)
        state.maps.clear()
        return removed
    m = state.maps.get(e.values["address"])
    if m is None:
        return []
    state.maps.remove(m.iova)
    return [m]


def _unmap_undo(state: ConnState, e: Effect) -> None:
    for m in e.saved:
        state.maps.add(m)


SESSION.effect("DMA_MAP", EffectKind(_map_apply, _map_undo,
                                     lambda v: f"map {v['address']:#x}+{v['size']:#x}",
                                     _map_conflict))
SESSION.effect("DMA_UNMAP", EffectKind(
    _unmap_apply, _unmap_undo,
    lambda v: "unmap all" if v["flags"] & DMA_UNMAP_FLAGS["all"]
    else f"unmap {v['address']:#x}+{v['size']:#x}", _unmap_conflict))
