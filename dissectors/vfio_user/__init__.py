"""vfio-user protocol dissector (QEMU docs/interop/vfio-user.rst), one module
per command family.

A family module holds all that is known of its commands, next to each other:
their layers (scapy packets, the one declaration of the wire format; scapy
builds messages from them, `FIELDS.layer` declares their fields under their
filter names and compiles them for decoding), each command's request and
reply payload as data (`Payload`: its layer and what may follow it, which
the Python dissector walks and the generated Lua plugin interprets), the
request and reply dissector of each command, which walks the rest and flags
what is wrong, its checks (CHECKS rows), and its session side: the checks
that need the connection's history and what the command changes in its state.

    header     the header and framing, and the checks no one command owns
    version    VERSION and the capabilities
    dma        DMA_MAP, DMA_UNMAP, DMA_READ, DMA_WRITE, dirty bitmaps
    device     DEVICE_GET_INFO, DEVICE_RESET
    region     DEVICE_GET_REGION_INFO, _REGION_IO_FDS, REGION_READ/WRITE(_MULTI)
    irq        DEVICE_GET_IRQ_INFO, DEVICE_SET_IRQS
    migration  DEVICE_FEATURE, MIG_DATA_READ/WRITE, DMA logging, device states

They import protocol.py (the constants), core.py (what dissectors share) and
state.py (the connection state their session code reads and changes).  This
module gathers them: FIELDS and CHECKS (`registry.load()` registers them), the
dissector tables `dissect_message` reads, the SESSION rules session.py's
tracker runs, and what the layers say about the protocol; it re-exports what
the rest of vfu-inspect reads as `vfio_user.X`.

All integers are little-endian; every struct is packed.
"""

from __future__ import annotations

import functools
import struct
from types import ModuleType

from scapy.packet import Packet

from vfu_inspect.fields import FieldDef, Fields
from vfu_inspect.tree import Tree

from . import device, dma, header, irq, migration, region, version
from .core import (
    DMA_MEMORY, IOEVENTFDS, IRQ_EVENTFDS, REPLY, REQUEST, TWIN_SOCKET, Context, Dissectors,
    add_bytes, add_layer)
from .device import DeviceInfo
from .dma import (
    QEMU_DMA_SIGNS, DirtyBitmap, DmaMap, DmaRead, DmaUnmap, DmaWrite, QemuDmaRead, QemuDmaWrite,
    bitmap_bytes)
from .header import (
    CLIENT_COMMANDS, RESERVED, Header, HeaderInfo, fd_items, header_checks,
    parse_header)
from .irq import DISABLE_ALL, IrqInfo, SetIrqs
from .migration import (
    FEATURE_OPS, DeviceFeature, DmaLogging, DmaLoggingRange, DmaLoggingReport, MigDataRead,
    MigDataWrite, MigDeviceState, MigrationFeature)
from .protocol import (
    CAPABILITIES, CAPABILITY_MINIMUM, CMD, COMMANDS, DEVICE_INFO_FLAGS, DMA_MAP_FLAGS,
    DMA_UNMAP_FLAGS, ERRNO_NAMES, FEATURE_GET, FEATURE_PROBE, FEATURE_SET, FEATURES, FLAG_ERROR,
    FLAG_NO_REPLY, FLAG_TYPE_MASK, HEADER_SIZE, IO_FD_FLAGS, IRQS, MIG_STATES, MIGRATION_FLAGS,
    MSG_TYPES, OBJECT_CAPABILITIES, OBSOLETE_COMMANDS, PAGE_4K, PCI_NUM_REGIONS,
    QEMU_CAPABILITY_MAXIMUM, QEMU_CLIENT_CAPABILITIES, QEMU_PAGE_CAPABILITIES, REGION_CAPS,
    REGION_FLAGS, REGIONS, SERVER_COMMANDS, SET_IRQS_ACTION, SET_IRQS_DATA, SET_IRQS_FLAGS,
    SPEC_DMA_MAP_FLAGS, TYPE_COMMAND, TYPE_REPLY, command_name, region_name)
from .region import (
    IO_FD_TYPE, KVM_IOREGION_POSTED_WRITES, MMIO_WRITES, RegionCap, RegionInfo, RegionIoFds,
    RegionRead, RegionType, RegionWrite, ShadowSubRegion, SparseArea, SparseMmap, SubRegion,
    WriteMulti, WriteMultiEntry)
from .state import SessionRules
from .version import Version

# What the rest of vfu-inspect reads from here, besides what this module
# defines: the constants, the layers, and the few helpers callers share.
__all__ = [
    "CAPABILITIES", "CAPABILITY_MINIMUM", "CLIENT_COMMANDS", "CMD", "COMMANDS", "DEVICE_INFO_FLAGS",
    "DISABLE_ALL", "DMA_MAP_FLAGS", "DMA_UNMAP_FLAGS", "ERRNO_NAMES", "FEATURE_GET",
    "FEATURE_OPS", "FEATURE_PROBE", "FEATURE_SET", "FEATURES", "FLAG_ERROR", "FLAG_NO_REPLY",
    "FLAG_TYPE_MASK", "HEADER_SIZE", "IO_FD_FLAGS", "IO_FD_TYPE", "IRQS",
    "KVM_IOREGION_POSTED_WRITES", "MIG_STATES", "MIGRATION_FLAGS", "OBJECT_CAPABILITIES",
    "OBSOLETE_COMMANDS", "PAGE_4K", "PCI_NUM_REGIONS", "QEMU_CAPABILITY_MAXIMUM",
    "QEMU_CLIENT_CAPABILITIES", "QEMU_DMA_SIGNS", "QEMU_PAGE_CAPABILITIES", "REGION_CAPS",
    "REGION_FLAGS", "REGIONS", "SERVER_COMMANDS", "SET_IRQS_ACTION", "SET_IRQS_DATA",
    "SET_IRQS_FLAGS", "SPEC_DMA_MAP_FLAGS", "TYPE_COMMAND", "TYPE_REPLY",
    "Context", "DeviceFeature", "DeviceInfo", "DirtyBitmap", "DmaLogging", "DmaLoggingRange",
    "DmaLoggingReport", "DmaMap", "DmaRead", "DmaUnmap", "DmaWrite", "Header", "HeaderInfo",
    "IrqInfo", "MigDataRead", "MigDataWrite", "MigDeviceState", "MigrationFeature", "QemuDmaRead",
    "QemuDmaWrite", "RegionCap", "RegionInfo", "RegionIoFds", "RegionRead", "RegionType",
    "RegionWrite", "SetIrqs", "ShadowSubRegion", "SparseArea", "SparseMmap", "SubRegion",
    "Version", "WriteMulti", "WriteMultiEntry",
    "bitmap_bytes", "command_name", "parse_header", "region_name",
    "DMA_MEMORY", "IOEVENTFDS", "IRQ_EVENTFDS", "MMIO_WRITES", "TWIN_SOCKET",
    "CHECKS", "FD_CARRIERS", "FIELDS", "PARTS", "PAYLOADS", "REQUESTS", "SESSION",
    "dissect_message", "field_commands", "header_only",
    "layers", "member_widths", "protocol_fields",
]

# --- the families together --------------------------------------------------------

# The families, in the order their fields and checks are registered.
FAMILIES: tuple[ModuleType, ...] = (header, version, dma, device, region, irq, migration)
COMMAND_FAMILIES = FAMILIES[1:]          # the header is every command's
FIELDS = Fields(*(family.FIELDS for family in FAMILIES))
CHECKS = [row for family in FAMILIES for row in family.CHECKS]
_DISSECTORS = Dissectors.merged(family.DISSECTORS for family in COMMAND_FAMILIES)
REQUESTS, REPLIES = _DISSECTORS.requests, _DISSECTORS.replies
FD_CARRIERS = _DISSECTORS.fd_carriers
PAYLOADS, PARTS = _DISSECTORS.payloads, _DISSECTORS.parts
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
    header_checks(tree, header, len(msg) if ctx.size is None else ctx.size, ctx)
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
    if ctx.size is not None:        # the end is missing, not wrong: only the header is judged
        tree.experts = [e for e in tree.experts
                        if e.id.startswith("header.") or e.id == "dissector.bug"]
    if ctx.fds and (header.cmd, header.kind) not in FD_CARRIERS:
        tree.expert("fd.count", f"{len(ctx.fds)} fds with a {header.command_name} "
                    f"{header.kind}, which carries none")
    fd_items(tree, ctx)
    return tree, header


# --- what the layers say about the protocol -------------------------------------------

def layers() -> list[type[Packet]]:
    """The protocol's layers, family by family, in declaration order."""
    return [cls for family in FAMILIES for cls in vars(family).values()
            if isinstance(cls, type) and issubclass(cls, Packet) and "vfu_compiled" in vars(cls)
            and cls.__module__ == family.__name__]       # not a layer it imports


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


def header_only(cmd: int, flags: int) -> bool:
    """Whether a message with this header carries no field of its command's
    layers (dissect_message): an error reply, one of no known type, or one
    its command declares bare."""
    kind = flags & FLAG_TYPE_MASK
    if kind not in MSG_TYPES or kind == TYPE_REPLY and flags & FLAG_ERROR:
        return True
    payload = PAYLOADS.get((cmd, REPLY if kind == TYPE_REPLY else REQUEST))
    return payload is not None and payload.layer is None and payload.tail is None
