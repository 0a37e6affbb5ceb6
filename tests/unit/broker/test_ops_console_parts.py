"""The ops console's parts without a broker: the session cookie, the alerts and rows a
snapshot is assembled into, what a partner's staff are shown, the charts, the templates'
escaping."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from partnerbus.broker.topology import AUTHENTICATION, Topology
from partnerbus.ops import charts
from partnerbus.ops.monitor import (
    LedgerFigures,
    LedgerReading,
    LetterFigure,
    PartnerInfo,
    PartnerLedger,
    QueueFigure,
    Thresholds,
    assemble,
    chart_days,
)
from partnerbus.ops.session import csrf_ok, new_session, session_key, sign, verify

KEY = session_key("a-long-enough-ops-password")
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
T = Topology("p")


def test_a_signed_session_comes_back_and_nothing_else_does() -> None:
    ops = new_session("ops", None, 60)
    assert verify(sign(ops, KEY), KEY) == ops
    staff = new_session("partner", "caf-nord", 60, "d" * 64)
    assert verify(sign(staff, KEY), KEY) == staff
    assert verify(sign(ops, session_key("another-password-entirely")), KEY) is None
    assert verify(sign(ops, KEY), KEY, now=time.time() + 61) is None
    _payload, _, mac = sign(ops, KEY).partition(".")
    other = sign(new_session("ops", None, 3600), KEY).split(".")[0]
    assert verify(f"{other}.{mac}", KEY) is None
    # a partner session without its token's digest is no session
    forged = sign(new_session("partner", "caf-nord", 60, None), KEY)
    assert verify(forged, KEY) is None
    assert csrf_ok(ops, ops.csrf) and not csrf_ok(ops, None) and not csrf_ok(ops, "x")


@given(st.text(max_size=300))
def test_any_cookie_text_is_a_session_only_if_we_signed_it(cookie: str) -> None:
    assert verify(cookie, KEY) is None


def reading(partners: dict[str, PartnerLedger], failing: int = 0, failed_at=None) -> LedgerReading:  # type: ignore[no-untyped-def]
    return LedgerReading(LedgerFigures({}, [], 0, 0, failing), partners, [], {}, failed_at)


def letter(partner: str | None, died_in: str, refusal: str | None = None) -> LetterFigure:
    return LetterFigure(
        f"{died_in}.dlq", "m", "signal", "why", died_in, "pb-x", partner, refusal, NOW, "intake"
    )


INFOS = [PartnerInfo("a", "A", "caf", "pb-a"), PartnerInfo("b", "B", "caf", "pb-b")]


def queues(a_consumers: int = 0, dead: int = 0) -> list[QueueFigure]:
    return [
        QueueFigure("p.intake.signals", "intake", 0, 1),
        QueueFigure("p.intake.signals.dlq", "dead-letter", dead, 0),
        QueueFigure("p.partner.a", "partner", 2, a_consumers),
        QueueFigure("p.partner.b", "partner", 0, 1),
    ]


def test_rows_and_alerts_come_from_what_was_read() -> None:
    led = PartnerLedger(
        received=3,
        no_consent=1,
        by_status={"delivered": 1, "accepted": 2, "rejected": 1, "expired": 1},
        rejected_by_reason={"full": 1},
        sent=5,
        oldest_in_queue_at=NOW - timedelta(hours=2),
        answer_s=[10.0, 30.0, 20.0],
        accept_s=[10.0, 30.0],
    )
    letters = [
        letter("a", "p.intake.signals"),
        letter("a", "p.intake.signals", AUTHENTICATION),
        letter("a", "p.partner.a"),
    ]
    snap = assemble(
        NOW,
        queues(dead=3),
        reading({"a": led}, failing=2, failed_at=NOW - timedelta(minutes=5)),
        letters,
        INFOS,
        T,
        broker_error=None,
        previous=None,
        thresholds=Thresholds(oldest_message_s=3600),
        days=chart_days(NOW),
    )
    a, b = snap.partners
    assert (a.received, a.filtered_no_consent, a.filtered_invalid, a.filtered_refused_sender) == (
        3,
        1,
        1,
        1,
    )
    assert (a.queue_depth, a.consumers, a.sent, a.awaiting, a.accepted, a.rejected) == (
        2,
        0,
        5,
        1,
        2,
        1,
    )
    assert a.dead_lettered == 3 and a.expired == 1 and a.median_answer_s == 20.0
    assert a.oldest_age_s == 7200 and a.rejected_by_reason == {"full": 1}
    assert b.received == 0 and b.consumers == 1
    kinds = {(x.kind, x.partner) for x in snap.alerts}
    assert ("no-consumer", "a") in kinds and ("no-consumer", "b") not in kinds
    assert ("old-message", "a") in kinds
    assert ("outbox-failing", None) in kinds and ("scheduler", None) in kinds
    assert not any(k == "dead-letters-rising" for k, _ in kinds)
    later = assemble(
        NOW + timedelta(seconds=5),
        queues(a_consumers=1, dead=4),
        reading({"a": led}),
        letters,
        INFOS,
        T,
        broker_error=None,
        previous=snap,
        thresholds=Thresholds(oldest_message_s=3 * 3600, scheduler_failure_s=60),
        days=chart_days(NOW),
    )
    kinds = {x.kind for x in later.alerts}
    assert "dead-letters-rising" in kinds
    assert {"no-consumer", "old-message", "scheduler", "outbox-failing"}.isdisjoint(kinds)
    assert later.charts.dead_letters_per_day[-1] == 3


def test_a_partners_staff_see_only_their_row_letters_and_alerts() -> None:
    snap = assemble(
        NOW,
        queues(),
        reading({}),
        [letter("a", "p.partner.a"), letter("b", "p.partner.b"), letter(None, "p.intake.x")],
        INFOS,
        T,
        broker_error=None,
        previous=None,
        thresholds=Thresholds(),
        days=chart_days(NOW),
    )
    seen = snap.for_partner("b")
    assert [r.partner_id for r in seen.partners] == ["b"]
    assert [x.partner for x in seen.letters] == ["b"]
    assert all(a.partner == "b" for a in seen.alerts)
    assert [q.name for q in seen.queues] == ["p.partner.b"]
    assert seen.ledger.referrals_by_status == {} and seen.charts.days == []


def test_the_charts_scale_to_their_figures() -> None:
    days = chart_days(NOW, 3)
    chart = charts.stacked_per_day("t", days, {"accepted": [0, 2, 4], "rejected": [0, 0, 4]})
    assert chart.top == 8 and len(chart.bars) == 3 and not chart.empty
    tallest = max(b.h for b in chart.bars)
    assert abs(sum(b.h for b in chart.bars if b.x == chart.bars[-1].x) - 2 * tallest) < 1e-6
    assert charts.stacked_per_day("t", days, {}).empty


def test_the_templates_escape_what_they_show() -> None:
    from partnerbus.entrypoints.web import _templates

    env = _templates()
    bad = letter("a", "p.intake.signals")
    hostile = LetterFigure(
        bad.queue,
        "<script>x</script>",
        None,
        "<img src=x onerror=alert(1)>",
        bad.died_in,
        None,
        "a",
        None,
        None,
        "never",
    )
    html = env.get_template("letters.html").render(
        prefix="p", letters=[hostile], session=new_session("ops", None, 60), message="<b>"
    )
    assert "<script>x</script>" not in html and "<img src=x" not in html and "<b>" not in html
    assert "&lt;script&gt;" in html
