"""Importers: turn other records of a vfio-user session into capture records."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..records import Record


@dataclass
class ImportResult:
    records: list[Record] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)   # what could not be imported, and why
