"""The main job (the demo) end to end in a short mode, and the serving benchmark's equality check."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_demo_short_mode():
    out = subprocess.run([sys.executable, "-m", "sglang_dflash.demo", "--prompts", "2", "--max-new-tokens", "24"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    taus = [float(x) for x in re.findall(r"acceptance length ([0-9.]+)", out.stdout)]
    assert len(taus) == 3 and all(t > 1.0 for t in taus), out.stdout
    assert "identical answers: 2/2" in out.stdout


def test_demo_names_a_wrong_path():
    out = subprocess.run([sys.executable, "-m", "sglang_dflash.demo", "--model", "/no/such/model", "--draft", "/x/y"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "/no/such/model" in out.stderr and "no such directory" in out.stderr


@pytest.mark.slow  # 70 s: the benchmark script's own check, not serving; keeps the default suite near 25 minutes
def test_bench_fails_when_outputs_differ(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts/bench_serving.py"), "--concurrency", "1", "--requests", "2",
           "--max-new-tokens", "8", "--baseline-max-new-tokens", "7", "--out", str(tmp_path / "bench")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "greedy outputs differ" in out.stderr
    assert (tmp_path / "bench.json").is_file() and (tmp_path / "bench.md").is_file()
