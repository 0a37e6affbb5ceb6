"""A synthetic national directory: ~35,000 communes, ~1,250 EPCI, 101 départements,
50,000 partners and services with a realistic coverage mix, in the directory file format.

    python -m bench.generate --out /tmp/national.json [--partners 50000] [--seed 7]

Everything is invented but shaped like the real thing: a CCAS per commune that has one,
Maisons des solidarités covering a dozen communes, EPCI-wide and départemental services,
a few regional and national ones, a social landlord per département with agencies and
advisors, and agreements between the landlord and its partners.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

REGIONS = {
    "84": ["01", "03", "07", "15", "26", "38", "42", "43", "63", "69", "73", "74"],
    "27": ["21", "25", "39", "58", "70", "71", "89", "90"],
    "53": ["22", "29", "35", "56"],
    "24": ["18", "28", "36", "37", "41", "45"],
    "94": ["2A", "2B"],
    "44": ["08", "10", "51", "52", "54", "55", "57", "67", "68", "88"],
    "32": ["02", "59", "60", "62", "80"],
    "11": ["75", "77", "78", "91", "92", "93", "94", "95"],
    "28": ["14", "27", "50", "61", "76"],
    "75": ["16", "17", "19", "23", "24", "33", "40", "47", "64", "79", "86", "87"],
    "76": ["09", "11", "12", "30", "31", "32", "34", "46", "48", "65", "66", "81", "82"],
    "52": ["44", "49", "53", "72", "85"],
    "93": ["04", "05", "06", "13", "83", "84"],
    "01": ["971"],
    "02": ["972"],
    "03": ["973"],
    "04": ["974"],
    "06": ["976"],
}
SOCIAL_NEEDS = [
    "logement-hebergement--changer-de-logement",
    "logement-hebergement--louer-un-logement",
    "logement-hebergement--rechercher-une-solution-dhebergement-temporaire",
    "logement-hebergement--reduire-les-impayes-de-loyer",
    "logement-hebergement--se-maintenir-dans-le-logement",
    "logement-hebergement--sinformer-sur-les-demarches-liees-a-lacces-au-logement",
    "difficultes-financieres--acquerir-une-autonomie-budgetaire",
    "difficultes-financieres--ameliorer-sa-gestion-budgetaire",
    "difficultes-financieres--mettre-en-place-une-mesure-de-protection-financiere",
    "difficultes-financieres--prevenir-une-degradation-de-la-situation-financiere",
    "difficultes-financieres--situation-dendettement-surendettement",
    "difficultes-administratives-ou-juridiques--accompagnement-aux-demarches-administratives",
    "difficultes-administratives-ou-juridiques--accompagnement-pour-lacces-aux-droits",
    "difficultes-administratives-ou-juridiques--beneficier-dune-mesure-daccompagnement-adapte",
    "difficultes-administratives-ou-juridiques--prendre-en-compte-une-problematique-judiciaire",
    "famille--prise-en-charge-personne-dependante",
    "famille--soutien-a-la-parentalite-et-a-leducation",
    "famille--surmonter-conflits-separation-violence",
    "sante--acces-aux-soins",
    "sante--addictions",
    "sante--constituer-un-dossier-mdph-invalidite",
    "sante--sante-mentale",
    "remobilisation--lien-social",
    "equipement-et-alimentation--aide-menagere",
    "equipement-et-alimentation--alimentation",
    "numerique--acceder-a-des-services-en-ligne",
]
PARENTS = sorted({n.split("--")[0] for n in SOCIAL_NEEDS})
# kind, share of partners, coverage level, how many needs; `association` and `udaf` are
# local kinds (partnerbus.directory.kinds.LOCAL_KINDS), the others data·inclusion codes
MIX = [
    ("ccas-cias", 0.30, "commune", (3, 6)),
    ("fcsf", 0.07, "commune", (2, 4)),
    ("association", 0.18, "commune", (1, 3)),
    ("maisons-des-solidarites", 0.08, "communes", (4, 6)),
    ("france-service", 0.07, "communes", (2, 4)),
    ("points-conseil-budget", 0.06, "epci", (2, 3)),
    ("association", 0.10, "epci", (1, 3)),
    ("caf", 0.03, "departement", (2, 4)),
    ("cidff", 0.03, "departement", (2, 3)),
    ("siao", 0.01, "departement", (1, 1)),
    ("udaf", 0.03, "departement", (1, 3)),
    ("croix-rouge", 0.01, "region", (1, 3)),
    ("cresus", 0.0025, "france", (1, 2)),
]
AGE_BANDS = ["under-25", "25-59", "60-74", "75-plus"]
PUBLICS = [
    "femmes",
    "seniors",
    "familles",
    "residents-qpv-frr",
    "personnes-en-situation-de-handicap",
]
COMMUNES = 35_000
EPCIS = 1_250


def build(
    partners: int = 50_000, seed: int = 7, communes: int = COMMUNES, epcis: int = EPCIS
) -> dict[str, Any]:
    rng = random.Random(seed)
    deps = [(dep, region) for region, ds in REGIONS.items() for dep in ds]
    overseas = [d for d, _ in deps if len(d) == 3]
    mainland = [d for d, _ in deps if len(d) == 2]
    # communes per département: overseas ~25, the rest share what is left, unevenly
    per_dep = dict.fromkeys(overseas, 25)
    weights = {d: rng.uniform(0.4, 1.8) for d in mainland}
    left = communes - sum(per_dep.values())
    total_w = sum(weights.values())
    for d in mainland:
        per_dep[d] = min(max(int(left * weights[d] / total_w), 5), 990)
    epci_per_dep = {d: max(1, round(epcis * per_dep[d] / communes)) for d in per_dep}

    territory: dict[str, Any] = {
        "regions": {r: f"Région {r}" for r in REGIONS},
        "departements": {d: {"name": f"Département {d}", "region": r} for d, r in deps},
        "epcis": {},
        "communes": [],
    }
    communes_of_dep: dict[str, list[str]] = {}
    epcis_of_dep: dict[str, list[str]] = {}
    communes_of_epci: dict[str, list[str]] = {}
    siren = 200_000_000
    for dep, _ in deps:
        dep_epcis = []
        for _ in range(epci_per_dep[dep]):
            siren += rng.randint(1, 400)
            code = str(siren)
            territory["epcis"][code] = {"name": f"EPCI {code}", "departement": dep}
            dep_epcis.append(code)
            communes_of_epci[code] = []
        epcis_of_dep[dep] = dep_epcis
        width = 2 if len(dep) == 3 else 3
        numbers = rng.sample(range(1, 10**width), per_dep[dep])
        codes = sorted(f"{dep}{n:0{width}d}" for n in numbers)
        communes_of_dep[dep] = codes
        for code in codes:
            epci = rng.choice(dep_epcis)
            communes_of_epci[epci].append(code)
            territory["communes"].append([code, f"Commune {code}", epci])

    records: list[dict[str, Any]] = []
    orgs_of_dep: dict[str, set[str]] = {d: set() for d, _ in deps}
    region_of = dict(deps)
    deps_of_region = dict(REGIONS)

    # a social landlord per département: agencies with advisors over all its communes
    for dep, _ in deps:
        org = f"bailleur-{dep.lower()}"
        dep_communes = communes_of_dep[dep]
        n_agencies = max(2, len(dep_communes) // 60)
        for a in range(n_agencies):
            share = dep_communes[a::n_agencies]
            records.append(
                {
                    "id": f"{org}-agence-{a:02d}",
                    "name": f"Bailleur {dep} agence {a}",
                    "kind": "bailleur-social",
                    "organisation": org,
                    "needs": ["logement-hebergement--changer-de-logement"],
                    "coverage": share,
                    "advisors": [
                        {
                            "id": f"adv.{dep.lower()}-{a}-{k}",
                            "name": f"Conseillère {k}",
                            "communes": share[k::2],
                        }
                        for k in range(2)
                    ],
                }
            )
        for service in ("recouvrement", "proximite"):
            records.append(
                {
                    "id": f"{org}-{service}",
                    "name": f"Bailleur {dep} {service}",
                    "kind": "bailleur-social",
                    "organisation": org,
                    "coverage": [dep],
                }
            )
    landlord_count = len(records)

    kinds = list(MIX)
    shares = [m[1] for m in MIX]
    for i in range(partners - landlord_count):
        kind, _, level, (lo, hi) = rng.choices(kinds, weights=shares)[0]
        dep = rng.choices(list(per_dep), weights=list(per_dep.values()))[0]
        if level == "commune":
            coverage = [rng.choice(communes_of_dep[dep])]
        elif level == "communes":
            pool = communes_of_dep[dep]
            start = rng.randrange(len(pool))
            coverage = [pool[(start + k) % len(pool)] for k in range(rng.randint(3, 15))]
        elif level == "epci":
            coverage = [rng.choice(epcis_of_dep[dep])]
            if rng.random() < 0.1:
                coverage.append(rng.choice(epcis_of_dep[dep]))
        elif level == "departement":
            coverage = [dep]
        elif level == "region":
            # data·inclusion lists a région's départements; some producers name the région
            region = region_of[dep]
            by_name = rng.random() < 0.5
            coverage = [f"R{region}"] if by_name else list(deps_of_region[region])
        else:
            coverage = ["france"]
        needs = rng.sample(SOCIAL_NEEDS, rng.randint(lo, hi))
        if rng.random() < 0.05:
            needs[0] = rng.choice(PARENTS)
        org = f"org-{i:05d}" if rng.random() < 0.7 else f"org-{dep.lower()}-{kind}"
        record: dict[str, Any] = {
            "id": f"svc-{i:05d}",
            "name": f"{kind} {i}",
            "kind": kind,
            "organisation": org,
            "needs": sorted(set(needs)),
            "coverage": sorted(set(coverage)),
        }
        roll = rng.random()
        if roll < 0.06:
            record["eligibility"] = {"age_bands": rng.sample(AGE_BANDS, 2)}
        elif roll < 0.12:
            record["eligibility"] = {"publics": [rng.choice(PUBLICS)]}
        elif roll < 0.14:
            record["eligibility"] = {"qpv_only": True}
        if rng.random() < 0.2:
            record["capacity"] = rng.randint(0, 10)
        if rng.random() < 0.05:
            record["capacity_status"] = rng.choice(["waitlist", "no-capacity"])
        if rng.random() < 0.3:
            record["modes"] = ["en-presentiel", "a-distance"]
        records.append(record)
        orgs_of_dep[dep].add(org)

    # the landlord of each département has agreements with most organisations of its
    # département, both ways; national and regional organisations with every landlord
    agreements: list[dict[str, Any]] = []
    wide = sorted(
        {
            r["organisation"]
            for r in records[landlord_count:]
            if r["coverage"] == ["france"]
            or (len(r["coverage"]) > 1 and len(r["coverage"][0]) in (2, 3))
        }
    )
    for dep, _ in deps:
        landlord = f"bailleur-{dep.lower()}"
        for org in sorted(orgs_of_dep[dep]):
            if rng.random() < 0.85:
                agreements.append({"from": landlord, "to": org, "both_ways": True})
        for org in wide[:20]:
            agreements.append({"from": landlord, "to": org})
    return {
        "format": "partnerbus-directory/1",
        "name": f"synthetic national directory (seed {seed})",
        "territory": territory,
        "partners": records,
        "agreements": agreements,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--partners", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    doc = build(args.partners, args.seed)
    args.out.write_text(json.dumps(doc, separators=(",", ":")), encoding="utf-8")
    print(
        f"wrote {args.out}: {len(doc['partners'])} partners, "
        f"{len(doc['territory']['communes'])} communes, {len(doc['territory']['epcis'])} EPCI, "
        f"{len(doc['territory']['departements'])} départements, "
        f"{len(doc['agreements'])} agreement lines"
    )


if __name__ == "__main__":
    main()
