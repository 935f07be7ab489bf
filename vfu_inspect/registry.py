"""Builds the registries once: every filter field, every check, every device dissector.

Modules declare what they contribute as data (`FIELDS`, `CHECKS`, a plug-in's
`DEVICES`); importing one registers nothing.  `load()` registers it all, in
the order the filter fields are listed (the Wireshark plugin keeps it):
protocol, PCI config space, device plug-ins, frame, events.  The entry points
call it (`cli.main`, the tests' conftest); it is idempotent.
"""

from __future__ import annotations

from . import devices, dissect, events, fields
from .dissectors import pci_config, vfio_user

_loaded = False


def load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    fields.register(vfio_user.FIELDS)
    fields.register_experts(vfio_user.CHECKS)
    fields.register(pci_config.FIELDS)
    devices.load_plugins()
    fields.register(dissect.FIELDS)
    fields.register(events.FIELDS)
