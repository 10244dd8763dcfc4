"""The step's code never makes the host wait for the device, except where a line says so.

On a GPU a `.item()` / `.tolist()` / `.cpu()` / `.numpy()` in the step stalls the launch queue every step,
and an `if tensor.any():` does the same; both also break CUDA-graph capture. This audits the source of
every module the step runs through; an intended sync must carry a `# sync:` comment saying why."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEP_MODULES = [
    "python/sglang_dflash/srt/worker.py",
    "python/sglang_dflash/srt/stages.py",
    "python/sglang_dflash/srt/context.py",
    "python/sglang_dflash/srt/parallel.py",
    "python/sglang_dflash/srt/draft_health.py",
    "python/sglang_dflash/srt/adaptive.py",
    "python/sglang_dflash/srt/graphs.py",
    "python/sglang_dflash/drafter.py",
    "python/sglang_dflash/srt/spec_inputs.py",
    "python/sglang_dflash/srt/models/draft_model.py",
    "python/sglang_dflash/sampling.py",
    "kernels/block_prep.py",
    "kernels/greedy_accept.py",
    "kernels/sample_accept.py",
    "kernels/context_kv.py",
]
SYNCING_METHODS = {"item", "tolist", "cpu", "numpy", "synchronize"}


def find_syncs(source: str) -> list[str]:
    """Lines that read a device value on the host, without a `# sync:` comment."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        hit = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in SYNCING_METHODS
        if isinstance(node, (ast.If, ast.While, ast.IfExp, ast.Assert)):  # branching on a reduction's value
            hit = any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in ("any", "all")
                      for n in ast.walk(node.test))
        if hit and "# sync:" not in lines[node.lineno - 1]:
            found.append(f"{node.lineno}: {lines[node.lineno - 1].strip()}")
    return sorted(found, key=lambda s: int(s.split(":")[0]))


def test_the_audit_catches_syncs():
    src = ("def f(t, x):\n    n = t.sum().item()\n    if (x > 0).any():\n        pass\n"
           "    m = t.tolist()  # sync: once\n")
    assert find_syncs(src) == ["2: n = t.sum().item()", "3: if (x > 0).any():"]


def test_step_code_has_no_unmarked_host_sync():
    bad = {path: found for path in STEP_MODULES if (found := find_syncs((ROOT / path).read_text()))}
    assert not bad, bad
