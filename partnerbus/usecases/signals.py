"""A signal from a partner: checked against the directory, recorded once, each of its
needs routed."""

from __future__ import annotations

from partnerbus.directory.model import AgencyChoice
from partnerbus.directory.rights import is_pivot
from partnerbus.errors import Refused
from partnerbus.ledger.store import LedgerTx
from partnerbus.schemas import Signal
from partnerbus.usecases.context import Ledger, intake
from partnerbus.usecases.routing import AwaitConsent, _request_consent, _route


def check_signal(ledger: Ledger, signal: Signal) -> None:
    """Refuse what the directory does not know: the message is bad, not the bus."""
    directory = ledger.directory
    if not directory.has_commune(signal.commune):
        raise Refused(f"unknown commune {signal.commune!r}: not an INSEE code of the territory")
    unknown = [n for n in signal.needs if not directory.has_need(n)]
    if unknown:
        raise Refused(f"unknown need(s) {', '.join(unknown)}: not in the taxonomy")
    if signal.source not in directory:
        raise Refused(f"unknown source partner {signal.source!r}")
    if signal.agency is not None:
        if signal.agency not in directory:
            raise Refused(f"unknown agency {signal.agency!r}")
        agency = directory.partner(signal.agency)
        if agency.is_creditor:
            raise Refused(
                f"{signal.agency!r} is a creditor (the landlord's recovery service), not the "
                "agency that follows the person: it does not hold her consent"
            )
        if not is_pivot(agency):
            raise Refused(
                f"{signal.agency!r} has no social advisors: not an agency that follows people"
            )
        if signal.landlord is not None and agency.organisation != signal.landlord:
            raise Refused(
                f"agency {signal.agency!r} belongs to {agency.organisation!r}, "
                f"not to the landlord named, {signal.landlord!r}"
            )
    elif (
        signal.landlord is not None
        and directory.agency_for(signal.commune, signal.landlord) is None
    ):
        if not any(p.organisation == signal.landlord for p in directory.partners()):
            raise Refused(f"unknown landlord {signal.landlord!r}: no such organisation")
        raise Refused(
            f"{signal.landlord!r} has no agency covering {signal.commune}: name the "
            "agency (`agency`) that follows the person"
        )


def resolve_agency(ledger: Ledger, signal: Signal) -> AgencyChoice:
    """Who follows the person (`Directory.resolve_agency`): the agency named, else the
    landlord's covering the commune, else the source's own organisation's, else the only
    organisation's covering the commune; none when several could."""
    return ledger.directory.resolve_agency(
        signal.commune, agency=signal.agency, landlord=signal.landlord, source=signal.source
    )


@intake
def receive_signal(ledger: Ledger, tx: LedgerTx, signal: Signal) -> None:
    """Record a signal and route each of its needs; the consent of the person is asked
    once for all the needs that wait for it. False for a duplicate (`intake`)."""
    now = ledger.clock()
    agency = resolve_agency(ledger, signal).agency
    advisor = ledger.directory.advisor_for(agency.id, signal.commune) if agency else None
    row = tx.signals.add(
        signal, agency.id if agency else None, advisor.id if advisor else None, now
    )
    tx.audit.record(
        signal.source,
        "signal-received",
        signal.message_id,
        now,
        person_ref=signal.person_ref,
        why=f"needs {', '.join(signal.needs)} in {signal.commune}",
    )
    parked: list[AwaitConsent] = []
    for need in signal.needs:
        waiting = _route(ledger, tx, row, signal, need, attempt=1, tried=())
        if waiting is not None:
            parked.append(waiting)
    if parked:
        _request_consent(ledger, tx, row, signal, parked)
