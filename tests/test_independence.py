"""Our package never imports SGLang's built-in DFLASH code, and the plugin wires OUR classes in."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import sglang_dflash

FORBIDDEN = ("sglang.srt.speculative.dflash", "sglang.srt.models.dflash", "sglang.kernels.ops.speculative.dflash",
             "sglang.srt.speculative.draft_worker_common", "sglang.kernels.ops.speculative.fused_kv_materialize")
PACKAGE = Path(sglang_dflash.__file__).parent


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


def test_no_module_imports_builtin_dflash():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    bad = [(str(f.relative_to(PACKAGE)), n) for f in files for n in _imports(f) if n.startswith(FORBIDDEN)]
    assert not bad, f"imports of SGLang's built-in DFLASH code: {bad}"


def test_audit_catches_a_forbidden_import(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("from sglang.srt.speculative.dflash_utils import build_target_layer_ids\n")
    assert any(n.startswith(FORBIDDEN) for n in _imports(f))


PROBE = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout)
from sglang.srt.plugins import load_plugins
load_plugins()
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
from sglang.srt.models.registry import ModelRegistry
from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
from sglang.srt.server_args import ServerArgs
from sglang_dflash.srt.worker import DFlashWorker
from sglang_dflash.srt.models.draft_model import DFlashDraftModel
assert SpeculativeAlgorithm.DFLASH.create_worker(ServerArgs(model_path="x")) is DFlashWorker
assert ModelRegistry.models["DFlashDraftModel"] is DFlashDraftModel
assert ATTENTION_BACKENDS["torch_native"].__module__ == "sglang_dflash.srt.hooks"
print("WIRED")
"""


def test_plugin_wires_our_worker_model_and_backend():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "WIRED" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]


def test_sglang_plugins_whitelist_switches_it_off():
    script = (
        "import os\nos.environ['SGLANG_PLUGINS'] = 'someone_else'\n"
        "from sglang.srt.plugins import load_plugins\nload_plugins()\n"
        "from sglang.srt.models.registry import ModelRegistry\n"
        "m = ModelRegistry.models['DFlashDraftModel'].__module__\n"
        "assert not m.startswith('sglang_dflash'), m\nprint('OFF')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "OFF" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
