"""Per-partner access rights on RabbitMQ, derived from the directory.

Pure core: `grants_for` turns partners into permission regexes and `definitions` into a
RabbitMQ definitions document. Edges: `apply_with_rabbitmqctl` / `remove_with_rabbitmqctl`
(subprocess, argument lists, no shell) and the `partnerbus access` commands.

What a partner's user may do (see docs/ACCESS.md):

- read (consume, get) only its own queue `<prefix>.partner.<id>`;
- write only to `<prefix>.signals` and `<prefix>.statuses`, plus `<prefix>.consents` when
  it has advisors (a landlord's agency records consent): `partnerbus.directory.rights`, the
  one table every door reads (the HTTP gateway too);
- configure nothing: the bus declares every queue, partners use passive declares;
- on those topic exchanges, publish only with its own partner id as routing key
  (RabbitMQ topic permissions), or on the signals exchange `<partner id>.urgent` (the
  urgent signals' queue);
- no user tags, so no `impersonator`: RabbitMQ refuses a `user_id` property that is not
  the connection's own user name.

Passwords derive from one secret (HMAC-SHA256 of the secret and the user name), so
`export` and `apply` are reproducible. Production should prefer external authentication
(x509 certificates, LDAP, OAuth 2) or rotate the secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from faststream.rabbit import RabbitExchange
from rich.console import Console
from rich.table import Table

from partnerbus.broker.topology import URGENT_SUFFIX, Topology
from partnerbus.directory.rights import Intake, may_publish
from partnerbus.schemas.directory import Partner

NOTHING = ""
"""The empty regex: RabbitMQ grants nothing for it."""
TOPIC_NOTHING = "^$"
"""Topic read regex: no binding key matches (binding needs read on the exchange anyway)."""
HASHING_ALGORITHM = "rabbit_password_hashing_sha256"
SECRET_ENV = "PARTNERBUS_ACCESS_SECRET"  # noqa: S105 - the name of a variable


def _exact(names: Iterable[str]) -> str:
    """An anchored regex matching exactly these names, or nothing for no names."""
    escaped = [re.escape(n) for n in names]
    if not escaped:
        return NOTHING
    if len(escaped) == 1:
        return f"^{escaped[0]}$"
    return "^(" + "|".join(escaped) + ")$"


def intake_exchange(topology: Topology, intake: Intake) -> RabbitExchange:
    """The exchange of one intake of the rights table."""
    exchanges = {
        "signals": topology.signals,
        "statuses": topology.statuses,
        "consents": topology.consents,
    }
    return exchanges[intake]


@dataclass(frozen=True)
class PartnerGrant:
    """The RabbitMQ rights of one partner's user (regexes, anchored, names escaped)."""

    username: str
    partner_id: str
    configure: str
    write: str
    read: str
    topic_exchanges: tuple[str, ...] = ()
    """Topic exchanges on which the routing key is pinned by a topic permission."""
    topic_write: str = NOTHING
    """Routing keys it may publish with on `topic_exchanges`: its own partner id."""
    topic_read: str = TOPIC_NOTHING
    urgent_exchange: str = ""
    """The exchange where its key may also be `<partner id>.urgent` (the signals)."""

    def topic_write_on(self, exchange: str) -> str:
        """Routing keys it may publish with on `exchange`: its own partner id, and on the
        signals exchange also `<partner id>.urgent` (its urgent signals' queue)."""
        if exchange == self.urgent_exchange:
            return f"^{re.escape(self.partner_id)}({re.escape(URGENT_SUFFIX)})?$"
        return self.topic_write


def grants_for(
    partners: Iterable[Partner], topology: Topology, *, consent_writers: bool = True
) -> list[PartnerGrant]:
    """One grant per partner, sorted by user name; two partners on one user is an error.

    `consent_writers=False` withholds the consents exchange even from partners with advisors
    (when consents are recorded only through the bus's own tools)."""
    grants: dict[str, PartnerGrant] = {}
    for partner in partners:
        exchanges = [
            intake_exchange(topology, intake).name
            for intake in may_publish(partner, consent_writers=consent_writers)
        ]
        grant = PartnerGrant(
            username=partner.username,
            partner_id=partner.id,
            configure=NOTHING,
            write=_exact(exchanges),
            read=_exact([topology.partner_queue_name(partner.id)]),
            topic_exchanges=tuple(exchanges),
            topic_write=_exact([partner.id]),
            topic_read=TOPIC_NOTHING,
            urgent_exchange=topology.signals.name,
        )
        if grant.username in grants:
            other = grants[grant.username].partner_id
            msg = f"partners {other!r} and {partner.id!r} share the AMQP user {grant.username!r}"
            raise ValueError(msg)
        grants[grant.username] = grant
    return [grants[u] for u in sorted(grants)]


# passwords -----------------------------------------------------------------------------


def derive_password(secret: str, username: str) -> str:
    """A per-user password: HMAC-SHA256(secret, username), URL-safe base64 (43 chars)."""
    if not secret:
        msg = f"an access secret is required (option --secret or {SECRET_ENV})"
        raise ValueError(msg)
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def password_deriver(secret: str) -> Callable[[str], str]:
    """`password_for` for `definitions`: username -> derived password."""
    if not secret:
        derive_password(secret, "")  # raises the explanatory error
    return lambda username: derive_password(secret, username)


def rabbit_password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's `rabbit_password_hashing_sha256`: base64(salt ++ sha256(salt ++ password)),
    with a 4-byte salt."""
    salt = os.urandom(4) if salt is None else salt
    if len(salt) != 4:
        msg = "RabbitMQ password salts are 4 bytes"
        raise ValueError(msg)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def check_rabbit_password(password: str, password_hash: str) -> bool:
    raw = base64.b64decode(password_hash)
    return hmac.compare_digest(rabbit_password_hash(password, raw[:4]), password_hash)


# definitions ---------------------------------------------------------------------------


def definitions(
    partners: Iterable[Partner],
    topology: Topology,
    *,
    vhost: str = "/",
    password_for: Callable[[str], str],
    consent_writers: bool = True,
    salt_for: Callable[[str], bytes] | None = None,
) -> dict[str, Any]:
    """A RabbitMQ definitions document (`rabbitmqctl import_definitions FILE`) holding the
    vhost, one user per partner, its permissions and topic permissions. Nothing else: the
    topology is declared by the bus. `salt_for` fixes the salts (tests, byte-identical
    exports); by default each export salts afresh."""
    grants = grants_for(partners, topology, consent_writers=consent_writers)
    users = []
    permissions = []
    topic_permissions: list[dict[str, str]] = []
    for g in grants:
        salt = salt_for(g.username) if salt_for is not None else None
        users.append(
            {
                "name": g.username,
                "password_hash": rabbit_password_hash(password_for(g.username), salt),
                "hashing_algorithm": HASHING_ALGORITHM,
                "tags": "",
                "limits": {},
            }
        )
        permissions.append(
            {
                "user": g.username,
                "vhost": vhost,
                "configure": g.configure,
                "write": g.write,
                "read": g.read,
            }
        )
        topic_permissions.extend(
            {
                "user": g.username,
                "vhost": vhost,
                "exchange": exchange,
                "write": g.topic_write_on(exchange),
                "read": g.topic_read,
            }
            for exchange in g.topic_exchanges
        )
    return {
        "users": users,
        "vhosts": [{"name": vhost}],
        "permissions": permissions,
        "topic_permissions": topic_permissions,
        "parameters": [],
        "global_parameters": [],
        "policies": [],
        "queues": [],
        "exchanges": [],
        "bindings": [],
    }


# rabbitmqctl edge ----------------------------------------------------------------------


def _ctl(
    rabbitmqctl: str, node: str | None, args: Sequence[str], *, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [rabbitmqctl]
    if node:
        cmd += ["-n", node]
    cmd += list(args)
    return subprocess.run(  # noqa: S603 - an argument list, no shell
        cmd, input=stdin, capture_output=True, text=True, check=True, timeout=60
    )


def _existing_users(rabbitmqctl: str, node: str | None) -> set[str]:
    out = _ctl(rabbitmqctl, node, ["list_users", "--formatter", "json", "--quiet"]).stdout
    return {u["user"] for u in json.loads(out or "[]")}


def _topic_exchanges_of(rabbitmqctl: str, node: str | None, user: str, vhost: str) -> set[str]:
    out = _ctl(
        rabbitmqctl,
        node,
        ["list_user_topic_permissions", user, "--formatter", "json", "--quiet"],
    ).stdout
    return {p["exchange"] for p in json.loads(out or "[]") if p.get("vhost") == vhost}


def apply_with_rabbitmqctl(
    grants: Iterable[PartnerGrant],
    *,
    vhost: str,
    passwords: Mapping[str, str],
    rabbitmqctl: str = "rabbitmqctl",
    node: str | None = None,
) -> list[str]:
    """Create or update each grant's user (password on stdin, never on the command line),
    clear its tags, set its permissions and topic permissions, clear stale topic
    permissions of that vhost. Idempotent; returns what it did, one line per action."""
    done: list[str] = []
    existing = _existing_users(rabbitmqctl, node)
    for g in grants:
        password = passwords[g.username]
        if g.username in existing:
            _ctl(rabbitmqctl, node, ["change_password", g.username], stdin=password + "\n")
            done.append(f"change_password {g.username}")
        else:
            _ctl(rabbitmqctl, node, ["add_user", g.username], stdin=password + "\n")
            done.append(f"add_user {g.username}")
        _ctl(rabbitmqctl, node, ["set_user_tags", g.username])
        _ctl(
            rabbitmqctl,
            node,
            ["set_permissions", "-p", vhost, g.username, g.configure, g.write, g.read],
        )
        done.append(
            f"set_permissions -p {vhost} {g.username} {g.configure!r} {g.write!r} {g.read!r}"
        )
        for exchange in g.topic_exchanges:
            _ctl(
                rabbitmqctl,
                node,
                [
                    "set_topic_permissions",
                    "-p",
                    vhost,
                    g.username,
                    exchange,
                    g.topic_write_on(exchange),
                    g.topic_read,
                ],
            )
            done.append(
                f"set_topic_permissions -p {vhost} {g.username} {exchange} "
                f"{g.topic_write_on(exchange)!r} {g.topic_read!r}"
            )
        for stale in sorted(_topic_exchanges_of(rabbitmqctl, node, g.username, vhost)):
            if stale not in g.topic_exchanges:
                _ctl(rabbitmqctl, node, ["clear_topic_permissions", "-p", vhost, g.username, stale])
                done.append(f"clear_topic_permissions -p {vhost} {g.username} {stale}")
    return done


def remove_with_rabbitmqctl(
    usernames: Iterable[str], *, rabbitmqctl: str = "rabbitmqctl", node: str | None = None
) -> list[str]:
    """Delete these users (with their permissions) where they exist; idempotent."""
    existing = _existing_users(rabbitmqctl, node)
    done = []
    for user in usernames:
        if user in existing:
            _ctl(rabbitmqctl, node, ["delete_user", user])
            done.append(f"delete_user {user}")
    return done


# command line --------------------------------------------------------------------------

app = typer.Typer(
    help="Per-partner RabbitMQ users and rights, derived from the directory.",
    no_args_is_help=True,
)
console = Console()
err = Console(stderr=True)

SecretOption = Annotated[
    str,
    typer.Option(
        help="Secret the per-partner passwords derive from (HMAC of secret and user name); "
        f"default: {SECRET_ENV} (the settings).",
        show_default=False,
    ),
]
DirectoryOption = Annotated[
    Path | None,
    typer.Option(
        "--directory",
        help="Directory YAML/JSON file; default: PARTNERBUS_DIRECTORY_PATH, else the sample.",
    ),
]
VhostOption = Annotated[str, typer.Option(help="RabbitMQ virtual host.")]


def _context(
    directory: Path | None, secret: str
) -> tuple[list[Partner], Topology, Callable[[str], str]]:
    """The partners, topology and password deriver from the one configuration every
    command reads (`open_directory` names the directory on stderr); `--directory` and
    `--secret` override it."""
    from partnerbus.settings import Settings, open_directory

    settings = Settings()
    partners = list(open_directory(settings, directory).partners())
    try:
        password_for = password_deriver(secret or settings.access_secret.get_secret_value())
    except ValueError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    return partners, Topology(settings.prefix), password_for


def _grant_table(grants: Sequence[PartnerGrant], title: str) -> Table:
    table = Table(title=title)
    for column in ("user", "partner", "write (exchanges)", "read (queue)", "topic key"):
        table.add_column(column)
    for g in grants:
        table.add_row(g.username, g.partner_id, g.write, g.read, g.topic_write)
    return table


@app.command()
def apply(
    secret: SecretOption = "",
    vhost: VhostOption = "/",
    directory: DirectoryOption = None,
    rabbitmqctl: Annotated[str, typer.Option(help="The rabbitmqctl executable.")] = "rabbitmqctl",
    node: Annotated[str | None, typer.Option(help="Target node (rabbitmqctl -n).")] = None,
    consent_writers: Annotated[
        bool, typer.Option(help="Let partners with advisors publish consent events.")
    ] = True,
) -> None:
    """Create or update every partner's user and rights with rabbitmqctl (idempotent)."""
    partners, topology, password_for = _context(directory, secret)
    grants = grants_for(partners, topology, consent_writers=consent_writers)
    try:
        done = apply_with_rabbitmqctl(
            grants,
            vhost=vhost,
            passwords={g.username: password_for(g.username) for g in grants},
            rabbitmqctl=rabbitmqctl,
            node=node,
        )
    except subprocess.CalledProcessError as exc:
        err.print(f"[red]rabbitmqctl failed:[/red] {exc.stderr or exc.stdout}")
        raise typer.Exit(1) from None
    console.print(_grant_table(grants, f"access applied on vhost {vhost!r}"))
    console.print(f"{len(done)} rabbitmqctl actions for {len(grants)} partner users.")


@app.command()
def export(
    out: Annotated[Path, typer.Option("--out", help="Definitions file to write (JSON).")],
    secret: SecretOption = "",
    vhost: VhostOption = "/",
    directory: DirectoryOption = None,
    consent_writers: Annotated[
        bool, typer.Option(help="Let partners with advisors publish consent events.")
    ] = True,
) -> None:
    """Write a RabbitMQ definitions file (users, permissions, topic permissions) for
    `rabbitmqctl import_definitions` or `load_definitions`."""
    partners, topology, password_for = _context(directory, secret)
    doc = definitions(
        partners,
        topology,
        vhost=vhost,
        password_for=password_for,
        consent_writers=consent_writers,
    )
    out.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    out.chmod(0o600)
    console.print(
        f"wrote {out}: {len(doc['users'])} users, "
        f"{len(doc['topic_permissions'])} topic permissions, vhost {vhost!r}"
    )


__all__ = [
    "PartnerGrant",
    "apply_with_rabbitmqctl",
    "definitions",
    "derive_password",
    "grants_for",
    "intake_exchange",
    "password_deriver",
    "rabbit_password_hash",
    "remove_with_rabbitmqctl",
]
