"""The graph behind the directory, the territory keys, and the synthetic national generator."""

from __future__ import annotations

import networkx as nx

from bench.generate import build
from partnerbus.directory import load_sample, match
from partnerbus.directory.load import directory_from_document
from partnerbus.directory.territory import level_of_code, region_key

from .conftest import ARREARS


def test_the_graph_links_partners_to_territories_needs_and_organisations() -> None:
    """Every partner node covers territories, serves needs and belongs to its organisation."""
    d = load_sample()
    g = d.graph
    assert isinstance(g, nx.DiGraph)
    out = {(v, k) for _, v, k in g.out_edges("p:ccas-roubaix", data="type")}
    assert ("t:59512", "covers") in out
    assert (f"n:{ARREARS}", "serves") in out
    assert ("o:ccas-roubaix", "member-of") in out
    assert g.edges["o:lmh", "o:udaf-nord"]["needs"] == (
        "difficultes-financieres logement-hebergement--reduire-les-impayes-de-loyer"
    )
    assert nx.has_path(g, "t:59512", "t:france")
    assert list(nx.simple_cycles(g.subgraph(n for n in g if n[0] in "tn"))) == []


def test_regions_are_keyed_apart_from_departements() -> None:
    """Région 32 (Hauts-de-France) and département 32 (Gers) coexist as R32 and 32."""
    assert region_key("32") == "R32"
    assert region_key("R32") == "R32"
    assert level_of_code("R32") == "region"
    assert level_of_code("32") == "departement"
    assert level_of_code("200093201") == "epci"
    assert level_of_code("QN0590121") == "qpv"
    assert level_of_code("99100") == "france"
    d = load_sample()
    assert [code for code, _ in d.index.territory_chains["59350"]] == [
        "59350",
        "200093201",
        "59",
        "R32",
        "france",
    ]


def test_the_national_generator_writes_a_loadable_directory() -> None:
    """A small run of the benchmark's generator loads and matches like the real thing."""
    doc = build(partners=1500, seed=3, communes=3000, epcis=120)
    d = directory_from_document(doc)
    assert len(d) == 1500
    assert len({t.code for t in d.territories.values() if t.level == "departement"}) == 101
    assert sum(1 for t in d.territories.values() if t.level == "region") == 18
    found = 0
    for commune in d.communes()[::50]:
        found += len(match(d, ARREARS, commune))
        agency = d.agency_for(commune)
        assert agency is not None
        assert match(d, ARREARS, commune, sender=f"{agency.organisation}-recouvrement") is not None
    assert found > 0
