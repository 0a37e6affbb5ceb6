"""`partnerbus contract`: the published message schemas and the AsyncAPI document,
regenerated and checked."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from partnerbus.contract.asyncapi import ASYNCAPI_FILE, asyncapi_is_current, write_asyncapi
from partnerbus.contract.compat import compare, unbumped_breaks, version_of
from partnerbus.contract.disclosure import (
    DISCLOSURE_FILE,
    disclosure_is_current,
    write_disclosure,
)
from partnerbus.contract.schemas import SCHEMA_DIR, load_schemas, stale_schemas, write_schemas

app = typer.Typer(
    help="The contract partners code against: docs/schemas/ and docs/asyncapi.yaml, checked."
)
console = Console()
err = Console(stderr=True)

RELEASED_DIR = SCHEMA_DIR / "released"


@app.command("export")
def export(
    directory: Annotated[Path, typer.Option(help="Where to write the schemas.")] = SCHEMA_DIR,
    check: Annotated[
        bool,
        typer.Option("--check", help="Write nothing; exit 1 when the files differ from the code."),
    ] = False,
) -> None:
    """Write one JSON Schema per message (or, with --check, say which files are stale)."""
    if check:
        stale = stale_schemas(directory)
        if stale:
            err.print(
                f"[red]stale:[/red] {', '.join(stale)}: run `partnerbus contract export` "
                "and commit docs/schemas/"
            )
            raise typer.Exit(1)
        console.print(f"{directory}: current")
        return
    for path in write_schemas(directory):
        console.print(f"wrote {path}")


@app.command("compat")
def compat(
    released: Annotated[Path, typer.Option(help="The last release's schemas.")] = RELEASED_DIR,
    current: Annotated[Path, typer.Option(help="The schemas to check.")] = SCHEMA_DIR,
) -> None:
    """Compare the schemas with the last release's: exit 1 on a breaking change that did
    not bump the contract's version."""
    old, new = load_schemas(released), load_schemas(current)
    if not old:
        err.print(f"[red]no released schemas in {released}[/red]")
        raise typer.Exit(2)
    for change in compare(old, new):
        console.print(str(change), markup=False)
    breaks = unbumped_breaks(old, new)
    if breaks:
        err.print(
            f"[red]{len(breaks)} breaking change(s) without a version bump "
            f"(released {version_of(old)}, current {version_of(new)})[/red]: bump "
            "SCHEMA_VERSION and say why in docs/CHANGELOG-CONTRACT.md"
        )
        raise typer.Exit(1)
    console.print(f"compatible with the release (version {version_of(old)} → {version_of(new)})")


@app.command("disclosure")
def disclosure(
    path: Annotated[Path, typer.Option(help="The document holding the table.")] = DISCLOSURE_FILE,
    check: Annotated[
        bool,
        typer.Option("--check", help="Write nothing; exit 1 when the table differs from the code."),
    ] = False,
) -> None:
    """Render the disclosure table (message × field → roles) into docs/DISCLOSURE.md from
    the code's `ROLE_DISCLOSURE` (or, with --check, say whether it is current)."""
    if check:
        if not disclosure_is_current(path):
            err.print(
                f"[red]stale:[/red] {path}: run `partnerbus contract disclosure` and commit it"
            )
            raise typer.Exit(1)
        console.print(f"{path}: current")
        return
    console.print(f"wrote {write_disclosure(path)}")


@app.command("asyncapi")
def asyncapi(
    path: Annotated[Path, typer.Option(help="Where to write the document.")] = ASYNCAPI_FILE,
    check: Annotated[
        bool,
        typer.Option("--check", help="Write nothing; exit 1 when the file differs from the code."),
    ] = False,
) -> None:
    """Write the AsyncAPI 3 document of the bus, generated from the code (or, with --check,
    say whether the committed one is current)."""
    if check:
        if not asyncapi_is_current(path):
            err.print(f"[red]stale:[/red] {path}: run `partnerbus contract asyncapi` and commit it")
            raise typer.Exit(1)
        console.print(f"{path}: current")
        return
    console.print(f"wrote {write_asyncapi(path)}")
