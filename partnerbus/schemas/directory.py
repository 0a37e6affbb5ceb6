"""Records of the partner directory, as loaded from YAML/JSON or a data·inclusion export."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from .base import NeedCode, PartnerId, Record
from .messages import AgeBand, CapacityStatus, Household

ReceptionMode = Literal["en-presentiel", "a-distance", "local-a-domicile"]
"""How a service receives people: data·inclusion `modes_accueil` (`en-presentiel`: on site,
`a-distance`: remote) and the local `local-a-domicile` (it visits people at home), which
data·inclusion has no code for."""
HOME_VISIT: ReceptionMode = "local-a-domicile"


class Advisor(Record):
    """A social advisor (conseillère sociale) of a landlord's agency: the tenant's pivot."""

    id: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9.-]{1,62}$")]
    name: str
    communes: tuple[str, ...] = ()
    """Communes (INSEE) she follows; empty means the whole agency."""


class Eligibility(Record):
    """Who a service takes. Empty tuples mean no restriction."""

    age_bands: tuple[AgeBand, ...] = ()
    households: tuple[Household, ...] = ()
    publics: tuple[str, ...] = ()
    """data·inclusion publics required (any of them); `tous-publics` or empty: anyone."""
    qpv_only: bool = False


class Partner(Record):
    """An organisation's service that can receive referrals (or, for agencies, consent
    requests and the closed loop)."""

    id: PartnerId
    name: str
    kind: Annotated[str, Field(pattern=r"^[a-z0-9-]{2,60}$")]
    """data·inclusion `reseaux_porteurs` code, or a local kind such as `bailleur-social`."""
    organisation: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{1,62}$")]
    needs: tuple[NeedCode, ...] = ()
    coverage: tuple[str, ...] = ()
    """`zone_eligibilite`-style codes: commune (5), EPCI SIREN (9), département (2-3), `france`."""
    eligibility: Eligibility = Eligibility()
    modes: tuple[ReceptionMode, ...] = ("en-presentiel",)
    """How it receives people (`ReceptionMode`); with `local-a-domicile` it ranks first
    for a person who wants a home visit, within its tier (docs/DIRECTORY.md)."""
    capacity: Annotated[int, Field(ge=0)] | None = None
    """Referrals it can take at once; None: not declared."""
    capacity_status: CapacityStatus = "capacity"
    advisors: tuple[Advisor, ...] = ()
    amqp_user: str | None = None
    """The RabbitMQ user this partner authenticates as; default `pb-<id>`."""
    external_id: Annotated[str, Field(max_length=200)] | None = None
    """The record's id where it came from (data·inclusion `id` of the service), if imported."""
    creditor: bool | None = None
    """Its relation to the person is a debt (the landlord's recovery service): it receives
    only what docs/DISCLOSURE.md gives the `creditor` role, whatever else it is. None: the
    default, `creditor_by_default` (a `bailleur-social` partner named for recovery)."""

    @property
    def is_creditor(self) -> bool:
        """Whether the `creditor` role applies to it (docs/DISCLOSURE.md)."""
        return creditor_by_default(self) if self.creditor is None else self.creditor

    @property
    def username(self) -> str:
        return self.amqp_user or f"pb-{self.id}"


CREDITOR_WORDS = ("recouvrement", "recovery", "contentieux", "precontentieux")
"""Words that name a landlord's debt-collection service, in a partner's id or name."""


def creditor_by_default(partner: Partner) -> bool:
    """A partner the directory does not say is or is not a creditor: one of kind
    `bailleur-social` whose id or name names debt collection (`lmh-recouvrement`,
    "service contentieux"). Nothing in the data·inclusion kinds marks a creditor, and a
    landlord's agencies and proximity teams share its kind: set `creditor` in the directory
    for any other case."""
    if partner.kind != "bailleur-social":
        return False
    text = f"{partner.id} {partner.name}".lower().replace("é", "e")
    return any(word in text for word in CREDITOR_WORDS)


class Agreement(Record):
    """A data-sharing agreement: referrals may leave `from_org` towards `to_org`."""

    from_org: str
    to_org: str
    needs: tuple[NeedCode, ...] = ()
    """Needs it covers (parent codes cover children); empty: all."""
