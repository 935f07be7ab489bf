"""The package's layout: modules import alone, without cycles, without side effects."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import vfu_inspect

PACKAGE = Path(vfu_inspect.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imported(module: str, path: Path) -> set[str]:
    """The package's modules that `module` imports anywhere in its source
    (functions and `if TYPE_CHECKING:` blocks included)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:     # `from pkg import module` imports the module
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {name for name in found if name in MODULES and name != module}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == "open":
                return stack[stack.index(child):] + [child]
            if child not in state and (found := visit(child)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_import_graph_has_no_cycle() -> None:
    graph = {name: _imported(name, path) for name, path in MODULES.items()}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_one() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_imports_alone(module: str) -> None:
    """A fresh interpreter per module: an import that works only after
    another module's import has run fails here."""
    result = _run(f"import {module}")
    assert result.returncode == 0, result.stderr


REGISTRY_STATE = """
import importlib, sys
for module in sys.argv[1:]:
    importlib.import_module(module)
from vfu_inspect import devices, fields, registry
print(len(fields.REGISTRY), len(fields.EXPERTS), len(devices.DEVICES))
registry.load()
registry.load()
from vfu_inspect import dissect, events
from vfu_inspect.dissectors import device_sample, pci_config, vfio_user
declared = [fd.name for m in (vfio_user, pci_config, device_sample, dissect, events) for fd in m.FIELDS]
print(list(fields.REGISTRY) == declared, len(fields.EXPERTS) == len(vfio_user.CHECKS),
      list(devices.DEVICES) == [(0x5646, 0x0001)])
"""


def test_importing_registers_nothing_and_load_registers_everything_once() -> None:
    result = subprocess.run([sys.executable, "-c", REGISTRY_STATE, *sorted(MODULES)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    after_import, after_load = result.stdout.splitlines()
    assert after_import == "0 0 0"       # fields, checks, devices
    assert after_load == "True True True"
