"""The published contract: one JSON Schema per message (docs/schemas/), the AsyncAPI
document of the bus (docs/asyncapi.yaml), and the check that a change which would break a
partner bumps the contract's version."""

from .catalog import CATALOG, Contracted, contracted
from .compat import Change, compare
from .schemas import SCHEMA_DIR, load_schemas, render_schemas, schema_file, stale_schemas

__all__ = [
    "CATALOG",
    "SCHEMA_DIR",
    "Change",
    "Contracted",
    "compare",
    "contracted",
    "load_schemas",
    "render_schemas",
    "schema_file",
    "stale_schemas",
]
