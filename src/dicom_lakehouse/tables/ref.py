"""A table's three-part name, and where a local warehouse keeps it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dicom_lakehouse.params import IDENTIFIER


@dataclass(frozen=True)
class TableRef:
    catalog: str
    schema: str
    table: str

    def __post_init__(self):
        for part in (self.catalog, self.schema, self.table):
            if not IDENTIFIER.match(part):
                raise ValueError(f"unsafe identifier {part!r}")

    def staged(self, step: str) -> TableRef:
        return TableRef(self.catalog, self.schema, f"{self.table}__{step}")

    def derived(self, suffix: str) -> TableRef:
        return TableRef(self.catalog, self.schema, f"{self.table}_{suffix}")

    @property
    def name(self) -> str:
        return f"{self.catalog}.{self.schema}.{self.table}"

    @classmethod
    def parse(cls, name: str) -> TableRef:
        """`catalog.schema.table`, each part a SQL identifier (ValueError otherwise)."""
        parts = name.split(".")
        if len(parts) != 3 or not all(IDENTIFIER.match(p) for p in parts):
            raise ValueError(f"--table {name!r}: give catalog.schema.table, each a SQL identifier")
        return cls(*parts)

    def folder(self, warehouse: str | Path) -> Path:
        """Where a local warehouse keeps this table: `<warehouse>/<catalog>/<schema>/<table>`."""
        return Path(warehouse) / self.catalog / self.schema / self.table

    @property
    def quoted(self) -> str:
        return f"`{self.catalog}`.`{self.schema}`.`{self.table}`"
