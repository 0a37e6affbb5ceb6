"""The throughput benchmark, run small against the real broker: it finishes and says sane things."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import AMQP_URL, require

pytestmark = pytest.mark.rabbitmq

ROOT = Path(__file__).resolve().parents[2]
KEYS = (
    "raw_forward_per_s",
    "raw_fanout_per_s",
    "pipeline_per_s",
    "ratio",
    "ratio_fanout",
    "cpu_ms_per_signal",
    "latency_p50_ms",
    "latency_p99_ms",
    "urgent_p99_ms",
    "lost",
    "duplicated",
    "rss_mb",
    "scenarios",
    "machine",
)


@pytest.mark.timeout(180)
def test_the_quick_benchmark_writes_every_figure_with_nothing_lost_or_duplicated(tmp_path):
    """`python -m bench.throughput --quick` (SQLite, one worker) writes every key of issue 9,
    with positive rates, nothing lost and nothing duplicated."""
    require("RabbitMQ", AMQP_URL, 5672)
    out = tmp_path / "throughput.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.throughput",
            "--json",
            str(out),
            "--quick",
            "--scenarios",
            "sqlite-1",
            "--signals",
            "20",
            "--stall-timeout",
            "30",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert set(KEYS) <= figures.keys()
    assert figures["lost"] == 0
    assert figures["duplicated"] == 0
    assert figures["raw_forward_per_s"] > 0
    assert figures["pipeline_per_s"] > 0
    assert 0 < figures["ratio"] == figures["scenarios"]["sqlite-1"]["ratio"]
    assert figures["cpu_ms_per_signal"] > 0
    assert 0 < figures["latency_p50_ms"] <= figures["latency_p99_ms"]
    lat = figures["latency"]
    # the split at the moment the bus recorded each signal: both parts measured, and
    # neither longer than the whole (the two clocks are the same machine's)
    assert 0 < lat["intake_p50_ms"] < lat["latency_p99_ms"] + 1
    assert 0 < lat["relay_p50_ms"] < lat["latency_p99_ms"] + 1
    assert figures["urgent_p99_ms"] > 0
    assert figures["rss_mb"] > 10
    assert figures["fanout_k"] >= 2, "a referral and its notices"
    assert figures["machine"]["cpu_count"] >= 1
