"""Loading a directory file (YAML or JSON, format `partnerbus-directory/1`): the edge where
files become records. Everything after this module is pure."""

from __future__ import annotations

import csv
import gc
import json
from collections.abc import Callable, Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from partnerbus.directory.errors import DirectoryError
from partnerbus.directory.kinds import DATA_INCLUSION_KINDS, KIND_PATTERN
from partnerbus.directory.model import Directory
from partnerbus.directory.needs import LOCAL_PREFIX, Need, parent_code
from partnerbus.directory.territory import FRANCE, Territory, departement_of, region_key
from partnerbus.schemas import Agreement, Partner

FORMAT = "partnerbus-directory/1"
SAMPLE = "lille.yaml"

Progress = Callable[[str, int, int], None]
"""Called as progress(stage, done, total) while a large file loads."""


def _data_path(name: str) -> Path:
    return Path(str(resources.files("partnerbus.directory") / "data" / name))


@cache
def taxonomy() -> dict[str, Need]:
    """The bundled data·inclusion thématiques (parents and children)."""
    raw = yaml.safe_load(_data_path("needs.yaml").read_text(encoding="utf-8"))
    needs = {code: Need(code, label, None) for code, label in raw["parents"].items()}
    for code, label in raw["needs"].items():
        needs[code] = Need(code, label, parent_code(code))
    return needs


def load_sample() -> Directory:
    """The bundled Métropole Européenne de Lille / Nord sample: a fresh Directory on each
    call (its live capacity state is its own); the parsed file is read once."""
    path = _data_path(SAMPLE)
    return directory_from_document(_sample_document(), base=path.parent, origin=str(path))


@cache
def _sample_document() -> Mapping[str, Any]:
    # read only: directory_from_document leaves the document untouched unless it consumes it
    return read_document(_data_path(SAMPLE))


def read_document(path: Path) -> Mapping[str, Any]:
    """Parse a YAML or JSON directory file into a mapping; DirectoryError if unreadable."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        msg = f"{path}: cannot read the directory file ({exc.strerror or exc})"
        raise DirectoryError(msg) from exc
    try:
        raw = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        msg = f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {exc}"
        raise DirectoryError(msg) from exc
    if not isinstance(raw, dict):
        msg = f"{path}: a directory file is a mapping with `format`, `territory`, `partners`…"
        raise DirectoryError(msg)
    if raw.get("format") != FORMAT:
        msg = f"{path}: `format` must be {FORMAT!r}, found {raw.get('format')!r}"
        raise DirectoryError(msg)
    return raw


def load_directory(path: str | Path, *, progress: Progress | None = None) -> Directory:
    """Load a directory file (YAML or JSON). Raises DirectoryError with the file, the
    place and the reason when the file cannot be used."""
    path = Path(path)
    # A load creates millions of objects that all live on: the cyclic GC would walk them
    # again and again (seconds at national scale) to find nothing to free.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        raw = read_document(path)
        return directory_from_document(
            raw, base=path.parent, origin=str(path), progress=progress, consume=True
        )
    except DirectoryError as exc:
        if str(exc).startswith(str(path)):
            raise
        msg = f"{path}: {exc}"
        raise DirectoryError(msg) from exc
    except (TypeError, AttributeError, ValueError, KeyError) as exc:
        # a section of the wrong shape (a list where a mapping belongs, …)
        msg = f"{path}: malformed directory file ({type(exc).__name__}: {exc})"
        raise DirectoryError(msg) from exc
    finally:
        if gc_was_enabled:
            gc.enable()


def directory_from_document(
    raw: Mapping[str, Any],
    *,
    base: Path | None = None,
    origin: str = "<document>",
    progress: Progress | None = None,
    consume: bool = False,
) -> Directory:
    """Build a directory from a parsed document (the format of docs/DIRECTORY.md).
    With `consume`, the document's partner rows are released as they are validated
    (a national file then never sits in memory twice)."""
    territories = _territories(raw.get("territory") or {}, base)
    needs = dict(taxonomy())
    needs.update(_local_needs(raw.get("local_needs") or {}))
    partners = _partners(raw.get("partners") or [], progress, consume=consume)
    agreements = _agreements(raw.get("agreements") or [])
    organisations = raw.get("organisations") or {}
    if not isinstance(organisations, dict):
        msg = "`organisations` must map an organisation id to its name"
        raise DirectoryError(msg)
    return Directory(
        territories=territories,
        needs=needs,
        partners=partners,
        agreements=agreements,
        organisations={str(k): str(v) for k, v in organisations.items()},
        name=str(raw.get("name", "")),
        source=origin,
        local_kinds=_local_kinds(raw.get("local_kinds") or {}),
    )


def _named(value: Any) -> tuple[str, Mapping[str, Any]]:
    if isinstance(value, str):
        return value, {}
    if isinstance(value, dict):
        return str(value.get("name", "")), value
    msg = f"expected a name or a mapping, found {value!r}"
    raise DirectoryError(msg)


def _territories(raw: Mapping[str, Any], base: Path | None) -> dict[str, Territory]:
    out: dict[str, Territory] = {FRANCE: Territory(FRANCE, "France", "france", None)}
    for code, value in (raw.get("regions") or {}).items():
        name, _ = _named(value)
        key = region_key(str(code))
        out[key] = Territory(key, name, "region", FRANCE)
    for code, value in (raw.get("departements") or {}).items():
        name, attrs = _named(value)
        region = attrs.get("region")
        parent = region_key(str(region)) if region is not None else FRANCE
        if parent not in out:
            msg = f"territory.departements.{code}: unknown region {region!r}"
            raise DirectoryError(msg)
        out[str(code)] = Territory(str(code), name, "departement", parent)
    for code, value in (raw.get("epcis") or {}).items():
        name, attrs = _named(value)
        dep = str(attrs.get("departement", ""))
        if dep not in out:
            msg = f"territory.epcis.{code}: unknown departement {dep!r}"
            raise DirectoryError(msg)
        out[str(code)] = Territory(str(code), name, "epci", dep)

    # (code, name, EPCI, département): a commune lies in its own département, which its
    # INSEE code carries, whichever département its EPCI is filed under
    rows: list[tuple[str, str, str | None, str]] = []
    csv_name = raw.get("communes_csv")
    if csv_name:
        candidates = [Path(csv_name)] if base is None else [base / csv_name, Path(csv_name)]
        csv_path = next((p for p in candidates if p.exists()), None)
        if csv_path is None:
            msg = f"territory.communes_csv: file {csv_name!r} not found"
            raise DirectoryError(msg)
        with csv_path.open(encoding="utf-8", newline="") as fh:
            for i, row in enumerate(csv.DictReader(fh), start=2):
                missing = [
                    c for c in ("commune_insee", "commune_name", "epci_siren") if c not in row
                ]
                if missing:
                    msg = f"{csv_path}:{i}: missing column {missing[0]!r}"
                    raise DirectoryError(msg)
                code = row["commune_insee"]
                dep = row.get("departement") or departement_of(code)
                if dep != departement_of(code):
                    msg = (
                        f"{csv_path}:{i}: commune {code} is in département "
                        f"{departement_of(code)} (its INSEE code says so), not {dep}"
                    )
                    raise DirectoryError(msg)
                if dep not in out:
                    out[dep] = Territory(dep, dep, "departement", FRANCE)
                rows.append((code, row["commune_name"], row["epci_siren"], dep))
                if row["epci_siren"] not in out:
                    # filed under its first commune's département; it may span others
                    out[row["epci_siren"]] = Territory(
                        row["epci_siren"], row.get("epci_name", ""), "epci", dep
                    )
    for entry in raw.get("communes") or []:
        # compact rows [code, name, epci] keep a national file small; mappings also work
        if isinstance(entry, list | tuple):
            code, name, epci = [*entry, None, None][:3]
        else:
            code, name, epci = entry.get("code"), entry.get("name", ""), entry.get("epci")
        rows.append((str(code), str(name), str(epci) if epci else None, departement_of(str(code))))
    for code, name, epci, dep in rows:
        if out.get(dep) is None or out[dep].level != "departement":
            msg = f"territory: commune {code} ({name}) is in département {dep}, not declared"
            raise DirectoryError(msg)
        if epci is not None and epci not in out:
            msg = f"territory: commune {code} ({name}) names unknown EPCI {epci}"
            raise DirectoryError(msg)
        out[code] = Territory(code, name, "commune", epci or dep, departement=dep)
    for code, value in (raw.get("qpvs") or {}).items():
        name, attrs = _named(value)
        commune = str(attrs.get("commune", ""))
        if out.get(commune) is None or out[commune].level != "commune":
            msg = f"territory.qpvs.{code}: unknown commune {commune!r}"
            raise DirectoryError(msg)
        out[str(code)] = Territory(str(code), name, "qpv", commune)
    return out


def _local_needs(raw: Mapping[str, Any]) -> dict[str, Need]:
    out: dict[str, Need] = {}
    known = taxonomy()
    for code, value in raw.items():
        if not str(code).startswith(LOCAL_PREFIX):
            msg = f"local_needs.{code}: a local need code starts with {LOCAL_PREFIX!r}"
            raise DirectoryError(msg)
        label, attrs = _named(value) if isinstance(value, dict) else (str(value), {})
        label = str(attrs.get("label", label))
        parent = attrs.get("parent")
        if parent is not None and parent not in known and parent not in raw:
            msg = f"local_needs.{code}: unknown parent {parent!r}"
            raise DirectoryError(msg)
        out[str(code)] = Need(str(code), label, parent)
    return out


def _local_kinds(raw: Mapping[str, Any]) -> dict[str, str]:
    if not isinstance(raw, dict):
        msg = "`local_kinds` must map a local partner kind to its label"
        raise DirectoryError(msg)
    out: dict[str, str] = {}
    for code, label in raw.items():
        code = str(code)
        if not KIND_PATTERN.fullmatch(code):
            msg = f"local_kinds.{code}: a kind is 2-60 lowercase letters, digits or hyphens"
            raise DirectoryError(msg)
        if code in DATA_INCLUSION_KINDS:
            msg = f"local_kinds.{code}: a data·inclusion network code, not a local kind"
            raise DirectoryError(msg)
        out[code] = str(label)
    return out


def _partners(raw: list[Any], progress: Progress | None, *, consume: bool) -> list[Partner]:
    out: list[Partner] = []
    total = len(raw)
    step = max(total // 50, 1)
    for i, entry in enumerate(raw):
        try:
            out.append(Partner.model_validate(entry))
        except ValidationError as exc:
            ident = entry.get("id") if isinstance(entry, dict) else None
            msg = f"partners[{i}] ({ident}): {_first_error(exc)}"
            raise DirectoryError(msg) from exc
        if consume:
            raw[i] = None
        if progress is not None and i % step == 0:
            progress("partners", i, total)
    if progress is not None:
        progress("partners", total, total)
    return out


def _agreements(raw: list[Any]) -> list[Agreement]:
    out: list[Agreement] = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict):
            msg = f"agreements[{i}]: expected a mapping with `from` and `to`"
            raise DirectoryError(msg)
        data = dict(entry)
        both = bool(data.pop("both_ways", False))
        data.setdefault("from_org", data.pop("from", None))
        data.setdefault("to_org", data.pop("to", None))
        try:
            agreement = Agreement.model_validate(data)
        except ValidationError as exc:
            msg = f"agreements[{i}]: {_first_error(exc)}"
            raise DirectoryError(msg) from exc
        out.append(agreement)
        if both:
            out.append(
                Agreement(
                    from_org=agreement.to_org, to_org=agreement.from_org, needs=agreement.needs
                )
            )
    return out


def _first_error(exc: ValidationError) -> str:
    errors = exc.errors()
    parts = []
    for err in errors[:3]:
        where = ".".join(str(x) for x in err["loc"]) or "(record)"
        parts.append(f"{where}: {err['msg']}")
    more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more
