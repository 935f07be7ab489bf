"""The header and framing: what every message has, whatever its command.

The header layer and what its flags say (HeaderInfo, parse_header), the
checks of the header itself, the fd items of the detail tree, and the checks
no one command owns (framing, request/reply pairing, fds where a message
carries none, argsz, ranges, the tool's own) with their fields.
"""

from __future__ import annotations

import struct

from scapy.packet import Packet

from vfu_inspect.fields import BYTES, FLOAT, FRAME, STRING, Fields, bits32, u16, u32
from vfu_inspect.tree import Tree

from .core import SPEC, Context
from .protocol import (
    COMMANDS, ERRNO_NAMES, FLAG_ERROR, FLAG_NO_REPLY, FLAG_TYPE_MASK, HEADER_SIZE, MSG_TYPES,
    OBSOLETE_COMMANDS, SERVER_COMMANDS, TYPE_COMMAND, TYPE_REPLY, command_name)

# The checks of the header and framing, of request/reply pairing, and those
# every command may raise (the session's and the tool's included).
CHECKS: list[tuple[str, ...]] = [
    # framing and the header
    ("malformed.short", "error", "a structure is cut short by the message end", f"{SPEC} § Protocol Specification (each command's layout)"),
    ("malformed.trailing", "warning", "bytes beyond what the command's layout accounts for", f"{SPEC} § Protocol Specification (each command's layout)"),
    ("header.size", "error", "msg_size disagrees with the message length", f"{SPEC} § Header"),
    ("header.type", "error", "message type is neither command (0) nor reply (1)", f"{SPEC} § Header"),
    ("header.unknown_command", "warning", "command number not in the spec's table", f"{SPEC} § Commands"),
    ("header.obsolete_command", "warning", "command 14 (DIRTY_PAGES), not in the spec's table", f"{SPEC} § Commands",
     "QEMU 10.2.2 still defines it in protocol.h and never sends it; libvfio-user refuses it"),
    ("header.wrong_direction", "warning", "a command sent the way the spec's table does not give it (DMA_READ/WRITE by the client, the others by the server)", f"{SPEC} § Commands"),
    ("header.error_in_command", "note", "ERROR flag on a command (the spec defines it for replies)", f"{SPEC} § Header"),
    ("header.no_reply_in_reply", "note", "NO_REPLY flag on a reply (the spec defines it for commands)", f"{SPEC} § Header"),
    ("header.flags_unknown", "note", "flag bits the spec does not define", f"{SPEC} § Header"),
    ("header.errno_zero", "note", "error reply with errno 0 (allowed; the cause is not said)", f"{SPEC} § Header"),
    ("header.error_reserved", "note", "error field set without the ERROR flag (reserved in commands)", f"{SPEC} § Header"),
    # replies and requests
    ("reply.unmatched", "error", "reply whose msg_id matches no request in flight", f"{SPEC} § Header",
     "QEMU 10.2.2 fails with \"unexpected reply\""),
    ("reply.command_mismatch", "error", "reply's command differs from its request's", f"{SPEC} § Header"),
    ("reply.accepted_invalid", "error", "success reply to a request the receiver must refuse", f"{SPEC} § Protocol Specification (the rule the request broke)"),
    ("reply.error_payload", "warning", "error reply that carries more than the header", f"{SPEC} § Header",
     "libvfio-user sends its reply payload with some errors (REGION_WRITE, DEVICE_FEATURE)"),
    ("reply.echo_mismatch", "warning", "reply does not repeat what the spec has it echo (the index, the region and offset, the unmapped DMA entry, a SET or PROBE payload)", f"{SPEC} § DEVICE_GET_REGION_INFO, _REGION_IO_FDS, _IRQ_INFO, REGION_READ/WRITE, DMA_UNMAP, DEVICE_FEATURE"),
    ("reply.to_no_reply", "note", "reply to a NO_REPLY request, which needs none", f"{SPEC} § Header",
     "QEMU 10.2.2 takes it for the reply to its next request: its posted writes desynchronize"),
    ("request.duplicate_id", "note", "msg_id reused while a request with it is in flight (allowed)", f"{SPEC} § Header"),
    ("request.unanswered", "warning", "request never answered", f"{SPEC} § Header"),
    ("request.timeout", "note", "request unanswered for longer than the timeout (the spec sets none)", f"{SPEC} § Request Retry and Response Timeout",
     "QEMU 10.2.2 gives up after x-msg-timeout, 5 s by default"),
    ("fd.count", "warning", "fds where the message carries none, or the wrong number", f"{SPEC} § Protocol Specification (each command's fds)"),
    ("fd.over_max", "error", "more fds than the receiver's max_msg_fds", f"{SPEC} § VFIO_USER_VERSION"),
    ("xfer.too_big", "warning", "data transfer over the receiver's max_data_xfer_size (REGION, DMA and MIG_DATA reads and writes)", f"{SPEC} § Read and Write Operations; § VFIO_USER_VERSION",
     "libvfio-user refuses MIG_DATA sizes over it too; the spec's capability table says \"data transfer messages\""),
    ("argsz.truncated", "note", "reply truncated to the request's argsz (the client retries)", f"{SPEC} § Message sizes"),
    ("argsz.mismatch", "warning", "argsz disagrees with the payload", f"{SPEC} § Message sizes"),
    ("argsz.small", "warning", "request argsz below the reply it asks for (the fixed header, the feature's data)", f"{SPEC} § Message sizes"),
    ("argsz.reply_exceeds", "warning", "reply payload larger than its request's argsz allowed", f"{SPEC} § Message sizes"),
    ("field.not_zero", "warning", "a field the spec says must be zero is not", f"{SPEC} § DEVICE_GET_INFO, _REGION_INFO, _REGION_IO_FDS, _IRQ_INFO"),
    ("range.overflow", "warning", "start + count (or address + size) does not fit the field's width: it wraps", f"{SPEC} § DEVICE_SET_IRQS, REGION_READ/WRITE, DMA_MAP/UNMAP/READ/WRITE, DEVICE_FEATURE"),
    # deadlock risk
    ("deadlock.server_command", "note", "server command on the main socket while a client request is in flight, no twin socket", f"{SPEC} § Socket (no stall on the other channel); libvfio-user issues 279, 466",
     "a single-threaded client that waits for its reply deadlocks"),
    # the tool itself
    ("dissector.bug", "error", "the dissector failed on this message", "vfu-inspect"),
    ("capture.truncated", "warning", "the capture holds only part of the message: its missing end is not checked", "vfu-inspect"),
    ("fault.injected", "note", "the proxy injected a fault here (proxy --fault)", "vfu-inspect"),
]
# Those of the checks above that a request breaks when its receiver must
# refuse it (a success reply is then reply.accepted_invalid); every family
# names its own.
MUST_REFUSE = {"xfer.too_big", "range.overflow"}

FIELDS = Fields()

@FIELDS.layer("vfio_user")
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


# Fields that are not a fixed part of a layer.
RESERVED_ERROR = FIELDS.field("vfio_user.reserved", "Error field (reserved: no ERROR flag)")
FIELDS.field("vfio_user.payload", "Undecoded payload", BYTES)
FIELDS.field("vfio_user.trailing", "Trailing bytes", BYTES)
FIELDS.field("vfio_user.response_in", "Response in frame", FRAME)
FIELDS.field("vfio_user.response_to", "Request in frame", FRAME)
FIELDS.field("vfio_user.time", "Response time (s)", FLOAT)
# The fds a message carries, one item each.
FIELDS.field("fd", "File descriptor", "protocol")
FIELDS.field("fd.index", "Index")
FIELDS.field("fd.kind", "Kind", STRING)
FIELDS.field("fd.size", "Size", base="hex")
FIELDS.field("fd.inode", "Inode")
FIELDS.field("fd.purpose", "Purpose", STRING)


class HeaderInfo:
    """The header's fields and what its flags say, computed once: every view
    and check asks for them."""

    __slots__ = ("msg_id", "cmd", "size", "flags", "error", "type", "is_reply", "no_reply",
                 "is_error")

    def __init__(self, msg_id: int, cmd: int, size: int, flags: int, error: int) -> None:
        self.msg_id, self.cmd, self.size, self.flags, self.error = msg_id, cmd, size, flags, error
        self.type = flags & FLAG_TYPE_MASK
        self.is_reply = self.type == TYPE_REPLY
        self.no_reply = bool(flags & FLAG_NO_REPLY)
        self.is_error = bool(flags & FLAG_ERROR)

    def __repr__(self) -> str:
        return (f"HeaderInfo(msg_id={self.msg_id}, cmd={self.cmd}, size={self.size}, "
                f"flags={self.flags:#x}, error={self.error})")

    @property
    def kind(self) -> str:
        """command / reply / error, as the summary line shows it."""
        if self.is_error and self.is_reply:
            return "error"
        return MSG_TYPES.get(self.type, "invalid")

    @property
    def command_name(self) -> str:
        return command_name(self.cmd)


_HEADER = Header.vfu_compiled.struct
RESERVED = Header.vfu_compiled.with_field(len(Header.vfu_compiled.fields) - 1, RESERVED_ERROR)


def parse_header(msg: bytes) -> HeaderInfo | None:
    """The header's fields, or None when the message is shorter than a header."""
    if len(msg) < HEADER_SIZE:
        return None
    return HeaderInfo(*_HEADER.unpack_from(msg))


CLIENT_COMMANDS = set(COMMANDS) - SERVER_COMMANDS - OBSOLETE_COMMANDS


def header_checks(tree: Tree, h: HeaderInfo, length: int, ctx: Context) -> None:
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
    if h.type == TYPE_COMMAND and h.cmd in (SERVER_COMMANDS if ctx.direction == "c2s"
                                            else CLIENT_COMMANDS):
        sender = "client" if ctx.direction == "c2s" else "server"
        tree.expert("header.wrong_direction",
                    f"{h.command_name} sent by the {sender}: the spec has the "
                    f"{'server' if sender == 'client' else 'client'} send it", 2, 2)
    if h.is_error and h.is_reply and h.error == 0:
        tree.expert("header.errno_zero", "error reply with errno 0", 12, 4)
    if h.error and not h.is_error:
        tree.expert("header.error_reserved",
                    f"error field {h.error} set without the ERROR flag", 12, 4)


def fd_items(tree: Tree, ctx: Context) -> None:
    for i, meta in enumerate(ctx.fds):
        node = tree.add("fd", None, text=f"fd {i}: {meta.get('kind', '?')}")
        tree.add("fd.index", i, parent=node)
        for key in ("kind", "size", "inode"):
            if meta.get(key) is not None:
                tree.add(f"fd.{key}", meta[key], parent=node)
        purpose = ctx.fd_purposes.get(i)
        if purpose:
            tree.add("fd.purpose", purpose, parent=node)
            tree.append_text(node, f", {purpose}")
