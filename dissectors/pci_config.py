"""PCI configuration space: REGION_READ/WRITE of the CONFIG region (index 7).

A config access is a window of a few bytes; what it means depends on what
earlier reads revealed (where the capabilities sit, whether a BAR is being
sized).  `ConfigShadow` keeps, per session, the bytes reads have shown;
`dissect_config_access` decodes each register the window covers whole.
"""

from __future__ import annotations

from typing import Any

from scapy.packet import Packet

from vfu_inspect.devices import add_registers, overlaps
from vfu_inspect.fields import Fields, bits16, raw, u8, u16, u32
from vfu_inspect.tree import Tree

CONFIG_REGION = 7
CONFIG_SIZE, EXTENDED_START = 4096, 0x100
CAP_POINTER, FIRST_CAP, MAX_CAPS = 0x34, 0x40, 48
BAR_OFFSETS = {0x10 + 4 * i: i for i in range(6)}
BAR_PROBE = 0xFFFFFFFF

CAP_IDS = {0x01: "Power Management", 0x05: "MSI", 0x09: "Vendor-specific",
           0x10: "PCI Express", 0x11: "MSI-X", 0x12: "SATA", 0x13: "Advanced Features"}
CLASSES = {0x00: "unclassified", 0x01: "mass storage", 0x02: "network", 0x03: "display",
           0x04: "multimedia", 0x05: "memory", 0x06: "bridge", 0x07: "communication",
           0x08: "system peripheral", 0x09: "input", 0x0C: "serial bus", 0xFF: "unassigned"}
COMMAND_BITS = {"io": 0x1, "memory": 0x2, "bus_master": 0x4, "special_cycles": 0x8,
                "mwi": 0x10, "vga_snoop": 0x20, "parity_error_response": 0x40,
                "serr": 0x100, "fast_b2b": 0x200, "intx_disable": 0x400}
STATUS_BITS = {"intx_status": 0x8, "cap_list": 0x10, "mhz66": 0x20, "fast_b2b": 0x80,
               "master_parity_error": 0x100, "devsel": (0x600, {0: "fast", 1: "medium", 2: "slow"}),
               "signaled_target_abort": 0x800, "received_target_abort": 0x1000,
               "received_master_abort": 0x2000, "signaled_system_error": 0x4000,
               "detected_parity_error": 0x8000}
INTERRUPT_PINS = {0: "none", 1: "INTA", 2: "INTB", 3: "INTC", 4: "INTD"}
MSI_CONTROL_BITS = {"enable": 0x1, "multiple_capable": (0xE, None),
                    "multiple_enable": (0x70, None), "addr64": 0x80, "per_vector_mask": 0x100}
MSIX_CONTROL_BITS = {"table_size": (0x7FF, None), "function_mask": 0x4000, "enable": 0x8000}
PCIE_TYPES = {0: "endpoint", 1: "legacy endpoint", 4: "root port", 5: "upstream port",
              6: "downstream port", 9: "RC integrated endpoint"}
PCIE_CAPS_BITS = {"version": (0xF, None), "type": (0xF0, PCIE_TYPES)}

FIELDS = Fields()


@FIELDS.layer("pci")
class PciHeader(Packet):
    """The type 0 header, 64 bytes."""

    name = "PCI configuration space"
    fields_desc = [
        u16("vendor_id", base="hex", label="Vendor ID"),
        u16("device_id", base="hex", label="Device ID"),
        bits16("command", COMMAND_BITS),
        bits16("status", STATUS_BITS),
        u8("revision"),
        u8("prog_if", base="hex", label="Programming interface"),
        u8("subclass", base="hex"),
        u8("class_code", values=CLASSES, base="hex", label="Class"),
        u8("cache_line_size"), u8("latency_timer"),
        u8("header_type", base="hex"), u8("bist", base="hex", label="BIST"),
        *(u32(f"bar{i}", base="hex", label=f"BAR{i}") for i in range(6)),
        u32("cardbus_cis", base="hex", label="CardBus CIS"),
        u16("subsystem_vendor_id", base="hex", label="Subsystem vendor ID"),
        u16("subsystem_id", base="hex", label="Subsystem ID"),
        u32("rom", base="hex", label="Expansion ROM"),
        u8("cap_ptr", base="hex", label="Capabilities pointer"),
        raw("reserved", 7),
        u8("interrupt_line"), u8("interrupt_pin", values=INTERRUPT_PINS),
        u8("min_gnt", label="Min grant"), u8("max_lat", label="Max latency"),
    ]


@FIELDS.layer("pci.cap")
class CapHeader(Packet):
    name = "Capability"
    fields_desc = [u8("id", values=CAP_IDS, base="hex", label="Capability ID"),
                   u8("next", base="hex", label="Next capability")]


@FIELDS.layer("pci.pm")
class PmCap(Packet):
    name = "Power Management"
    fields_desc = [u16("pmc", base="hex", label="Capabilities"),
                   u16("pmcsr", base="hex", label="Control/status")]


@FIELDS.layer("pci.msi")
class Msi32Cap(Packet):
    name = "MSI"
    fields_desc = [bits16("control", MSI_CONTROL_BITS),
                   u32("address", base="hex"), u16("data", base="hex")]


@FIELDS.layer("pci.msi")
class Msi64Cap(Packet):
    name = "MSI"
    fields_desc = [bits16("control", MSI_CONTROL_BITS), u32("address", base="hex"),
                   u32("address_hi", base="hex", label="Address (high)"), u16("data", base="hex")]


@FIELDS.layer("pci.msix")
class MsixCap(Packet):
    name = "MSI-X"
    fields_desc = [bits16("control", MSIX_CONTROL_BITS),
                   u32("table", base="hex", label="Table offset/BIR"),
                   u32("pba", base="hex", label="PBA offset/BIR")]


@FIELDS.layer("pci.pcie")
class PcieCap(Packet):
    name = "PCI Express"
    fields_desc = [bits16("caps", PCIE_CAPS_BITS, label="Capabilities"),
                   u32("devcap", base="hex", label="Device capabilities"),
                   u16("devctl", base="hex", label="Device control"),
                   u16("devsta", base="hex", label="Device status"),
                   u32("linkcap", base="hex", label="Link capabilities"),
                   u16("linkctl", base="hex", label="Link control"),
                   u16("linksta", base="hex", label="Link status")]


@FIELDS.layer("pci.vendor")
class VendorCap(Packet):
    name = "Vendor-specific"
    fields_desc = [u8("length")]


CAP_LAYERS: dict[int, type[Packet]] = {0x01: PmCap, 0x10: PcieCap, 0x11: MsixCap, 0x09: VendorCap}
MSI_CAP, MSI_ADDR64 = 0x05, 0x80
FIELDS.field("pci.bar_size", "BAR size (sizing probe)", base="hex")
FIELDS.field("pci.extended", "Extended configuration space (not decoded)", "bytes")


class ConfigShadow:
    """The config bytes a session's reads have shown, and BARs being sized."""

    def __init__(self) -> None:
        self.data = bytearray(CONFIG_SIZE)
        self.known = bytearray(CONFIG_SIZE)
        self.probing: set[int] = set()        # BAR offsets written with all ones

    def learn(self, offset: int, data: bytes) -> None:
        end = min(offset + len(data), CONFIG_SIZE)
        if 0 <= offset < end:
            self.data[offset:end] = data[:end - offset]
            self.known[offset:end] = b"\1" * (end - offset)

    def value(self, offset: int, size: int) -> int | None:
        if offset < 0 or offset + size > CONFIG_SIZE or not all(self.known[offset:offset + size]):
            return None
        return int.from_bytes(self.data[offset:offset + size], "little")

    @property
    def identity(self) -> tuple[int, int] | None:
        vendor, device = self.value(0, 2), self.value(2, 2)
        return None if vendor is None or device is None else (vendor, device)

    def caps(self) -> list[tuple[int, int]]:
        """(offset, id) of each capability the known bytes reveal."""
        out: list[tuple[int, int]] = []
        status = self.value(6, 2)
        pointer = self.value(CAP_POINTER, 1) if status and status & 0x10 else None
        while pointer and FIRST_CAP <= pointer < EXTENDED_START and len(out) < MAX_CAPS:
            cap_id, following = self.value(pointer, 1), self.value(pointer + 1, 1)
            if cap_id is None or any(pointer == o for o, _ in out):
                break
            out.append((pointer, cap_id))
            pointer = following & ~0x3 if following else None
        return out

    def cap_layer(self, offset: int, cap_id: int) -> type[Packet] | None:
        if cap_id == MSI_CAP:
            control = self.value(offset + 2, 2)
            return Msi64Cap if control is not None and control & MSI_ADDR64 else Msi32Cap
        return CAP_LAYERS.get(cap_id)


def dissect_config_access(tree: Tree, shadow: ConfigShadow, offset: int, data: bytes,
                          data_pos: int, write: bool) -> str:
    """Decode a config space access; returns what the info line should add."""
    notes = _bar_sizing(tree, shadow, offset, data, data_pos, write)
    if not write and not notes:
        shadow.learn(offset, data)       # a probe's answer is a mask, not the BAR
    node = tree.add("pci", None, data_pos, len(data),
                    text=f"PCI configuration space {offset:#x}+{len(data):#x}")
    add_registers(tree, node, PciHeader, 0, offset, data, data_pos)
    for cap_offset, cap_id in shadow.caps():
        cap_layer = shadow.cap_layer(cap_offset, cap_id)
        size = 2 + (cap_layer.vfu_compiled.size if cap_layer else 0)
        if not (cap_offset < offset + len(data) and offset < cap_offset + size):
            continue
        name = CAP_IDS.get(cap_id, f"capability {cap_id:#x}")
        cap_node = tree.add("pci.cap", None, data_pos + max(cap_offset - offset, 0), 0, node,
                            text=f"{name} capability at {cap_offset:#x}")
        add_registers(tree, cap_node, CapHeader, cap_offset, offset, data, data_pos)
        if cap_layer and overlaps(cap_layer, cap_offset + 2, offset, len(data)):
            add_registers(tree, cap_node, cap_layer, cap_offset + 2, offset, data, data_pos)
    if offset + len(data) > EXTENDED_START:
        start = max(offset, EXTENDED_START)
        tree.add("pci.extended", bytes(data[start - offset:]), data_pos + start - offset,
                 offset + len(data) - start, node)
    return " ".join(notes)


def _bar_sizing(tree: Tree, shadow: ConfigShadow, offset: int, data: bytes, data_pos: int,
                write: bool) -> list[str]:
    notes: list[Any] = []
    for bar_offset, index in BAR_OFFSETS.items():
        if not (offset <= bar_offset and bar_offset + 4 <= offset + len(data)):
            continue
        value = int.from_bytes(data[bar_offset - offset:bar_offset - offset + 4], "little")
        if write and value == BAR_PROBE:
            shadow.probing.add(bar_offset)
            notes.append(f"BAR{index} sizing probe")
        elif not write and bar_offset in shadow.probing:
            shadow.probing.discard(bar_offset)
            mask = ~0x3 if value & 1 else ~0xF          # I/O or memory BAR
            size = (~(value & mask) + 1) & 0xFFFFFFFF
            tree.add("pci.bar_size", size, data_pos + bar_offset - offset, 4)
            notes.append(f"BAR{index} size {size:#x}")
        elif write:
            shadow.probing.discard(bar_offset)
    return notes
