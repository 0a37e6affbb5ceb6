"""The directory benchmark: load the synthetic national directory, then time matches.

    python -m bench.directory --json FILE [--data /tmp/partnerbus-national.json] [--queries 20000]

Writes partners, communes, load_s, match_p50_us, match_p99_us, rss_mb (and a few more
figures) to FILE. `load_s` is the time `load_directory()` takes on the generated JSON file:
reading and parsing it, validating every partner, building the networkx graph and the
matching indexes. The file is generated first in a separate process, so the peak RSS is the
directory's own. Matching is timed call by call (`time.perf_counter_ns`) on a mixed query
load: random commune and need, a profile for one query in three, a sender from the
commune's own landlord for one in two. Each query is timed twice: the full ranked list
(`match_*`) and the best three (`match_top3_*`, `limit=3`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from partnerbus.directory import load_directory, match
from partnerbus.schemas import Profile

from .generate import AGE_BANDS, SOCIAL_NEEDS

DEFAULT_DATA = Path("/tmp/partnerbus-national.json")  # noqa: S108 - a cache, regenerated at will


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description="partnerbus directory benchmark")
    parser.add_argument("--json", type=Path, required=True, help="where to write the figures")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--partners", type=int, default=50_000)
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--regenerate", action="store_true")
    args = parser.parse_args()

    if args.regenerate or not args.data.exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.generate",
                "--out",
                str(args.data),
                "--partners",
                str(args.partners),
            ],
            check=True,
        )

    load_average = os.getloadavg()[0]
    gc.collect()
    start = time.perf_counter()
    d = load_directory(args.data)
    load_s = time.perf_counter() - start
    # what a worker does after loading: the directory's objects live as long as the
    # process, so the cyclic GC should stop walking them (see docs/PERFORMANCE.md)
    gc.freeze()

    rng = random.Random(11)
    communes = d.communes()
    landlords = {}
    for commune in rng.sample(communes, 2000):
        agency = d.agency_for(commune)
        if agency is not None:
            landlords[commune] = f"{agency.organisation}-recouvrement"
    queries = []
    for _ in range(args.queries):
        commune = rng.choice(list(landlords))
        publics = ("femmes",) if rng.random() < 0.3 else ()
        profile = (
            Profile(age_band=rng.choice(AGE_BANDS), publics=publics)
            if rng.random() < 1 / 3
            else None
        )
        sender = landlords[commune] if rng.random() < 0.5 else None
        queries.append((rng.choice(SOCIAL_NEEDS), commune, profile, sender))

    for need, commune, profile, sender in queries[:2000]:  # warm-up
        match(d, need, commune, profile, sender)
    timings: list[float] = []
    top3: list[float] = []
    sizes: list[int] = []
    clock = time.perf_counter_ns
    for need, commune, profile, sender in queries:
        t0 = clock()
        found = match(d, need, commune, profile, sender)
        t1 = clock()
        match(d, need, commune, profile, sender, limit=3)
        t2 = clock()
        timings.append((t1 - t0) / 1000)
        top3.append((t2 - t1) / 1000)
        sizes.append(len(found))
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

    figures = {
        "partners": len(d),
        "communes": len(communes),
        "epcis": sum(1 for t in d.territories.values() if t.level == "epci"),
        "departements": sum(1 for t in d.territories.values() if t.level == "departement"),
        "agreements": len(d.agreements),
        "graph_nodes": d.graph.number_of_nodes(),
        "graph_edges": d.graph.number_of_edges(),
        "load_s": round(load_s, 3),
        "match_p50_us": round(percentile(timings, 0.50), 1),
        "match_p99_us": round(percentile(timings, 0.99), 1),
        "match_top3_p50_us": round(percentile(top3, 0.50), 1),
        "match_top3_p99_us": round(percentile(top3, 0.99), 1),
        "candidates_mean": round(statistics.fmean(sizes), 1),
        "candidates_p99": percentile([float(s) for s in sizes], 0.99),
        "queries": len(queries),
        "rss_mb": round(rss_mb, 1),
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        # the machine is shared: other processes preempting a 20 µs call make the p99
        "load_average": round(load_average, 2),
    }
    args.json.write_text(json.dumps(figures, indent=2), encoding="utf-8")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
