"""`partnerbus directory …`: check a directory, match a need, show the network."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from partnerbus.directory.check import check as run_check
from partnerbus.directory.check import communes_within, gaps_by_parent
from partnerbus.directory.errors import DirectoryError, RowError
from partnerbus.directory.match import ignored_qpv
from partnerbus.directory.match import match as run_match
from partnerbus.directory.model import Directory
from partnerbus.schemas import Profile

app = typer.Typer(
    help="The partner directory: check its data and coverage, match a need, draw the network.",
    no_args_is_help=True,
)
console = Console()
err_console = Console(stderr=True)
"""Where messages and tables go when stdout carries JSON."""

DirectoryOption = Annotated[
    Path | None,
    typer.Option(
        "--directory", "-d", help="YAML or JSON directory file (default: the bundled Lille sample)."
    ),
]
DiStructures = Annotated[
    Path | None,
    typer.Option("--di-structures", help="data·inclusion structures export (JSON)."),
]
DiServices = Annotated[
    Path | None,
    typer.Option("--di-services", help="data·inclusion services export (JSON)."),
]


def _load(
    path: Path | None,
    di_structures: Path | None = None,
    di_services: Path | None = None,
    *,
    out: Console = console,
) -> tuple[Directory, list[RowError]]:
    """The directory and the import's row errors; messages and tables go to `out`.
    Without `--directory`, the one the settings name (PARTNERBUS_DIRECTORY_PATH), else the
    bundled sample; which one is said on stderr."""
    from partnerbus.settings import Settings, open_directory

    settings = Settings()

    def say(line: str) -> None:  # stderr: stdout may carry JSON
        err_console.print(line, markup=False, highlight=False, soft_wrap=True)

    try:
        if di_structures is not None or di_services is not None:
            if di_structures is None or di_services is None:
                out.print("[red]give both --di-structures and --di-services[/red]")
                raise typer.Exit(2)
            from partnerbus.directory.datainclusion import load_data_inclusion

            path = path if path is not None else settings.directory_path
            base = open_directory(settings, path, say=say) if path is not None else None
            d, errors = load_data_inclusion(di_structures, di_services, base=base)
            say(f"directory: data·inclusion export {di_structures} ({len(d)} partners)")
            if errors:
                out.print(_import_table(errors))
            return d, errors
        if path is None and settings.directory_path is None:
            return open_directory(settings, say=say), []
        with Progress(
            TextColumn("loading {task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            console=out,
            transient=True,
        ) as bar:
            task = bar.add_task((path or settings.directory_path or Path()).name, total=1)

            def progress(_stage: str, done: int, total: int) -> None:
                bar.update(task, total=max(total, 1), completed=done)

            return open_directory(settings, path, say=say, progress=progress), []
    except DirectoryError as exc:
        out.print(f"[red]directory error:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from exc


def _import_table(errors: list[RowError], shown: int = 200) -> Table:
    dropped = sum(1 for e in errors if e.dropped)
    more = f", first {shown} shown" if len(errors) > shown else ""
    table = Table(
        title=f"{len(errors)} import problems ({dropped} rows dropped{more})", show_lines=False
    )
    for col in ("file", "row", "id", "field", "why", "kept"):
        table.add_column(col)
    for e in errors[:shown]:
        table.add_row(
            e.file,
            str(e.row),
            e.record_id or "",
            e.field,
            e.why,
            "no" if e.dropped else "row kept",
        )
    return table


@app.command()
def check(
    directory: DirectoryOption = None,
    sender: Annotated[
        str | None,
        typer.Option(help="Count only partners this sender may refer to (its agreements)."),
    ] = None,
    need: Annotated[
        list[str] | None, typer.Option("--need", help="Need to check (repeatable).")
    ] = None,
    departement: Annotated[
        str | None,
        typer.Option(
            "--departement", help="Look for coverage gaps in this département only (e.g. 59)."
        ),
    ] = None,
    di_structures: DiStructures = None,
    di_services: DiServices = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Machine-readable report on stdout (tables to stderr).")
    ] = False,
) -> None:
    """Report problems in the data and coverage gaps: which needs have no partner where.
    Exits 1 when the data has errors or the import reported problems."""
    out = err_console if as_json else console
    d, import_errors = _load(directory, di_structures, di_services, out=out)
    if sender is not None and sender not in d:
        out.print(f"[red]unknown sender {escape(repr(sender))}[/red]")
        raise typer.Exit(2)
    communes = None
    if departement is not None:
        found = d.territories.get(departement)
        if found is None or found.level != "departement":
            out.print(f"[red]unknown département {escape(repr(departement))}[/red]")
            raise typer.Exit(2)
        communes = communes_within(d, departement)
    report = run_check(d, needs=need or None, sender=sender, communes=communes)
    failed = bool(report.errors or import_errors)
    if as_json:
        payload = {
            "partners": len(d),
            "communes": report.communes_checked,
            "departement": departement,
            "problems": [asdict(p) for p in report.problems],
            "gaps": [
                {
                    "need": g.need,
                    "communes": list(g.communes),
                    "restricted_only": list(g.restricted_only),
                }
                for g in report.gaps
            ],
            "import_errors": [
                {
                    "file": e.file,
                    "row": e.row,
                    "record_id": e.record_id,
                    "field": e.field,
                    "why": e.why,
                    "dropped": e.dropped,
                }
                for e in import_errors
            ],
        }
        typer.echo(json.dumps(payload, ensure_ascii=False, indent=2))
        raise typer.Exit(1 if failed else 0)
    where = f" in département {departement}" if departement else ""
    console.print(
        f"[bold]{d.name or d.source}[/bold]: {len(d)} partners, "
        f"{report.communes_checked} communes{where}, {report.needs_checked} needs checked"
        + (f", as seen from {sender}" if sender else "")
    )
    if report.problems:
        table = Table(title="Problems")
        table.add_column("severity")
        table.add_column("subject")
        table.add_column("problem")
        style = {"error": "red", "warning": "yellow", "info": "dim"}
        for p in sorted(report.problems, key=lambda p: ("ewi".index(p.severity[0]), p.subject)):
            table.add_row(f"[{style[p.severity]}]{p.severity}[/]", p.subject, p.message)
        console.print(table)
    else:
        console.print("[green]no problems in the data[/green]")
    if report.gaps:
        total = report.communes_checked
        table = Table(title="Coverage gaps (communes without a partner open to all)")
        table.add_column("need")
        table.add_column("no partner", justify="right")
        table.add_column("restricted only", justify="right")
        table.add_column("where (first communes)")
        for g in report.gaps:
            names = list(g.communes[:4])
            more = " …" if len(g.communes) > 4 else ""
            table.add_row(
                g.need,
                f"{len(g.communes)}/{total}",
                str(len(g.restricted_only)),
                ", ".join(names) + more,
            )
        console.print(table)
        by_parent = gaps_by_parent(d, report.gaps)
        if by_parent:
            console.print(
                "communes with at least one gap, by EPCI/département: "
                + ", ".join(
                    f"{d.territories[k].name if k in d.territories else k} ({len(v)})"
                    for k, v in by_parent.items()
                )
            )
    else:
        console.print("[green]no coverage gap for the needs checked[/green]")
    if import_errors:
        dropped = sum(1 for e in import_errors if e.dropped)
        console.print(
            f"[red]the import left out {dropped} rows and "
            f"{len(import_errors) - dropped} values (see the import problems above)[/red]"
        )
    raise typer.Exit(1 if failed else 0)


@app.command()
def match(
    need: Annotated[str, typer.Option(help="Need code (data·inclusion thématique or local-…).")],
    commune: Annotated[str, typer.Option(help="INSEE code of the person's commune.")],
    directory: DirectoryOption = None,
    profile: Annotated[
        str | None,
        typer.Option(help='Profile as JSON, e.g. \'{"age_band": "75-plus", "qpv": "QN0590121"}\'.'),
    ] = None,
    sender: Annotated[str | None, typer.Option(help="Partner id raising the signal.")] = None,
    exclude: Annotated[
        list[str] | None, typer.Option(help="Partner id already tried (repeatable).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many candidates.")] = None,
    home_visit: Annotated[
        bool, typer.Option(help="The person wants a home visit: partners that visit first.")
    ] = False,
) -> None:
    """Print the ranked candidates for a need in a commune, with their reasons."""
    try:
        person = Profile.model_validate_json(profile) if profile else None
    except ValidationError as exc:
        console.print(f"[red]invalid --profile:[/red] {escape(_validation_reason(exc))}")
        raise typer.Exit(2) from exc
    d, _ = _load(directory)
    if not d.has_need(need):
        console.print(f"[red]unknown need {need!r}[/red]")
        raise typer.Exit(2)
    if not d.has_commune(commune):
        console.print(f"[red]unknown commune {commune!r}[/red]")
        raise typer.Exit(2)
    if sender is not None and sender not in d:
        console.print(f"[red]unknown sender {sender!r}[/red]")
        raise typer.Exit(2)
    candidates = run_match(
        d, need, commune, person, sender, frozenset(exclude or ()), limit, home_visit=home_visit
    )
    where = d.territories[commune].name
    console.print(
        f"[bold]{need}[/bold] in {commune} {where}" + (f" from {sender}" if sender else "")
    )
    ignored = ignored_qpv(d, commune, person)
    if ignored is not None:
        console.print(f"[yellow]{escape(ignored)}: it does not count for eligibility[/yellow]")
    if not candidates:
        console.print("[yellow]no partner found[/yellow]")
        raise typer.Exit(3)
    table = Table()
    table.add_column("#", justify="right")
    table.add_column("partner")
    table.add_column("kind")
    table.add_column("why")
    for c in candidates:
        table.add_row(
            str(c.rank),
            f"{c.partner_id}\n[dim]{c.partner.name}[/dim]",
            c.partner.kind,
            "\n".join(c.reasons),
        )
    console.print(table)
    for org in d.pivot_organisations(commune):
        agency = d.agency_for(commune, org)
        assert agency is not None
        advisor = d.advisor_for(agency.id, commune)
        console.print(
            f"agency: {agency.id}" + (f", advisor {advisor.id}" if advisor else "") + f" ({org})"
        )


@app.command()
def show(
    directory: DirectoryOption = None,
    commune: Annotated[str | None, typer.Option(help="INSEE code to centre on.")] = None,
    need: Annotated[str | None, typer.Option(help="Need code to centre on.")] = None,
    out: Annotated[Path | None, typer.Option(help="PNG file to write.")] = None,
    graphml: Annotated[Path | None, typer.Option(help="GraphML file to write (Gephi).")] = None,
    sender: Annotated[
        str | None, typer.Option(help="Also show this partner and its agreements.")
    ] = None,
) -> None:
    """Draw the partner network around a commune or a need (PNG and/or GraphML)."""
    from partnerbus.directory.render import neighbourhood, render_png, write_graphml

    if commune is None and need is None:
        console.print("[red]give --commune, --need or both[/red]")
        raise typer.Exit(2)
    if out is None and graphml is None:
        out = Path("directory.png")
    d, _ = _load(directory)
    try:
        graph = neighbourhood(d, commune=commune, need=need, sender=sender)
    except DirectoryError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    title = " · ".join(
        x
        for x in (
            f"{commune} {d.territories[commune].name}" if commune else "",
            need or "",
        )
        if x
    )
    if out is not None:
        render_png(graph, out, title=title)
        console.print(
            f"wrote {out} ({graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges)"
        )
    if graphml is not None:
        write_graphml(graph, graphml)
        console.print(f"wrote {graphml}")


def _validation_reason(exc: ValidationError) -> str:
    """A pydantic error as one line: `field: message; …` (the JSON error alone if the
    text is not JSON)."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err["loc"])
        parts.append(f"{where}: {err['msg']}" if where else err["msg"])
    return "; ".join(parts)
