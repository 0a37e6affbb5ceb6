"""Every message of the contract, who sends it and on which exchange."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from partnerbus.schemas import (
    CapacityChanged,
    ConsentExpiring,
    ConsentGranted,
    ConsentRecorded,
    ConsentRefused,
    ConsentRejected,
    ConsentRequested,
    ConsentRevoked,
    Message,
    NeedDirected,
    NeedReopened,
    NoPartnerFound,
    OrientationRecorded,
    Referral,
    ReferralCancelled,
    ReferralReminder,
    ReferralStalled,
    ReferralStatusChanged,
    ReferralTransferred,
    ReferralWithdrawn,
    Signal,
    SignalClosed,
)

Direction = Literal["inbound", "outbound", "both"]


@dataclass(frozen=True)
class Contracted:
    model: type[Message]
    direction: Direction
    """inbound: partners publish it to the bus; outbound: the bus sends it to a partner's
    queue; both: partners publish it and the bus forwards it."""

    @property
    def type(self) -> str:
        default = self.model.model_fields["type"].default
        assert isinstance(default, str)
        return default

    @property
    def inbound(self) -> bool:
        return self.direction in ("inbound", "both")

    @property
    def outbound(self) -> bool:
        return self.direction in ("outbound", "both")


CATALOG: tuple[Contracted, ...] = (
    Contracted(Signal, "inbound"),
    Contracted(ConsentGranted, "inbound"),
    Contracted(ConsentRevoked, "inbound"),
    Contracted(ConsentRefused, "inbound"),
    Contracted(ReferralCancelled, "inbound"),
    Contracted(NeedDirected, "inbound"),
    Contracted(ReferralTransferred, "inbound"),
    Contracted(NeedReopened, "inbound"),
    Contracted(OrientationRecorded, "inbound"),
    Contracted(CapacityChanged, "inbound"),
    Contracted(ReferralStatusChanged, "both"),
    Contracted(Referral, "outbound"),
    Contracted(ReferralWithdrawn, "outbound"),
    Contracted(ReferralReminder, "outbound"),
    Contracted(ReferralStalled, "outbound"),
    Contracted(ConsentRequested, "outbound"),
    Contracted(ConsentExpiring, "outbound"),
    Contracted(ConsentRecorded, "outbound"),
    Contracted(ConsentRejected, "outbound"),
    Contracted(NoPartnerFound, "outbound"),
    Contracted(SignalClosed, "outbound"),
)


def contracted(message_type: str) -> Contracted:
    """The catalogue entry of a message type; KeyError names the types known."""
    for entry in CATALOG:
        if entry.type == message_type:
            return entry
    known = ", ".join(sorted(e.type for e in CATALOG))
    raise KeyError(f"{message_type!r} is not a message of the contract ({known})")
