"""The needs taxonomy: data·inclusion thématiques with parent fallback, plus local codes."""

from __future__ import annotations

from dataclasses import dataclass

LOCAL_PREFIX = "local-"


@dataclass(frozen=True, slots=True)
class Need:
    code: str
    label: str
    parent: str | None = None

    @property
    def local(self) -> bool:
        """A code the public taxonomy lacks, added by this directory."""
        return self.code.startswith(LOCAL_PREFIX)


def parent_code(code: str) -> str | None:
    """The taxonomy parent of a code: the part before `--` (None for a parent code)."""
    head, sep, _ = code.partition("--")
    return head if sep else None


def need_chain(needs: dict[str, Need], code: str) -> tuple[str, ...]:
    """The code and its ancestors, nearest first: what a partner may list to serve it."""
    out: list[str] = []
    current: str | None = code
    while current is not None and current in needs and current not in out:
        out.append(current)
        current = needs[current].parent
    return tuple(out)
