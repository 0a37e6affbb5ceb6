"""`partnerbus ops serve`: the ops console (per-partner figures, alerts, charts, the dead
letters), Prometheus metrics, liveness and readiness.

Access (docs/OPERATIONS.md):
- the page signs people in with a form (`/login`) and a signed session cookie (HttpOnly,
  SameSite=Strict, `partnerbus_ops`); a request without one is sent to `/login`
  and gets no figure. The `ops` role signs in with `PARTNERBUS_OPS_USER` and
  `PARTNERBUS_OPS_PASSWORD` (without which the app refuses to start); a partner's staff sign
  in with the partner's HTTP gateway token and see only their partner's row and letters;
- every POST (replay, purge, sign-out) carries the session's CSRF token, and its body is
  bounded; replay and purge are the `ops` role's, through `partnerbus dlq`'s own code;
- `/metrics` takes the ops credential as HTTP Basic (or an ops session); the pages take it
  too, for scripts;
- `/health` is open and says only that the process is up; `/ready`, open too, says whether
  the broker and the ledger answer (up or down, nothing else).

Every viewer gets the same snapshot, taken at most once per `PARTNERBUS_OPS_REFRESH_S` over
one long-lived AMQP connection.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, TypeVar
from urllib.parse import parse_qs, quote

from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from jinja2 import Environment, FileSystemLoader, select_autoescape
from limits import parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from partnerbus.broker.dlq import purge_letters, replay_letters
from partnerbus.broker.topology import Topology
from partnerbus.directory import Directory
from partnerbus.entrypoints.gateway import TOKEN_SHAPE, TokenFile, read_bounded, token_digest
from partnerbus.ledger.store import Store
from partnerbus.ops import charts as chart_models
from partnerbus.ops.monitor import (
    BrokerProbe,
    PartnerInfo,
    Snapshot,
    SnapshotCache,
    Thresholds,
    human_duration,
    metrics,
    snapshot,
)
from partnerbus.ops.session import (
    COOKIE,
    Role,
    Session,
    csrf_ok,
    new_session,
    session_key,
    sign,
    verify,
)
from partnerbus.schemas import utcnow
from partnerbus.settings import Settings, amqp_user

T = TypeVar("T")
log = logging.getLogger("partnerbus.ops")
MIN_PASSWORD_CHARS = 16
REALM = "partnerbus ops"
BASIC = HTTPBasic(realm=REALM, auto_error=False)
MAX_FORM_BYTES = 4096
LOGIN_ATTEMPTS = parse("10/minute")
"""Sign-in attempts per client address (and for the ops user, from anywhere: 30/minute),
right or wrong: guessing is slow, the real user hardly notices."""
OPS_LOGIN_ATTEMPTS = parse("30/minute")
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def ops_credentials(settings: Settings) -> tuple[bytes, bytes]:
    """The page's user and password, as bytes; ValueError when the password is missing or
    short (the page shows the bus's state: it is never served without one)."""
    password = settings.ops_password.get_secret_value()
    if len(password) < MIN_PASSWORD_CHARS or not (password + settings.ops_user).isascii():
        msg = (
            f"the ops page needs PARTNERBUS_OPS_PASSWORD (at least {MIN_PASSWORD_CHARS} "
            "ASCII characters, e.g. `openssl rand -base64 24`)"
        )
        raise ValueError(msg)
    return settings.ops_user.encode(), password.encode()


def _templates() -> Environment:
    folder = Path(str(resources.files("partnerbus.ops") / "templates"))
    env = Environment(
        loader=FileSystemLoader(folder),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals["duration"] = human_duration
    return env


class LoginNeededError(Exception):
    """No valid session on a page: sent to /login (htmx gets a redirect header)."""


def create_ops_app(
    settings: Settings,
    directory: Directory,
    store: Store,
    clock: Callable[[], datetime] = utcnow,
) -> FastAPI:
    user, password = ops_credentials(settings)
    key = session_key(password.decode())
    topology = Topology(settings.prefix)
    infos = [PartnerInfo(p.id, p.name, p.kind, p.username) for p in directory.partners()]
    partner_ids = [p.id for p in infos]
    dlq_names = {topology.dlq_name(q) for q in topology.all_work_queue_names(partner_ids)}
    probe = BrokerProbe(settings.amqp_url.get_secret_value())
    own_user = amqp_user(settings.amqp_url.get_secret_value())
    thresholds = Thresholds(settings.ops_oldest_message_alert_s, settings.ops_scheduler_alert_s)
    tokens = TokenFile(settings.gateway_tokens_path) if settings.gateway_tokens_path else None
    env = _templates()
    last: list[Snapshot] = []
    attempts = MovingWindowRateLimiter(MemoryStorage())

    async def take() -> Snapshot:
        snap = await snapshot(
            probe,
            topology,
            infos,
            store,
            clock(),
            own_user=own_user,
            previous=last[-1] if last else None,
            thresholds=thresholds,
        )
        last[:] = [snap]
        return snap

    cache = SnapshotCache(take, settings.ops_refresh_s)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await probe.close()

    app = FastAPI(title="partnerbus ops", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.snapshots = cache
    app.state.probe = probe

    @app.middleware("http")
    async def headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.exception_handler(LoginNeededError)
    async def to_login(request: Request, _exc: LoginNeededError) -> Response:
        if request.headers.get("hx-request"):
            return Response(status_code=401, headers={"HX-Redirect": "/login"})
        return RedirectResponse("/login", status_code=status.HTTP_303_SEE_OTHER)

    def basic_ok(credentials: HTTPBasicCredentials) -> bool:
        """Compared in constant time, as bytes."""
        user_ok = hmac.compare_digest(credentials.username.encode(), user)
        password_ok = hmac.compare_digest(credentials.password.encode(), password)
        return user_ok and password_ok

    def challenge() -> HTTPException:
        return HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "the ops page needs its credentials (HTTP Basic)",
            headers={"WWW-Authenticate": f'Basic realm="{REALM}"'},
        )

    def cookie_session(request: Request) -> Session | None:
        found = verify(request.cookies.get(COOKIE), key)
        if found is not None and found.role == "partner":
            # the token it signed in with must still be the partner's (not revoked)
            partner = (
                tokens.partner_of_digest(found.token_digest or "") if tokens is not None else None
            )
            if partner != found.partner:
                return None
        return found

    def viewer(
        request: Request,
        credentials: Annotated[HTTPBasicCredentials | None, Depends(BASIC)],
    ) -> Session:
        """A page's viewer: its session, or the ops credential as HTTP Basic (scripts). No
        credential at all: to /login; a wrong or malformed Basic one: 401."""
        if credentials is not None or request.headers.get("authorization"):
            if credentials is not None and basic_ok(credentials):
                return Session("ops", None, "", 0)
            raise challenge()
        found = cookie_session(request)
        if found is None:
            raise LoginNeededError
        return found

    def operator(
        request: Request,
        credentials: Annotated[HTTPBasicCredentials | None, Depends(BASIC)],
    ) -> Session:
        """/metrics: the ops credential as HTTP Basic, or an ops session; else 401."""
        if credentials is not None and basic_ok(credentials):
            return Session("ops", None, "", 0)
        found = None if request.headers.get("authorization") else cookie_session(request)
        if found is not None and found.role == "ops":
            return found
        raise challenge()

    as_viewer = Depends(viewer)
    as_operator = Depends(operator)

    def render(name: str, code: int = 200, **values: Any) -> HTMLResponse:
        values.setdefault("prefix", settings.prefix)
        values.setdefault("session", None)
        return HTMLResponse(env.get_template(name).render(**values), status_code=code)

    def figures_values(snap: Snapshot, who: Session, show_all: bool) -> dict[str, Any]:
        seen = snap if who.role == "ops" else snap.for_partner(who.partner or "")
        rows = seen.partners
        hidden = 0
        if who.role == "ops" and not show_all:
            # a partner with nothing to show (no traffic, no consumer, nothing queued, no
            # letter) is left out, and counted
            shown = [
                r
                for r in rows
                if r.received
                or r.sent
                or r.dead_lettered
                or r.awaiting
                or r.queue_depth
                or r.consumers
            ]
            hidden = len(rows) - len(shown)
            rows = shown
        return {
            "snap": seen,
            "rows": rows,
            "hidden_idle": hidden,
            "show_all_link": True,
            "session": who,
            "refresh_s": max(1, int(settings.ops_refresh_s)),
            "charts": chart_models.charts(seen) if who.role == "ops" else [],
        }

    async def form(request: Request) -> dict[str, str]:
        """A bounded urlencoded form: one value per field (the first)."""
        body = await read_bounded(request, MAX_FORM_BYTES)
        try:
            fields = parse_qs(body.decode("ascii"), max_num_fields=12)
        except (UnicodeDecodeError, ValueError):
            raise HTTPException(400, "not a form") from None
        return {k: v[0] for k, v in fields.items() if v}

    def same_origin(request: Request) -> None:
        """A POST from another site is refused whatever it carries (SameSite=Strict keeps
        the cookie off it already; this says so early)."""
        origin = request.headers.get("origin")
        if origin is not None and origin != "null":
            host = request.headers.get("host", "")
            if origin.split("://", 1)[-1] != host:
                raise HTTPException(403, "cross-site request refused")

    # sign-in ---------------------------------------------------------------------------
    @app.get("/login", response_class=HTMLResponse)
    async def login_page() -> HTMLResponse:
        return render("login.html", prefix="sign in", user=settings.ops_user)

    def signed_in(session: Session) -> Response:
        response = RedirectResponse("/", status_code=status.HTTP_303_SEE_OTHER)
        response.set_cookie(
            COOKIE,
            sign(session, key),
            max_age=settings.ops_session_max_age_s,
            httponly=True,
            samesite="strict",
            secure=False,  # served behind TLS by a proxy, or on loopback
            path="/",
        )
        return response

    @app.post("/login")
    async def login(request: Request) -> Response:
        same_origin(request)
        fields = await form(request)
        role: Role = "partner" if fields.get("role") == "partner" else "ops"
        client = request.client.host if request.client else "-"
        if not attempts.hit(LOGIN_ATTEMPTS, "ops-login", client) or (
            role == "ops" and not attempts.hit(OPS_LOGIN_ATTEMPTS, "ops-login", "ops-user")
        ):
            log.warning("ops page: too many sign-in attempts (%s)", role)
            return render(
                "login.html", 429, prefix="sign in", user="", error="too many attempts: wait"
            )
        if role == "ops":
            given = HTTPBasicCredentials(
                username=fields.get("user", ""), password=fields.get("password", "")
            )
            try:
                ok = basic_ok(given)
            except TypeError:  # non-ASCII: compare_digest takes bytes of any value
                ok = False
            if ok:
                log.info("ops page: ops signed in")
                return signed_in(new_session("ops", None, settings.ops_session_max_age_s))
        else:
            token = fields.get("token", "")
            partner = (
                tokens.partner_id(token)
                if tokens is not None and TOKEN_SHAPE.fullmatch(token)
                else None
            )
            if partner is not None:
                log.info("ops page: staff of %s signed in", partner)
                return signed_in(
                    new_session(
                        "partner", partner, settings.ops_session_max_age_s, token_digest(token)
                    )
                )
        return render(
            "login.html",
            401,
            prefix="sign in",
            user=fields.get("user", "")[:80],
            error="wrong credentials",
        )

    @app.post("/logout")
    async def logout(request: Request, who: Session = as_viewer) -> Response:
        same_origin(request)
        if not csrf_ok(who, (await form(request)).get("csrf")):
            raise HTTPException(403, "missing or wrong CSRF token")
        response = RedirectResponse("/login", status_code=status.HTTP_303_SEE_OTHER)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return response

    # pages -----------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    async def index(who: Session = as_viewer, all: int = 0) -> HTMLResponse:
        values = figures_values(await cache.get(), who, bool(all))
        return render("index.html", **values)

    @app.get("/figures", response_class=HTMLResponse)
    async def figures(who: Session = as_viewer, all: int = 0) -> HTMLResponse:
        """The figures alone, for htmx to swap in without reloading the page."""
        values = figures_values(await cache.get(), who, bool(all))
        return render("figures.html", **values)

    @app.get("/letters", response_class=HTMLResponse)
    async def letters(
        who: Session = as_viewer, partner: str | None = None, message: str = ""
    ) -> HTMLResponse:
        if partner is not None and not who.may_see(partner):
            raise HTTPException(403, "another partner's letters")
        snap = await cache.get()
        seen = snap if who.role == "ops" else snap.for_partner(who.partner or "")
        shown = [x for x in seen.letters if partner is None or x.partner == partner]
        return render("letters.html", letters=shown, session=who, message=message[:200])

    def done(text_: str) -> Response:
        probe.forget_letters()
        cache.expire()
        return RedirectResponse(
            f"/letters?message={quote(text_)}", status_code=status.HTTP_303_SEE_OTHER
        )

    async def on_letter(
        request: Request, who: Session, act: Callable[..., Awaitable[T]]
    ) -> tuple[str, T]:
        """A replay or purge of one dead letter (the form's queue and message id), through
        `partnerbus dlq`'s own code: the message id and what `act` returned."""
        same_origin(request)
        fields = await form(request)
        if not csrf_ok(who, fields.get("csrf")):
            raise HTTPException(403, "missing or wrong CSRF token")
        if who.role != "ops":
            raise HTTPException(403, "replay and purge are for the ops role")
        queue, message_id = fields.get("queue", ""), fields.get("message_id", "")
        if queue not in dlq_names or not message_id or len(message_id) > 128:
            raise HTTPException(400, "no such dead-letter queue or message id")
        by = f"ops-page:{settings.ops_user}"
        outcome = await act(
            await probe.connection(),
            settings,
            topology,
            partner_ids,
            store,
            by,
            {message_id},
            queues=[queue],
        )
        return message_id, outcome

    @app.post("/letters/replay")
    async def replay(request: Request, who: Session = as_viewer) -> Response:
        message_id, outcome = await on_letter(request, who, replay_letters)
        if outcome.refused:
            return done(f"{message_id} not replayed: {outcome.refused[0][1]}")
        if not outcome.replayed:
            return done(f"{message_id}: no such dead letter (replayed or purged already?)")
        return done(f"{message_id} replayed")

    @app.post("/letters/purge")
    async def purge(request: Request, who: Session = as_viewer) -> Response:
        message_id, purged = await on_letter(request, who, purge_letters)
        return done(f"{message_id} purged" if purged else f"{message_id}: no such dead letter")

    @app.get("/static/{name}")
    async def static(name: str) -> Response:
        kinds = {"htmx.min.js": "text/javascript", "ops.css": "text/css"}
        if name not in kinds:
            raise HTTPException(404)
        body = (resources.files("partnerbus.ops") / "static" / name).read_bytes()
        return Response(
            body, media_type=kinds[name], headers={"Cache-Control": "public, max-age=3600"}
        )

    # machines --------------------------------------------------------------------------
    @app.get("/metrics")
    async def prometheus(_who: Session = as_operator) -> Response:
        return Response(metrics(await cache.get()), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health() -> JSONResponse:
        """Liveness, open to anyone: the process answers."""
        return JSONResponse({"status": "up"})

    def ledger_answers() -> None:
        with store.read() as tx:  # no write lock (SQLite's BEGIN IMMEDIATE otherwise)
            tx.conn.execute(text("SELECT 1"))

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """Readiness, open to anyone: the broker and the ledger answer (up or down, no
        error text, no address)."""
        try:
            ok = (await cache.get()).broker_error is None
            if ok:
                await asyncio.to_thread(ledger_answers)
        except Exception as exc:  # the ledger cannot be read
            log.warning("ops ready: the ledger is unreadable (%s)", type(exc).__name__)
            ok = False
        return JSONResponse({"status": "up" if ok else "down"}, status_code=200 if ok else 503)

    return app
