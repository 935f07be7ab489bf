"""IRQs: DEVICE_GET_IRQ_INFO and DEVICE_SET_IRQS.

Their layers, dissectors and checks (exactly one data type and action, the
eventfds a SET_IRQS carries), and the session side: each IRQ index's count
and flags, and the eventfds, masks and triggers SET_IRQS applies ahead of
its reply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from scapy.fields import StrField
from scapy.packet import Packet

from vfu_inspect.fields import BYTES, UINT, Fields, bits32, u32
from vfu_inspect.tree import Tree

from .core import (
    FACTS, IRQ_EVENTFDS, REPLY, REQUEST, SPEC, Context, Dissectors, Payload, add_bytes,
    check_range, expect_end, walk)
from .protocol import (
    IRQ_INFO_FLAGS, IRQS, SET_IRQS_ACTION, SET_IRQS_DATA, SET_IRQS_FLAGS, irq_name)
from .state import ConnState, Effect, EffectKind, Pending, SessionRules, echoed_fields

if TYPE_CHECKING:
    from vfu_inspect.packet import Dissected

CHECKS: list[tuple[str, ...]] = [
    ("set_irqs.flags", "error", "SET_IRQS needs exactly one data type and one action", f"{SPEC} § VFIO_USER_DEVICE_SET_IRQS"),
    ("set_irqs.bool_count", "error", "DATA_BOOL bytes disagree with count", f"{SPEC} § VFIO_USER_DEVICE_SET_IRQS"),
    ("set_irqs.fd_count", "warning", "eventfd count disagrees with count", f"{SPEC} § VFIO_USER_DEVICE_SET_IRQS"),
    ("set_irqs.count_zero", "note", "SET_IRQS count 0 other than start 0 with DATA_NONE|TRIGGER", f"{SPEC} § VFIO_USER_DEVICE_SET_IRQS",
     "the spec's disable-all case names DATA_NONE and no action; libvfio-user and Linux VFIO accept it only with TRIGGER and refuse the others (EINVAL)"),
    ("irq.unknown", "warning", "SET_IRQS or GET_IRQ_INFO of an index beyond the device's num_irqs", f"{SPEC} § VFIO_USER_DEVICE_GET_INFO"),
    ("irq.out_of_range", "warning", "SET_IRQS beyond the index's count", f"{SPEC} § VFIO_USER_DEVICE_SET_IRQS"),
    ("irq.action_unsupported", "warning", "SET_IRQS MASK/UNMASK on an index without MASKABLE, or eventfds for one without EVENTFD", f"{SPEC} § VFIO_USER_DEVICE_GET_IRQ_INFO; § VFIO_USER_DEVICE_SET_IRQS"),
    ("interop.irq_mask_eventfd", "note", "SET_IRQS MASK/UNMASK with eventfds", f"{SPEC} § VFIO_USER_DEVICE_SET_IRQS; {FACTS} § 8",
     "libvfio-user closes them (\"closing unexpected fd\") and replies success: no mask event is ever signalled; QEMU 10.2.2 sends its INTx resample fd so"),
]

FIELDS = Fields()


@FIELDS.layer("irq_info")
class IrqInfo(Packet):
    name = "DEVICE_GET_IRQ_INFO"
    fields_desc = [u32("argsz", 16), bits32("flags", IRQ_INFO_FLAGS),
                   u32("index", values=IRQS, label="IRQ index"), u32("count")]


@FIELDS.layer("set_irqs")
class SetIrqs(Packet):
    name = "DEVICE_SET_IRQS"
    fields_desc = [u32("argsz", 20), bits32("flags", SET_IRQS_FLAGS),
                   u32("index", values=IRQS, label="IRQ index"),
                   u32("start"), u32("count"), StrField("data", b"")]


FIELDS.field("set_irqs.data", "Data", BYTES)
FIELDS.field("set_irqs.bool", "Bool", UINT)


# --- dissectors ---------------------------------------------------------------------

DISSECTORS = Dissectors()
DISSECTORS.declare("DEVICE_GET_IRQ_INFO", REQUEST, Payload(
    IrqInfo, argsz=REQUEST, zero=("flags", "count"), info="{index:irq}"))
DISSECTORS.declare("DEVICE_GET_IRQ_INFO", REPLY, Payload(
    IrqInfo, argsz=REPLY, info="{index:irq} count={count} flags={flags:flags}"))
SET_IRQS_REQUEST = DISSECTORS.declare("DEVICE_SET_IRQS", REQUEST, Payload(SetIrqs, ends=False))


@DISSECTORS.request("DEVICE_SET_IRQS", fds=IRQ_EVENTFDS)
def _set_irqs(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
    walked = walk(tree, msg, off, SET_IRQS_REQUEST)
    node, v = walked.node, walked.values
    if not walked.whole:
        return ""
    data = off + SetIrqs.vfu_compiled.size
    flags, count, start = v["flags"], v["count"], v["start"]
    kind, action = flags & SET_IRQS_DATA, flags & SET_IRQS_ACTION
    if kind not in (0x1, 0x2, 0x4) or action not in (0x8, 0x10, 0x20):
        tree.expert("set_irqs.flags",
                    f"flags {flags:#x}: exactly one data type and one action must be set")
    irq = irq_name(v["index"])
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


# --- the session -----------------------------------------------------------------------

SESSION = SessionRules(
    must_refuse={"irq.unknown", "irq.out_of_range"}, argsz_bounded=("DEVICE_GET_IRQ_INFO",),
    echoes={"DEVICE_GET_IRQ_INFO": echoed_fields("irq_info", ("index",))})
SET_IRQS, IRQ_INFO = SET_IRQS_FLAGS, IRQ_INFO_FLAGS
MAX_IRQ_VECTORS = 2048      # PCI's MSI-X table limit


@dataclass(slots=True)
class IrqState:
    index: int
    count: int | None = None
    flags: int = 0
    eventfds: set[int] = field(default_factory=set)
    masked: set[int] = field(default_factory=set)
    triggers: int = 0


SESSION.table("irqs", dict)              # IrqState by index


@SESSION.section("IRQs")
def _irq_lines(state: ConnState) -> list[str]:
    lines = []
    for irq in sorted(state.irqs.values(), key=lambda i: i.index):
        count = "?" if irq.count is None else irq.count
        lines.append(f"{irq_name(irq.index)}: count {count}, "
                     f"eventfds {_ranges(irq.eventfds)}, masked {_ranges(irq.masked)}, "
                     f"{irq.triggers} triggers")
    return lines or ["none described"]


def _ranges(numbers: set[int]) -> str:
    """{0, 1, 2, 5} -> '0-2,5'."""
    if not numbers:
        return "none"
    out, start, prev = [], None, None
    for n in sorted(numbers) + [None]:
        if start is not None and n != prev + 1:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = None
        if start is None:
            start = n
        prev = n
    return ",".join(out)


@SESSION.on_command("DEVICE_GET_IRQ_INFO")
def _irq_info_request_check(state: ConnState, p: Dissected) -> dict[str, Any]:
    v = p.tree.prefixed("irq_info")
    if "index" in v:
        _check_irq_index(state, p.tree, v["index"])
    return v                                    # what the reply echoes


def _check_irq_index(state: ConnState, tree: Tree, index: int) -> None:
    if state.device is not None and index >= state.device["num_irqs"]:
        tree.expert("irq.unknown", f"IRQ index {index}: the device reported "
                    f"{state.device['num_irqs']} IRQ types")


@SESSION.on_command("DEVICE_SET_IRQS")
def _set_irqs_request(state: ConnState, p: Dissected) -> dict[str, Any] | None:
    v = p.tree.prefixed("set_irqs")
    if "count" not in v:
        return None
    _check_irq_index(state, p.tree, v["index"])
    irq = state.irqs.get(v["index"])
    if irq is not None and irq.count is not None and v["start"] + v["count"] > irq.count:
        p.tree.expert("irq.out_of_range", f"{irq_name(irq.index)} "
                      f"{v['start']}+{v['count']} beyond its {irq.count} vectors")
    if irq is not None and irq.count is not None:
        _check_irq_action(p.tree, irq, v["flags"], bool(p.msg.fds))
    data = p.tree.find("set_irqs.data")
    v["bools"] = data[1] if data is not None else b""
    return v


def _check_irq_action(tree: Tree, irq: IrqState, flags: int, with_fds: bool) -> None:
    """What GET_IRQ_INFO said the index supports."""
    name = irq_name(irq.index)
    if flags & (SET_IRQS["mask"] | SET_IRQS["unmask"]) and not irq.flags & IRQ_INFO["maskable"]:
        tree.expert("irq.action_unsupported", f"{'MASK' if flags & SET_IRQS['mask'] else 'UNMASK'}"
                    f" of {name}, whose GET_IRQ_INFO flags {irq.flags:#x} lack MASKABLE")
    elif flags & SET_IRQS["data_eventfd"] and with_fds and not irq.flags & IRQ_INFO["eventfd"]:
        tree.expert("irq.action_unsupported", f"eventfds for {name}, whose GET_IRQ_INFO flags "
                    f"{irq.flags:#x} lack EVENTFD")


@SESSION.on_reply("DEVICE_GET_IRQ_INFO")
def _apply_irq_info_reply(state: ConnState, p: Dissected, request: Pending) -> None:
    v = p.tree.prefixed("irq_info")
    if "count" in v:
        irq = state.irqs.setdefault(v["index"], IrqState(v["index"]))
        irq.count, irq.flags = v["count"], v["flags"]


def _irqs_apply(state: ConnState, e: Effect) -> IrqState | None:
    v = e.values
    old = state.irqs.get(v["index"])
    irq = state.irqs[v["index"]] = (IrqState(v["index"]) if old is None else IrqState(
        old.index, old.count, old.flags, set(old.eventfds), set(old.masked), old.triggers))
    # Vectors beyond the index's count (or PCI's MSI-X limit while it is not
    # known) do not exist: a count of 0xffffffff must not build a set of them.
    limit = irq.count if irq.count is not None else MAX_IRQ_VECTORS
    flags, vectors = v["flags"], range(v["start"], min(v["start"] + v["count"], limit))
    if flags & SET_IRQS["data_bool"]:
        vectors = [vector for vector, b in zip(vectors, v["bools"]) if b]
    if flags & SET_IRQS["trigger"]:
        if flags & SET_IRQS["data_eventfd"]:
            # count eventfds assign vectors; no fds (all -1) de-assign them
            (irq.eventfds.update if e.fds else irq.eventfds.difference_update)(vectors)
        elif flags & SET_IRQS["data_none"] and v["count"] == 0:
            irq.eventfds.clear()             # count 0: disable the whole index
        else:
            irq.triggers += len(vectors)
    elif flags & SET_IRQS["mask"]:
        irq.masked.update(vectors)
    elif flags & SET_IRQS["unmask"] and not flags & SET_IRQS["data_eventfd"]:
        irq.masked.difference_update(vectors)
    return old


def _irqs_undo(state: ConnState, e: Effect) -> None:
    if e.saved is None:
        del state.irqs[e.values["index"]]
    else:
        state.irqs[e.values["index"]] = e.saved


def _irqs_text(v: dict[str, Any]) -> str:
    actions = [name for name in ("mask", "unmask", "trigger") if v["flags"] & SET_IRQS[name]]
    data = [name[5:] for name in ("data_none", "data_bool", "data_eventfd")
            if v["flags"] & SET_IRQS[name]]
    return (f"{irq_name(v['index'])} {v['start']}+{v['count']} "
            f"{'|'.join(actions + data)}")


SESSION.effect("DEVICE_SET_IRQS", EffectKind(_irqs_apply, _irqs_undo, _irqs_text))
