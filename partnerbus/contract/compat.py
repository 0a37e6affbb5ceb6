"""Is the contract still compatible with the last release? A structural comparison of two
sets of message schemas, by the direction of each message.

Written here rather than taken from a library: the Python ones validate documents, none
compares two schemas; the npm `json-schema-diff` reports added and removed values but knows
nothing of who sends a message, which decides whether a change breaks a partner. The rules:

- a message or a property removed, a type or pattern changed, a condition (allOf) changed:
  breaking;
- what partners send (inbound): a new required property, a value no longer accepted, null no
  longer accepted: breaking; an optional property added: compatible;
- what the bus sends (outbound): a property no longer always there, a new value, null where
  there was none: breaking; a property added: compatible (the contract asks readers to
  ignore fields they do not know).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Schema = dict[str, Any]


@dataclass(frozen=True)
class Change:
    message_type: str
    where: str
    what: str
    breaking: bool

    def __str__(self) -> str:
        mark = "BREAKING" if self.breaking else "compatible"
        return f"{mark}: {self.message_type} {self.where}: {self.what}"


def _resolve(node: Schema, root: Schema) -> Schema:
    while "$ref" in node:
        ref = node["$ref"]
        if not ref.startswith("#/$defs/"):
            break
        node = root.get("$defs", {})[ref.removeprefix("#/$defs/")]
    return node


def _facets(node: Schema, root: Schema) -> tuple[Schema, bool]:
    """The schema without its `null` alternative, and whether null is accepted."""
    node = _resolve(node, root)
    options = node.get("anyOf")
    if options:
        nullable = any(_resolve(o, root).get("type") == "null" for o in options)
        rest = [_resolve(o, root) for o in options if _resolve(o, root).get("type") != "null"]
        if len(rest) == 1:
            return rest[0], nullable
        return {"anyOf": rest}, nullable
    return node, node.get("type") == "null"


def _values(node: Schema) -> set[Any] | None:
    if "const" in node:
        return {node["const"]}
    if "enum" in node:
        return set(node["enum"])
    return None


class _Walker:
    def __init__(self, message_type: str, inbound: bool, outbound: bool) -> None:
        self.message_type = message_type
        self.inbound = inbound
        self.outbound = outbound
        self.changes: list[Change] = []

    def note(
        self,
        where: str,
        what: str,
        *,
        inbound: bool = False,
        outbound: bool = False,
        always: bool = False,
    ) -> None:
        breaking = always or (inbound and self.inbound) or (outbound and self.outbound)
        self.changes.append(Change(self.message_type, where or "(message)", what, breaking))

    def walk(
        self, old: Schema, old_root: Schema, new: Schema, new_root: Schema, where: str
    ) -> None:
        old, old_null = _facets(old, old_root)
        new, new_null = _facets(new, new_root)
        if old_null and not new_null:
            self.note(where, "null no longer accepted", inbound=True)
        if new_null and not old_null:
            self.note(where, "may now be null", outbound=True)
        if old.get("type") != new.get("type") and "anyOf" not in old and "anyOf" not in new:
            self.note(where, f"type {old.get('type')} → {new.get('type')}", always=True)
            return
        if old.get("pattern") != new.get("pattern"):
            self.note(where, "pattern changed", always=True)
        old_values, new_values = _values(old), _values(new)
        if old_values is not None and new_values is not None:
            if removed := old_values - new_values:
                self.note(where, f"values removed: {sorted(map(str, removed))}", inbound=True)
            if added := new_values - old_values:
                self.note(where, f"values added: {sorted(map(str, added))}", outbound=True)
        elif (old_values is None) != (new_values is None):
            self.note(where, "a fixed list of values added or removed", always=True)
        if old.get("allOf") != new.get("allOf"):
            self.note(where, "conditions (allOf) changed", always=True)
        if "items" in old and "items" in new:
            self.walk(old["items"], old_root, new["items"], new_root, f"{where}[]")
        if old.get("type") == "object" or "properties" in old:
            self.walk_object(old, old_root, new, new_root, where)

    def walk_object(
        self, old: Schema, old_root: Schema, new: Schema, new_root: Schema, where: str
    ) -> None:
        old_props: Schema = old.get("properties", {})
        new_props: Schema = new.get("properties", {})
        old_req, new_req = set(old.get("required", ())), set(new.get("required", ()))
        for name in sorted(old_props.keys() - new_props.keys()):
            self.note(f"{where}.{name}".lstrip("."), "property removed", always=True)
        for name in sorted(new_props.keys() - old_props.keys()):
            required = name in new_req
            self.note(
                f"{where}.{name}".lstrip("."),
                "required property added" if required else "optional property added",
                inbound=required,
            )
        for name in sorted(old_props.keys() & new_props.keys()):
            path = f"{where}.{name}".lstrip(".")
            if name in new_req and name not in old_req:
                self.note(path, "now required", inbound=True)
            if name in old_req and name not in new_req:
                self.note(path, "no longer required", outbound=True)
            self.walk(old_props[name], old_root, new_props[name], new_root, path)


def compare(old: dict[str, Schema], new: dict[str, Schema]) -> list[Change]:
    """Every difference between two sets of message schemas (type → schema), each marked
    breaking or compatible for the partners of that message."""
    changes: list[Change] = []
    for message_type in sorted(old.keys() - new.keys()):
        changes.append(Change(message_type, "(message)", "message removed", True))
    for message_type in sorted(new.keys() - old.keys()):
        changes.append(Change(message_type, "(message)", "message added", False))
    for message_type in sorted(old.keys() & new.keys()):
        o, n = old[message_type], new[message_type]
        direction = n.get("x-partnerbus-direction") or o.get("x-partnerbus-direction", "both")
        walker = _Walker(
            message_type,
            inbound=direction in ("inbound", "both"),
            outbound=direction in ("outbound", "both"),
        )
        walker.walk(o, o, n, n, "")
        changes += walker.changes
    return changes


def version_of(schemas: dict[str, Schema]) -> int | None:
    versions = [
        int(s["x-partnerbus-contract-version"])
        for s in schemas.values()
        if s.get("x-partnerbus-contract-version") is not None
    ]
    return max(versions) if versions else None


def unbumped_breaks(released: dict[str, Schema], current: dict[str, Schema]) -> list[Change]:
    """The breaking changes since `released`, when the contract's version was not bumped
    (empty when it was: a new major version may break)."""
    if (version_of(current) or 0) > (version_of(released) or 0):
        return []
    return [c for c in compare(released, current) if c.breaking]
