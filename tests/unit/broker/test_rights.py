"""One table of who may publish what: RabbitMQ's grants and the other doors read it."""

from __future__ import annotations

import pytest

from partnerbus.broker.access import grants_for
from partnerbus.broker.topology import Topology
from partnerbus.directory import load_sample
from partnerbus.directory.rights import INTAKES, may_publish, refusal

SAMPLE = list(load_sample().partners())


@pytest.mark.parametrize("consent_writers", [True, False])
@pytest.mark.parametrize("partner", SAMPLE, ids=[p.id for p in SAMPLE])
def test_rabbitmq_grants_are_the_table_s_rights(partner, consent_writers):
    """For every partner of the sample, the exchanges RabbitMQ lets it write are exactly the intakes the table gives it, and a refusal is given for every other."""
    topology = Topology("pb")
    (grant,) = grants_for([partner], topology, consent_writers=consent_writers)
    allowed = may_publish(partner, consent_writers=consent_writers)
    assert grant.topic_exchanges == tuple(getattr(topology, i).name for i in allowed)
    for intake in INTAKES:
        assert (refusal(partner, intake, consent_writers=consent_writers) is None) == (
            intake in allowed
        )


def test_only_partners_with_advisors_write_consents():
    writers = {p.id for p in SAMPLE if "consents" in may_publish(p)}
    assert writers == {p.id for p in SAMPLE if p.advisors}
    assert writers and len(writers) < len(SAMPLE)
