"""Configuration, read from the environment (prefix PARTNERBUS_) or a `.env` file."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from partnerbus.directory import Directory


def amqp_user(url: str) -> str:
    """The user name of an AMQP URL: the bus's own user when it is the bus's URL."""
    return unquote(urlsplit(url).username or "guest")


class Deadlines(BaseSettings):
    """Hours a partner has to answer a referral, per urgency, and when to remind it."""

    model_config = SettingsConfigDict(
        env_prefix="PARTNERBUS_DEADLINE_", env_file=".env", extra="ignore", frozen=True
    )

    routine_hours: float = 10 * 24
    urgent_hours: float = 72
    asap_hours: float = 24
    reminder_fraction: float = Field(default=0.5, gt=0, lt=1)
    """A reminder leaves when this share of the deadline has passed."""


class ParkedNeeds(BaseSettings):
    """Hours a need may wait for the person's consent, per urgency: the advisor is reminded
    after `*_remind_hours`; the need closes (`consent-not-obtained`) after `*_close_hours`
    (and never sooner after the reminder than the difference of the two)."""

    model_config = SettingsConfigDict(
        env_prefix="PARTNERBUS_PARKED_", env_file=".env", extra="ignore", frozen=True
    )

    routine_remind_hours: float = Field(default=7 * 24, gt=0)
    routine_close_hours: float = Field(default=30 * 24, gt=0)
    urgent_remind_hours: float = Field(default=3 * 24, gt=0)
    urgent_close_hours: float = Field(default=14 * 24, gt=0)
    asap_remind_hours: float = Field(default=24, gt=0)
    asap_close_hours: float = Field(default=7 * 24, gt=0)


class StalledReferrals(BaseSettings):
    """Hours an accepted referral may go without news, per urgency: the partner is reminded
    after `*_remind_hours`; the advisor is told after `*_report_hours` (and never sooner
    after the reminder than the difference of the two)."""

    model_config = SettingsConfigDict(
        env_prefix="PARTNERBUS_STALLED_", env_file=".env", extra="ignore", frozen=True
    )

    routine_remind_hours: float = Field(default=30 * 24, gt=0)
    routine_report_hours: float = Field(default=45 * 24, gt=0)
    urgent_remind_hours: float = Field(default=14 * 24, gt=0)
    urgent_report_hours: float = Field(default=21 * 24, gt=0)
    asap_remind_hours: float = Field(default=7 * 24, gt=0)
    asap_report_hours: float = Field(default=10 * 24, gt=0)


def pseudonym_key_of(settings: Settings) -> bytes:
    """The settings' pseudonym key, checked: `PseudonymKeyError` (a `ValueError`) saying
    why and how to make one when it is missing, short or a known value."""
    from partnerbus.rules import check_pseudonym_key

    key = settings.pseudonym_key
    return check_pseudonym_key(key.get_secret_value() if key is not None else None)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PARTNERBUS_", env_file=".env", extra="ignore", frozen=True
    )

    amqp_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    database_url: str = "sqlite:///partnerbus.db"
    ledger_auto_upgrade: bool = True
    """Bring the ledger's schema to this version's at start (the service, and the commands
    that open the ledger), one migrator at a time. False: the operator runs `partnerbus db
    upgrade`, and they refuse a ledger whose schema is not this version's."""
    prefix: str = Field(default="partnerbus", pattern=r"^[a-z0-9][a-z0-9._-]{0,40}$")
    """Prefix of every exchange and queue name: several buses (or test runs) share a broker."""
    directory_path: Path | None = None
    """YAML/JSON directory file; the bundled Lille/Nord sample when unset."""
    pseudonym_key: SecretStr | None = None
    """Key of the per-partner keyed hash of person references. No default: the service
    refuses to start without one of at least 32 characters that is not a published value
    (`check_pseudonym_key`); `partnerbus demo` makes a throwaway one when it is unset."""
    trusted_senders: tuple[str, ...] = ()
    """AMQP users allowed to publish on behalf of any partner (the bus itself, a gateway)."""
    delivery_limit: int = Field(default=5, ge=1, le=100)
    prefetch: int = Field(default=256, ge=1, le=1000)
    """Unacked messages each intake consumer holds: its batch is at most this many."""
    intake_batch_size: int = Field(default=128, ge=1, le=1000)
    """Most messages the intake records in one transaction (group commit); each is acked
    after that commit. Keep `prefetch` at least as large, or batches stay smaller."""
    intake_batch_wait_ms: float = Field(default=0.0, ge=0, le=100)
    """Extra wait for more messages before a batch is recorded; 0: record as soon as no
    handler is ready to join (no fixed delay)."""
    batch_budget_ms: float = Field(default=100.0, ge=0, le=10_000)
    """Time one intake transaction or one relay window should take, about: batches and
    windows are sized from what the last ones took (`partnerbus.handlers.sizing`), so an
    urgent signal waits at most about this long behind the routine batch under way, on a
    fast host or a slow one. 0: always `intake_batch_size` messages, 256 outbox rows."""
    log_messages: bool = False
    """Log each message a subscriber handles (FastStream's "Received" / "Processed" lines,
    ids and queue only) at INFO; off, they are at DEBUG. Off by default: two lines per
    message cost about 5 % of the service's CPU under load, and the metrics count them."""
    urgent_prefetch: int = Field(default=32, ge=1, le=1000)
    """Prefetch of the urgent signals' consumer (its own channel)."""
    publish_timeout_s: float = Field(default=10.0, gt=0)
    max_message_bytes: int = Field(default=256 * 1024, ge=1024)
    dead_letter_max_messages: int | None = Field(default=10_000, ge=1)
    dead_letter_max_bytes: int | None = Field(default=256 * 1024 * 1024, ge=1024)
    """Bounds of each dead-letter queue (None: unbounded). When one is full the bus's copy
    is refused: the original stays in its work queue (RabbitMQ dead-letters it at least
    once, when there is room), the refusal is logged and counted."""
    retry_max_messages: int | None = Field(default=10_000, ge=1)
    retry_max_bytes: int | None = Field(default=64 * 1024 * 1024, ge=1024)
    """Bounds of each delay queue; a full one sends the message to its dead letters."""
    retry_delays_ms: tuple[int, ...] = (1_000, 5_000, 30_000)
    """Delays of the retry queues for transient failures; then the dead letter."""
    relay_interval_s: float = Field(default=2.0, gt=0)
    outbox_lease_s: float = Field(default=60.0, gt=0)
    """How long a relay owns an outbox row it is sending; after a crash, another worker
    sends the row once the lease is over."""
    scheduler_interval_s: float = Field(default=30.0, gt=0)
    retention_days: int = Field(default=730, ge=1)
    free_text_retention_days: int = Field(default=90, ge=1)
    consent_expiry_notice_days: int = Field(default=14, ge=0)
    deadlines: Deadlines = Field(default_factory=Deadlines)
    parked: ParkedNeeds = Field(default_factory=ParkedNeeds)
    stalled: StalledReferrals = Field(default_factory=StalledReferrals)
    metrics_port: int | None = None
    """Serve this process's counters (Prometheus text format, `/metrics`) on this port."""
    metrics_host: str = "127.0.0.1"
    """Address of the metrics port; `0.0.0.0` to let a scraper in another container in."""
    gateway_tokens_path: Path | None = None
    """JSON file of the HTTP gateway's tokens: partner id -> SHA-256 (hex) of its token
    (`partnerbus gateway token issue`); mode 0600. The tokens are not the AMQP passwords."""
    gateway_rate_limit: str = "60/minute"
    """Requests each partner may make to the gateway (`limits` notation, a moving window
    per gateway process: "60/minute", "10/second;300/hour")."""

    @field_validator("gateway_rate_limit")
    @classmethod
    def _rate_limit(cls, value: str) -> str:
        from limits import parse_many

        try:
            parse_many(value)
        except ValueError as exc:
            msg = f"not a rate limit: {value!r} ({exc}); e.g. 60/minute"
            raise ValueError(msg) from None
        return value

    access_secret: SecretStr = SecretStr("")
    """Secret the partners' AMQP passwords derive from (`partnerbus access`)."""
    ops_user: str = "ops"
    ops_password: SecretStr = SecretStr("")
    """HTTP Basic credential of `partnerbus ops serve` (page and /metrics); it refuses to
    start without one."""
    ops_refresh_s: float = Field(default=5.0, gt=0)
    """The ops page and /metrics share one snapshot, taken at most this often."""
    ops_oldest_message_alert_s: float = Field(default=3600.0, gt=0)
    """The ops page's alert: a partner's oldest referral sent and not yet read by its
    system (`requested` or `delivered`) waits longer than this."""
    ops_scheduler_alert_s: float = Field(default=3600.0, gt=0)
    """The ops page's alert: a scheduler pass failed less than this long ago."""
    ops_session_max_age_s: int = Field(default=8 * 3600, gt=0)
    """How long a sign-in to the ops page lasts (its signed session cookie)."""


BUNDLED_SAMPLE = "bundled Lille/Nord sample"


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def open_directory(
    settings: Settings,
    override: Path | None = None,
    *,
    say: Callable[[str], None] = _to_stderr,
    progress: Callable[[str, int, int], None] | None = None,
) -> Directory:
    """The partner directory of every command and of the service, from one rule: a
    command's `--directory` (`override`), else `PARTNERBUS_DIRECTORY_PATH`, else the
    bundled sample. `say` gets one line naming it (stderr by default: stdout may carry JSON)."""
    from partnerbus.directory import load_directory, load_sample

    path = override if override is not None else settings.directory_path
    if path is None:
        directory = load_sample()
        where = f"{BUNDLED_SAMPLE} (set PARTNERBUS_DIRECTORY_PATH for your network)"
    else:
        directory = load_directory(path, progress=progress)
        where = str(path.resolve())
    say(f"directory: {where} ({len(directory)} partners)")
    return directory
