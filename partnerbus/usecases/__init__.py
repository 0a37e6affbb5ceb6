"""The use cases of the bus, one module per verb family: `signals` (receive a signal),
`consents` (grant, refuse, revoke), `decisions` (the advisor's: cancel, send a need to the
partner she chose, transfer, reopen, record an
orientation made outside the bus), `statuses` (a referral's status, a partner's capacity),
`delivery` (the outbox's last check, the broker's confirm, a dead letter sent again),
`schedule` (deadlines, consents running out, retention).

Each runs inside one ledger transaction, through the wrappers of `context`: the clock
read once (one `now` per transaction) and, for a message from a queue, the dedupe mark.
It decides with the pure rules and the directory (`routing.decide_routing`), records the
state change and the audit, and puts what must leave in the outbox. Nothing here touches
the broker; the subscribers call these and the relay sends.

Callers use this package's names (`usecases.receive_signal(...)`); the modules are its
rooms, and a name starting with `_` is shared between them, not with callers.
"""

from partnerbus.errors import Refused
from partnerbus.usecases.consents import (
    CLOCK_SKEW,
    MAX_CONSENT,
    answer_refusal,
    check_consent,
    grant_consent,
    refuse_consent,
    release_parked,
    revoke_consent,
)
from partnerbus.usecases.context import BUS, DIRECTORY_UPDATES_KEY, Clock, Ledger, intake, use_case
from partnerbus.usecases.decisions import (
    cancel_referral,
    direct_need,
    record_orientation,
    reopen_need,
    transfer_referral,
)
from partnerbus.usecases.delivery import (
    DEAD_LETTER_REFUSED,
    OUTBOUND,
    clear_to_send,
    count_refused_dead_letter,
    mark_delivered,
    replay_to_partner,
    send_or_withhold,
)
from partnerbus.usecases.routing import (
    AwaitConsent,
    NoPartner,
    Room,
    RoomCheck,
    RoutingDecision,
    SendReferral,
    decide_routing,
    record_routing,
)
from partnerbus.usecases.schedule import apply_retention, scheduled_item_failed, watch_deadlines
from partnerbus.usecases.signals import check_signal, receive_signal
from partnerbus.usecases.statuses import record_capacity, record_status

__all__ = [
    "BUS",
    "CLOCK_SKEW",
    "DEAD_LETTER_REFUSED",
    "DIRECTORY_UPDATES_KEY",
    "MAX_CONSENT",
    "OUTBOUND",
    "AwaitConsent",
    "Clock",
    "Ledger",
    "NoPartner",
    "Refused",
    "Room",
    "RoomCheck",
    "RoutingDecision",
    "SendReferral",
    "answer_refusal",
    "apply_retention",
    "cancel_referral",
    "check_consent",
    "check_signal",
    "clear_to_send",
    "count_refused_dead_letter",
    "decide_routing",
    "direct_need",
    "grant_consent",
    "intake",
    "mark_delivered",
    "receive_signal",
    "record_capacity",
    "record_orientation",
    "record_routing",
    "record_status",
    "refuse_consent",
    "release_parked",
    "reopen_need",
    "replay_to_partner",
    "revoke_consent",
    "scheduled_item_failed",
    "send_or_withhold",
    "transfer_referral",
    "use_case",
    "watch_deadlines",
]
