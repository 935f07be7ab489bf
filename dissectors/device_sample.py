"""The vfu-inspect sample device (`vfu-inspect sample-server`): BAR0 registers.

The sample server and client take their register map from this layer, so the
device and its dissector cannot disagree.
"""

from __future__ import annotations

from scapy.packet import Packet

from vfu_inspect.devices import PciDevice
from vfu_inspect.fields import Fields, u64

VENDOR_ID, DEVICE_ID = 0x5646, 0x0001     # "VF"
DMA_COMMANDS = {0: "idle", 1: "to device", 2: "from device"}
FIELDS = Fields()


@FIELDS.layer("vfu_sample.bar0")
class SampleBar0(Packet):
    name = "vfu-inspect sample device BAR0"
    fields_desc = [
        u64("id", base="hex", label="ID register"),
        u64("scratch", base="hex", label="Scratch register"),
        u64("dma_addr", base="hex", label="DMA address"),
        u64("dma_len", base="hex", label="DMA length"),
        u64("dma_cmd", values=DMA_COMMANDS, label="DMA command"),
        u64("irq", label="Interrupt vector to fire"),
    ]


DEVICES = [PciDevice("vfu-inspect sample device", VENDOR_ID, DEVICE_ID, {0: SampleBar0})]
