"""The vfio-user protocol's constants (QEMU docs/interop/vfio-user.rst): the
command table, the header's flags, the enums and flag tables of every
command, the capabilities.  Every command family imports them from here.
"""

from __future__ import annotations

import errno
from typing import Any

HEADER_SIZE = 16

COMMANDS = {
    1: "VERSION", 2: "DMA_MAP", 3: "DMA_UNMAP", 4: "DEVICE_GET_INFO",
    5: "DEVICE_GET_REGION_INFO", 6: "DEVICE_GET_REGION_IO_FDS",
    7: "DEVICE_GET_IRQ_INFO", 8: "DEVICE_SET_IRQS", 9: "REGION_READ",
    10: "REGION_WRITE", 11: "DMA_READ", 12: "DMA_WRITE", 13: "DEVICE_RESET",
    14: "DIRTY_PAGES", 15: "REGION_WRITE_MULTI", 16: "DEVICE_FEATURE",
    17: "MIG_DATA_READ", 18: "MIG_DATA_WRITE",
}
CMD = {name: number for number, name in COMMANDS.items()}
OBSOLETE_COMMANDS = {14}                 # in QEMU's protocol.h, not in the spec
SERVER_COMMANDS = {CMD["DMA_READ"], CMD["DMA_WRITE"]}


def command_name(cmd: int) -> str:
    """The command's name, or CMD_<n> for a number the table lacks."""
    return COMMANDS.get(cmd, f"CMD_{cmd}")

TYPE_COMMAND, TYPE_REPLY = 0, 1
MSG_TYPES = {TYPE_COMMAND: "command", TYPE_REPLY: "reply"}
FLAG_TYPE_MASK, FLAG_NO_REPLY, FLAG_ERROR = 0x0F, 0x10, 0x20
ERRNO_NAMES = dict(errno.errorcode)

REGIONS = {0: "BAR0", 1: "BAR1", 2: "BAR2", 3: "BAR3", 4: "BAR4", 5: "BAR5",
           6: "ROM", 7: "CONFIG", 8: "VGA"}
PCI_NUM_REGIONS = len(REGIONS)
IRQS = {0: "INTx", 1: "MSI", 2: "MSI-X", 3: "ERR", 4: "REQ"}
REGION_CAPS = {1: "SPARSE_MMAP", 2: "TYPE", 3: "MIGRATION"}
IO_FD_TYPES = {0: "IOEVENTFD", 1: "IOREGIONFD", 2: "IOEVENTFD_SHADOW"}
FEATURES = {1: "MIGRATION", 2: "MIG_DEVICE_STATE", 6: "DMA_LOGGING_START",
            7: "DMA_LOGGING_STOP", 8: "DMA_LOGGING_REPORT"}
MIG_STATES = {0: "ERROR", 1: "STOP", 2: "RUNNING", 3: "STOP_COPY",
              4: "RESUMING", 5: "RUNNING_P2P", 6: "PRE_COPY", 7: "PRE_COPY_P2P"}

DMA_MAP_FLAGS = {"read": 1, "write": 2, "mmap": 4, "file_io": 8}
SPEC_DMA_MAP_FLAGS = 0x3
DMA_UNMAP_FLAGS = {"get_dirty_bitmap": 1, "all": 2}
DEVICE_INFO_FLAGS = {"reset": 1, "pci": 2}
REGION_FLAGS = {"read": 1, "write": 2, "mmap": 4, "caps": 8}
IRQ_INFO_FLAGS = {"eventfd": 1, "maskable": 2, "automasked": 4, "noresize": 8}
SET_IRQS_FLAGS = {"data_none": 0x1, "data_bool": 0x2, "data_eventfd": 0x4,
                  "mask": 0x8, "unmask": 0x10, "trigger": 0x20}
SET_IRQS_DATA, SET_IRQS_ACTION = 0x7, 0x38
IO_FD_FLAGS = {"datamatch": 1}
FEATURE_FLAGS = {"feature": (0xFFFF, FEATURES), "get": 1 << 16,
                 "set": 1 << 17, "probe": 1 << 18}
FEATURE_GET, FEATURE_SET, FEATURE_PROBE = 1 << 16, 1 << 17, 1 << 18
MIGRATION_FLAGS = {"stop_copy": 1, "p2p": 2, "pre_copy": 4}

# VERSION capabilities: JSON path -> (type, spec default, label)
CAPABILITIES: dict[str, tuple[type, Any, str]] = {
    "max_msg_fds": (int, 1, "Max fds per message"),
    "max_data_xfer_size": (int, 1048576, "Max data transfer size"),
    "max_dma_maps": (int, 65535, "Max DMA maps"),
    "pgsizes": (int, 4096, "Supported page sizes"),
    "migration.pgsize": (int, 4096, "Migration page size"),
    "migration.max_bitmap_size": (int, None, "Migration max bitmap size"),
    "twin_socket.supported": (bool, False, "Twin socket supported"),
    "twin_socket.fd_index": (int, None, "Twin socket fd index"),
    "write_multiple": (bool, False, "REGION_WRITE_MULTI supported"),
}
# The capabilities QEMU 10.2.2's VERSION proposes (with version 0.0): how a
# connection's client is known to be QEMU, whose DMA layout is its own.
QEMU_CLIENT_CAPABILITIES = frozenset({
    "max_msg_fds", "max_data_xfer_size", "max_dma_maps", "pgsizes", "migration.pgsize",
    "migration.max_bitmap_size", "write_multiple"})
PAGE_4K = 4096
OBJECT_CAPABILITIES = {path.split(".", 1)[0] for path in CAPABILITIES if "." in path}
EXTENSION_CAPABILITIES = {"migration"}     # QEMU's and libvfio-user's, not in the spec

# The least value each numeric capability's meaning allows: no count or size
# is negative, pgsizes names at least one page size, and a max_data_xfer_size
# of 0 would forbid the reads and writes every peer must support.
CAPABILITY_MINIMUM = {"max_msg_fds": 0, "max_data_xfer_size": 1, "max_dma_maps": 0,
                      "pgsizes": 1, "twin_socket.fd_index": 0, "migration.pgsize": 0,
                      "migration.max_bitmap_size": 0}
# What QEMU 10.2.2 accepts in a server's reply (hw/vfio-user/proxy.c): at
# most these values, and page sizes with no bit below 4 KiB.
QEMU_CAPABILITY_MAXIMUM = {"max_msg_fds": 16, "max_data_xfer_size": 64 << 20,
                           "max_dma_maps": 65535, "migration.max_bitmap_size": 256 << 20}
QEMU_PAGE_CAPABILITIES = ("pgsizes", "migration.pgsize")
MAX_BITMAP_SIZE = QEMU_CAPABILITY_MAXIMUM["migration.max_bitmap_size"]

# The device states by name (MIG_STATES), as the migration state machine uses them.
ERROR_STATE, STOP, RUNNING, STOP_COPY, RESUMING, PRE_COPY = 0, 1, 2, 3, 4, 6


def region_name(index: int) -> str:
    return REGIONS.get(index, f"region {index}")


def irq_name(index: int) -> str:
    return IRQS.get(index, f"index {index}")
