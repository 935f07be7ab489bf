"""The device: DEVICE_GET_INFO and DEVICE_RESET.

The DEVICE_GET_INFO layer, its dissectors and checks (a PCI device with its
regions), DEVICE_RESET's bare messages, and the session side: the device
the connection describes, and a reset that leaves the migration ERROR state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scapy.packet import Packet

from vfu_inspect.fields import Fields, bits32, u32
from vfu_inspect.tree import Tree

from .core import REPLY, REQUEST, SPEC, Context, Dissectors, Payload, render_info, walk
from .protocol import DEVICE_INFO_FLAGS, ERROR_STATE, PCI_NUM_REGIONS, RUNNING
from .state import ConnState, Effect, EffectKind, Pending, SessionRules

if TYPE_CHECKING:
    from vfu_inspect.packet import Dissected

CHECKS: list[tuple[str, ...]] = [
    ("device_info.pci", "warning", "DEVICE_GET_INFO reply that is not a PCI device with at least the 9 PCI regions", f"{SPEC} § VFIO_USER_DEVICE_GET_INFO; § Device-Specific Regions"),
    ("device_reset.unsupported", "warning", "DEVICE_RESET to a device whose GET_INFO reply lacked RESET", f"{SPEC} § VFIO_USER_DEVICE_GET_INFO"),
]

FIELDS = Fields()


@FIELDS.layer("device_info")
class DeviceInfo(Packet):
    name = "DEVICE_GET_INFO"
    fields_desc = [u32("argsz", 16), bits32("flags", DEVICE_INFO_FLAGS),
                   u32("num_regions"), u32("num_irqs")]


# --- dissectors ---------------------------------------------------------------------

DISSECTORS = Dissectors()
DISSECTORS.declare("DEVICE_GET_INFO", REQUEST, Payload(
    DeviceInfo, argsz=REQUEST, zero=("flags", "num_regions", "num_irqs")))
DEVICE_INFO_REPLY = DISSECTORS.declare("DEVICE_GET_INFO", REPLY, Payload(
    DeviceInfo, argsz=REPLY, info="regions={num_regions} irqs={num_irqs} flags={flags:#x}"))


@DISSECTORS.reply("DEVICE_GET_INFO")
def _device_info_reply(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
    v = walk(tree, msg, off, DEVICE_INFO_REPLY).values
    if "num_irqs" not in v:
        return ""
    if not v["flags"] & DEVICE_INFO_FLAGS["pci"] or v["num_regions"] < PCI_NUM_REGIONS:
        tree.expert("device_info.pci", f"flags {v['flags']:#x}, {v['num_regions']} regions: "
                    f"the spec supports only PCI devices, with at least {PCI_NUM_REGIONS} regions")
    return render_info(DEVICE_INFO_REPLY, v)


DISSECTORS.bare("DEVICE_RESET", "request")
DISSECTORS.bare("DEVICE_RESET", "reply")


# --- the session -----------------------------------------------------------------------

SESSION = SessionRules(argsz_bounded=("DEVICE_GET_INFO",))


@SESSION.on_command("DEVICE_RESET")
def _reset_request(state: ConnState, p: Dissected) -> dict[str, Any]:
    if state.device is not None and not state.device["flags"] & DEVICE_INFO_FLAGS["reset"]:
        p.tree.expert("device_reset.unsupported", f"the device's GET_INFO reply had flags "
                      f"{state.device['flags']:#x}, without RESET")
    return {}


@SESSION.on_reply("DEVICE_GET_INFO")
def _apply_device_info_reply(state: ConnState, p: Dissected, request: Pending) -> None:
    v = p.tree.prefixed("device_info")
    if "num_irqs" in v:
        state.device = v


def _reset_apply(state: ConnState, e: Effect) -> int:
    saved = state.mig_state
    if state.mig_state == ERROR_STATE:
        state.mig_state = RUNNING
    return saved


def _reset_undo(state: ConnState, e: Effect) -> None:
    state.mig_state = e.saved


SESSION.effect("DEVICE_RESET", EffectKind(_reset_apply, _reset_undo, lambda v: "device reset",
                                          migration=True))
