"""What can go wrong when a directory is loaded."""

from __future__ import annotations

from dataclasses import dataclass

from partnerbus.errors import PartnerbusError


class DirectoryError(PartnerbusError):
    """A directory file that cannot be used: the message says which file and why."""


@dataclass(frozen=True, slots=True)
class RowError:
    """One rejected (or repaired) row of an import: the good rows are kept."""

    file: str
    row: int
    """0-based index of the row in the file's list of records."""
    field: str
    why: str
    record_id: str | None = None
    dropped: bool = True
    """True: the whole row was left out; False: only the faulty value was left out."""

    def __str__(self) -> str:
        what = "row dropped" if self.dropped else "value dropped"
        ident = f" ({self.record_id})" if self.record_id else ""
        return f"{self.file}:{self.row}{ident}: {self.field}: {self.why} [{what}]"
