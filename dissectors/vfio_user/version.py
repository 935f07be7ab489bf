"""VERSION: the negotiation, and the capabilities each side states.

The VERSION layer and its capability fields, the dissector that reads the
capabilities JSON and checks each capability's type and range (and what
QEMU accepts of a server), the twin-socket rules, and the session side:
the versions and capabilities each connection's peers agreed on.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from scapy.fields import StrField
from scapy.packet import Packet

from vfu_inspect.fields import BOOL, STRING, UINT, Fields, u16
from vfu_inspect.tree import Tree

from .core import FACTS, REPLY, REQUEST, SPEC, TWIN_SOCKET, Context, Dissectors, Payload, walk
from .protocol import (
    CAPABILITIES, CAPABILITY_MINIMUM, EXTENSION_CAPABILITIES, OBJECT_CAPABILITIES, PAGE_4K,
    QEMU_CAPABILITY_MAXIMUM, QEMU_CLIENT_CAPABILITIES, QEMU_PAGE_CAPABILITIES)
from .state import ConnState, Pending, SessionRules

if TYPE_CHECKING:
    from vfu_inspect.packet import Dissected

CHECKS: list[tuple[str, ...]] = [
    # negotiation
    ("version.not_first", "error", "a command before VERSION", f"{SPEC} § VFIO_USER_VERSION"),
    ("version.major", "error", "server's major version differs from the client's", f"{SPEC} § VFIO_USER_VERSION"),
    ("version.minor", "warning", "server's minor version above the client's", f"{SPEC} § VFIO_USER_VERSION"),
    ("version.json_unterminated", "warning", "version data not NUL-terminated", f"{SPEC} § VFIO_USER_VERSION",
     "QEMU 10.2.2 refuses such a reply"),
    ("version.json_invalid", "error", "version data is not JSON", f"{SPEC} § VFIO_USER_VERSION"),
    ("version.json_not_object", "warning", "version data is JSON but not an object", f"{SPEC} § VFIO_USER_VERSION",
     "QEMU 10.2.2 fails (\"capabilities … not an object\")"),
    ("version.unknown_capability", "note", "capability not in the spec", f"{SPEC} § VFIO_USER_VERSION"),
    ("version.capability_type", "warning", "capability of the wrong JSON type", f"{SPEC} § VFIO_USER_VERSION"),
    ("version.capability_range", "warning", "capability value its meaning excludes (a negative count, no page size, no transfer size)", f"{SPEC} § VFIO_USER_VERSION"),
    ("version.capability_not_offered", "note", "server reply states a spec capability the client did not propose (the spec: a subset)", f"{SPEC} § VFIO_USER_VERSION",
     "libvfio-user's server always states max_msg_fds and max_data_xfer_size (and migration, which is not in the spec and not checked); the rule reads oddly for limits each side states about itself"),
    ("interop.qemu_capability", "note", "server capability QEMU 10.2.2 rejects: max_msg_fds > 16, max_data_xfer_size > 64 MiB, max_dma_maps > 65535, page sizes below 4 KiB, max_bitmap_size > 256 MiB", f"{FACTS} § 1 VERSION",
     "QEMU 10.2.2 closes the connection; the spec sets no such bound"),
    # the twin socket
    ("twin.not_negotiated", "error", "twin socket used or offered without negotiation", f"{SPEC} § VFIO_USER_VERSION"),
    ("twin.fd_index", "warning", "twin_socket.fd_index in a request, or a reply with twin_socket.supported whose fd_index names no passed fd (the client must close)", f"{SPEC} § VFIO_USER_VERSION (Reply)"),
    ("twin.wrong_channel", "warning", "with twin-socket mode on, a server command on the main socket or a client command on the twin", f"{SPEC} § Socket; § VFIO_USER_DMA_READ"),
]

FIELDS = Fields()


@FIELDS.layer("version")
class Version(Packet):
    name = "VERSION"
    fields_desc = [u16("major"), u16("minor"), StrField("json", b"")]


# The capabilities, each under its JSON path, and what is not one.
FIELDS.field("version.json", "Capabilities JSON", STRING)
FIELDS.field("version.unknown_capability", "Unknown capability", STRING)
for _path, (_type, _, _label) in CAPABILITIES.items():
    FIELDS.field(f"version.{_path}", _label, BOOL if _type is bool else UINT,
                 base="hex" if _path == "pgsizes" else "dec")


# --- dissectors ---------------------------------------------------------------------

DISSECTORS = Dissectors()
# the capabilities JSON after the version is read by hand
VERSION = DISSECTORS.declare("VERSION", REQUEST, Payload(Version, ends=False))
DISSECTORS.declare("VERSION", REPLY, VERSION)


@DISSECTORS.request("VERSION")
@DISSECTORS.reply("VERSION", fds=TWIN_SOCKET)
def _version(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
    walked = walk(tree, msg, off, VERSION)
    node, v = walked.node, walked.values
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


def _capabilities(tree: Tree, doc: Any, parent: int, start: int, length: int,
                  ctx: Context) -> None:
    if not isinstance(doc, dict):
        tree.expert("version.json_not_object",
                    f"version data is a JSON {type(doc).__name__}, not an object", start, length)
        return
    caps = doc.get("capabilities", {})      # optional, as every capability is
    if not isinstance(caps, dict):
        tree.expert("version.capability_type", "capabilities should be an object, got "
                    f"{json.dumps(caps)}", start, length)
        return
    for path, value in _flatten(caps):
        spec = CAPABILITIES.get(path)
        if spec is None and path not in OBJECT_CAPABILITIES:
            tree.add("version.unknown_capability", f"{path}={json.dumps(value)}",
                     start, length, parent)
            tree.expert("version.unknown_capability",
                        f"capability {path!r} is not in the spec", start, length)
            continue
        kind = spec[0] if spec else dict
        if not _is_a(value, kind):
            tree.expert("version.capability_type",
                        f"capability {path} should be {_TYPE_NAMES[kind]}, "
                        f"got {json.dumps(value)}", start, length)
            continue
        if not (kind is int and value < 0):         # the fields are unsigned
            tree.add(f"version.{path}", value, start, length, parent)
        _capability_range(tree, path, value, ctx, start, length)
    _twin_fd_index(tree, caps.get("twin_socket"), ctx, start, length)


_TYPE_NAMES = {int: "a number", bool: "a boolean", dict: "an object"}


def _is_a(value: Any, kind: type) -> bool:
    if kind is int:         # JSON has no int type, but a count is whole; true is no number
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _capability_range(tree: Tree, path: str, value: Any, ctx: Context, start: int,
                      length: int) -> None:
    least = CAPABILITY_MINIMUM.get(path)
    if least is not None and value < least:
        tree.expert("version.capability_range", f"{path}={value}: below {least}", start, length)
    if ctx.direction != "s2c":
        return                      # QEMU checks what the server states
    most = QEMU_CAPABILITY_MAXIMUM.get(path)
    if most is not None and value > most:
        tree.expert("interop.qemu_capability", f"{path}={value}: QEMU 10.2.2 accepts at most "
                    f"{most} and closes the connection", start, length)
    elif path in QEMU_PAGE_CAPABILITIES and value % PAGE_4K:
        tree.expert("interop.qemu_capability", f"{path}={value:#x} has bits below 4 KiB: "
                    "QEMU 10.2.2 closes the connection", start, length)


def _twin_fd_index(tree: Tree, twin: Any, ctx: Context, start: int, length: int) -> None:
    """fd_index is only valid in a reply, and there it must name a passed fd
    whenever supported is true (the client closes otherwise)."""
    if not isinstance(twin, dict):
        return
    index = twin.get("fd_index")
    if ctx.direction == "c2s":
        if "fd_index" in twin:
            tree.expert("twin.fd_index", "twin_socket.fd_index is only valid in the reply",
                        start, length)
    elif twin.get("supported") is True and not (
            _is_a(index, int) and 0 <= index < len(ctx.fds)):
        tree.expert("twin.fd_index", f"twin_socket.supported with fd_index {json.dumps(index)} "
                    f"and {len(ctx.fds)} fds passed: the client must close the connection",
                    start, length)
    elif _is_a(index, int):
        ctx.purpose(index, "twin socket (server-to-client commands)")


def _flatten(obj: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for key, value in obj.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and path in OBJECT_CAPABILITIES:
            out.extend(_flatten(value, path + "."))
        else:
            out.append((path, value))
    return out


# --- the session -----------------------------------------------------------------------

SESSION = SessionRules()


@SESSION.on_command("VERSION")
def _version_request(state: ConnState, p: Dissected) -> None:
    v = p.tree.prefixed("version")
    state.client_version = (v.get("major", 0), v.get("minor", 0))
    state.client_caps = _caps(v)
    if state.qemu_dma is None and state.client_version == (0, 0) \
            and set(state.client_caps) == QEMU_CLIENT_CAPABILITIES:
        state.qemu_dma = (f"the client's VERSION (frame {p.number}) is QEMU's: 0.0 proposing "
                          "exactly QEMU 10.2.2's capabilities")


def _caps(values: dict[str, Any]) -> dict[str, Any]:
    return {name: values[name] for name in CAPABILITIES if name in values}


@SESSION.on_reply("VERSION")
def _version_reply(state: ConnState, p: Dissected, request: Pending) -> None:
    v = p.tree.prefixed("version")
    state.server_version = (v.get("major", 0), v.get("minor", 0))
    state.server_caps = _caps(v)
    client = state.client_version or state.server_version
    if state.server_version[0] != client[0]:
        p.tree.expert("version.major", f"server {state.server_version[0]}, client {client[0]}")
    elif state.server_version[1] > client[1]:
        p.tree.expert("version.minor", f"server {state.server_version[1]} above the client's "
                      f"{client[1]}: it must answer with the lower of the two")
    offered = bool(state.server_caps.get("twin_socket.supported") and p.msg.fds)
    if offered and not state.client_caps.get("twin_socket.supported"):
        p.tree.expert("twin.not_negotiated", "server passes a twin socket the client did not offer")
    state.twin = offered
    proposed = {name.split(".")[0] for name in state.client_caps}
    unasked = sorted({name.split(".")[0] for name in state.server_caps} - proposed
                     - EXTENSION_CAPABILITIES)
    if unasked:
        p.tree.expert("version.capability_not_offered", f"{', '.join(unasked)} not proposed by "
                      "the client: the spec has the reply state a subset of what it proposed")
