"""Device layers: what a REGION_READ or REGION_WRITE means to the device.

A device dissector is a plug-in: a module named `device_*.py` in
`dissectors/`, or any `.py` file in a directory listed in
$VFU_INSPECT_PLUGINS.  It declares, as data, `DEVICES` (a `PciDevice` per
vendor and device id it knows, with a register layer per region) and
`FIELDS`, the `fields.Fields` its register layers are declared with, like the
protocol's own, so an access decodes as the registers it covers and every
register has a filter name.  `registry.load()` loads and registers them.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from scapy.packet import Packet

from . import dissectors, fields
from .tree import Tree

PLUGIN_PATH_VARIABLE = "VFU_INSPECT_PLUGINS"


@dataclass(frozen=True)
class PciDevice:
    name: str
    vendor: int
    device: int
    regions: dict[int, type[Packet]]      # region index -> registers at offset 0


DEVICES: dict[tuple[int, int], PciDevice] = {}


def device_for(identity: tuple[int, int] | None) -> PciDevice | None:
    return DEVICES.get(identity) if identity is not None else None


def load_plugins() -> None:
    """Register the bundled device dissectors, then the user's (`registry.load()`
    calls this once)."""
    for info in pkgutil.iter_modules(dissectors.__path__):
        if info.name.startswith("device_"):
            _register(importlib.import_module(f"{dissectors.__name__}.{info.name}"))
    for directory in filter(None, os.environ.get(PLUGIN_PATH_VARIABLE, "").split(os.pathsep)):
        for path in sorted(Path(directory).glob("*.py")):
            _load_file(path)


def _register(module: ModuleType) -> None:
    fields.register(getattr(module, "FIELDS", ()))
    for device in getattr(module, "DEVICES", ()):
        DEVICES[(device.vendor, device.device)] = device


def _load_file(path: Path) -> None:
    """A user plug-in that fails to load is reported once, not fatal."""
    spec = importlib.util.spec_from_file_location(f"vfu_inspect_plugin_{path.stem}", path)
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _register(module)
    except Exception as exc:          # any error in user code: report and go on
        print(f"vfu-inspect: device plug-in {path} not loaded: {type(exc).__name__}: {exc}",
              file=sys.stderr)


def add_registers(tree: Tree, parent: int, layer: type[Packet], base: int, access: int,
                  data: bytes, data_pos: int) -> int:
    """Add the registers of `layer` (placed at `base`) that the access at
    `access` covers whole; `data_pos` is where `data` sits in the message.
    Returns how many were added."""
    added, end = 0, access + len(data)
    for fd, rel, size in layer.vfu_compiled.fields:
        start = base + rel
        if access <= start and start + size <= end:
            chunk = data[start - access:start - access + size]
            value: Any = int.from_bytes(chunk, "little") if fd.type != "bytes" else bytes(chunk)
            tree.add(fd, value, data_pos + start - access, size, parent)
            added += 1
    return added


def overlaps(layer: type[Packet], base: int, access: int, length: int) -> bool:
    return base < access + length and access < base + layer.vfu_compiled.size
