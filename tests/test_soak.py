"""The soak (`scripts/soak.py`) for a minute in the suite: 16 clients, the whole request mix, a KV pool small
enough to force retraction, SGLang's strict idle leak check on. Nothing lost, no answer changed, memory flat."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parents[1] / "scripts" / "soak.py"


def test_soak_one_minute():
    out = subprocess.run([sys.executable, str(SOAK), "--duration", "60", "--warmup", "10", "--concurrency", "16"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ok"] and result["failed"] == 0 and result["mismatched"] == 0 and result["healthy"]
    assert result["sent"] == result["completed"] > 100
    for kind, c in result["per_kind"].items():  # every kind of request was exercised
        assert c["sent"] > 0, kind
    assert result["retractions"] > 0, "the KV pool never filled: the soak did not test retraction"
    assert result["rss_end_mb"] <= 1.10 * result["rss_warm_mb"]
