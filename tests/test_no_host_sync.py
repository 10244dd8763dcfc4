"""The step's code never makes the host wait for the device, except where a line says so.

On a GPU a `.item()` / `.tolist()` / `.cpu()` / `.numpy()` in the step stalls the launch queue every step,
and so do `int(t)` / `bool(t)` / `float(t)` of a tensor and an `if tensor.any():`; all of them also break
CUDA-graph capture. This audits the source of every module the step runs through: every module under
`srt/` and `srt/models/`, the drafter, sampling and the kernels, found by glob (a new module is audited
without being listed), less the start-up and request-admission modules in NOT_IN_THE_STEP.

What is flagged, by reading the source (the audit never runs it):
- a call of a method that reads a device value on the host: `.item()`, `.tolist()`, `.cpu()`, `.numpy()`,
  `.synchronize()`;
- `int(x)`, `bool(x)`, `float(x)` of anything but a literal (`int(3)`, `float("-inf")`, `int(-1)`): a name,
  attribute, subscript, call, comparison or arithmetic can each hold a 0-d tensor, and the source does not
  say which do;
- `if` / `while` / `assert` / a conditional expression whose test calls `.any()` or `.all()`.
A flagged line passes when its first line carries one of two markers, followed by the reason:
- `# sync: why` -- a real device read, meant (packed into one transfer, or off the common path);
- `# host: why` -- no device read: the value is already on the host (a Python number, a server argument,
  a tensor built or kept in host memory).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEP_GLOBS = [
    "python/sglang_dflash/srt/*.py",
    "python/sglang_dflash/srt/models/*.py",
    "python/sglang_dflash/drafter.py",
    "python/sglang_dflash/sampling.py",
    "kernels/*.py",
]
NOT_IN_THE_STEP = {  # matched by STEP_GLOBS, never run inside a decode step
    # attaches to SGLang at start-up; its wrappers run at argument resolution, KV-pool construction and
    # request admission, none inside a step
    "python/sglang_dflash/srt/hooks.py",
    # the CPU platform: its entry point, and the class SGLang reads defaults from, once when it starts
    "python/sglang_dflash/srt/platform.py",
    "python/sglang_dflash/srt/cpu_platform.py",
    # per-request checks over Python lists, when a request arrives (tokenizer manager, scheduler admission)
    "python/sglang_dflash/srt/requests.py",
}
STEP_MODULES = sorted({p.relative_to(ROOT).as_posix() for g in STEP_GLOBS for p in ROOT.glob(g)} - NOT_IN_THE_STEP)
SYNCING_METHODS = {"item", "tolist", "cpu", "numpy", "synchronize"}
CONVERSIONS = {"int", "bool", "float"}
MARKERS = ("# sync:", "# host:")


def _literal(node: ast.expr) -> bool:
    """A number or string written in the source, optionally signed: `3`, `-1`, `"inf"`."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        node = node.operand
    return isinstance(node, ast.Constant)


def _flagged(node: ast.AST) -> bool:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return node.func.attr in SYNCING_METHODS
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in CONVERSIONS:
        return bool(node.args) and not _literal(node.args[0])
    if isinstance(node, (ast.If, ast.While, ast.IfExp, ast.Assert)):  # branching on a reduction's value
        return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in ("any", "all")
                   for n in ast.walk(node.test))
    return False


def find_syncs(source: str) -> list[str]:
    """Lines (number: text) that may read a device value on the host, without a `# sync:` / `# host:` marker."""
    lines = source.splitlines()
    hits = {node.lineno for node in ast.walk(ast.parse(source)) if _flagged(node)}
    return [f"{n}: {lines[n - 1].strip()}" for n in sorted(hits) if not any(m in lines[n - 1] for m in MARKERS)]


def test_the_audit_catches_syncs():
    src = ("def f(t, x, n, cfg):\n"
           "    a = t.sum().item()\n"
           "    if (x > 0).any():\n"
           "        pass\n"
           "    m = t.tolist()  # sync: once\n"
           "    b = int(t.sum())\n"
           "    c = bool(x[0])\n"
           "    d = float(t.mean)\n"
           "    e = int(n)\n"
           "    f = bool(x > 0)\n"
           "    g = float(n * 2)\n"
           "    h = int(cfg.block_size)  # host: a server argument\n")
    assert find_syncs(src) == ["2: a = t.sum().item()", "3: if (x > 0).any():", "6: b = int(t.sum())",
                               "7: c = bool(x[0])", "8: d = float(t.mean)", "9: e = int(n)", "10: f = bool(x > 0)",
                               "11: g = float(n * 2)"]


def test_the_audit_passes_literals_and_marked_lines():
    src = ("def f(t, n):\n"
           "    a, b, c, d = int(3), float('-inf'), bool(0), int(-1)\n"
           "    e = int()\n"
           "    g = t.float()\n"
           "    h = int(n)  # host: a Python int\n"
           "    k = t.sum().item()  # sync: the one read of the step\n")
    assert find_syncs(src) == []


def test_the_audit_covers_every_step_module():
    for path in NOT_IN_THE_STEP:
        assert (ROOT / path).is_file(), f"{path} is excluded but does not exist: drop it from NOT_IN_THE_STEP"
    for path in ("python/sglang_dflash/srt/worker.py", "python/sglang_dflash/srt/stages.py",
                 "python/sglang_dflash/srt/attention.py", "python/sglang_dflash/srt/logit_rules.py",
                 "python/sglang_dflash/srt/models/draft_model.py", "python/sglang_dflash/drafter.py",
                 "python/sglang_dflash/sampling.py", "kernels/greedy_accept.py", "kernels/__init__.py"):
        assert path in STEP_MODULES, path


def test_step_code_has_no_unmarked_host_sync():
    bad = [f"{path}:{hit}" for path in STEP_MODULES for hit in find_syncs((ROOT / path).read_text())]
    assert not bad, "unmarked (add `# sync: why` or `# host: why`):\n" + "\n".join(bad)
