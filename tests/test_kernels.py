"""Kernels against their PyTorch references on CPU, through the Triton interpreter (a small sweep here;
scripts/gpu_check.sh runs the full sweep on a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dflash_kernels
import pytest
import torch
from dflash_kernels import greedy_accept

CASES = Path(__file__).with_name("kernel_cases.py")


def test_kernels_match_references_under_interpreter():
    """A child process: Triton must see TRITON_INTERPRET=1 before it is first imported."""
    import triton  # noqa: F401  (comes with sglang: a missing Triton must fail here, not skip)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, str(CASES)], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("ok  ") == 17 and "FAIL" not in out.stdout, out.stdout


def test_greedy_reference_is_the_accept_rule_and_commit_layout():
    g = torch.Generator().manual_seed(0)
    block, predict = torch.randint(0, 3, (50, 6), generator=g), torch.randint(0, 3, (50, 6), generator=g)
    a, b, out, new = greedy_accept.reference(block, predict, torch.full((50,), 7, dtype=torch.int64))
    a2, b2 = greedy_accept.accept(block, predict)
    assert torch.equal(a, a2) and torch.equal(b, b2) and torch.equal(new, a + 8)
    for i in range(50):  # d_1..d_a, bonus, then zeros
        assert out[i].tolist() == block[i, 1 : a[i] + 1].tolist() + [b[i]] + [0] * (5 - int(a[i]))


def test_registry_falls_back_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert dflash_kernels.get("greedy_accept", "cpu") is greedy_accept.reference
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dflash_kernels.get("greedy_accept", "cpu") is greedy_accept.triton_impl
    with pytest.raises(ValueError, match="unknown kernel 'nope'"):
        dflash_kernels.get("nope", "cpu")


def test_registry_takes_the_reference_for_shapes_the_kernel_cannot(monkeypatch):
    """context_kv works on half heads with tl.arange: head_dim 80 (half 40) must take the reference."""
    from dflash_kernels import context_kv

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dflash_kernels.get("context_kv", "cpu", head_dim=128) is context_kv.triton_impl
    assert dflash_kernels.get("context_kv", "cpu", head_dim=64) is context_kv.triton_impl
    for hd in (80, 96, 7):
        assert dflash_kernels.get("context_kv", "cpu", head_dim=hd) is context_kv.reference


def test_gpu_check_dry_run(tmp_path):
    """The prepared GPU check runs end to end on CPU with tiny shapes, so its first GPU run is not its first."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(root / "scripts/gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    import json

    rows = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    assert {r["name"] for r in rows} >= {"drafter forward", "block_prep kernel", "greedy_accept kernel",
                                         "sample_accept kernel", "context_kv kernel",
                                         "context write, stacked + context_kv (wired)"}
    names = " ".join(r["name"] for r in rows)
    assert "context_kv head_dim 10" in names and names.count("sampling probs") == 3 * 2  # 3 cases x 2 batches
    assert "17 passed, 0 failed" in (tmp_path / "kernel_sweep.txt").read_text()
    widths = {r["k"] for r in rows if r["name"].startswith("verify-sized forward, width k=")}
    assert widths == {1, 2, 4, 8, 16}  # the step-cost curve T(bs, k) the adaptive width relies on
