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


def _package_files() -> dict[str, Path]:
    import dflash_kernels

    kernels = Path(dflash_kernels.__file__).parent
    files = {str(f.relative_to(PACKAGE)): f for f in PACKAGE.rglob("*.py")}
    files.update({f"kernels/{f.relative_to(kernels)}": f for f in kernels.rglob("*.py")})
    return files


def _is_sglang(name: str) -> bool:
    return name == "sglang" or name.startswith("sglang.")


def test_sglang_is_imported_only_through_sglang_api():
    """Every SGLang name reaches our code through `srt/sglang_api.py`, the table of where each lives and why."""
    files = _package_files()
    assert "srt/sglang_api.py" in files and "kernels/__init__.py" in files
    importing = {rel for rel, f in files.items() if any(_is_sglang(n) for n in _imports(f))}
    assert importing == {"srt/sglang_api.py"} or not importing, f"SGLang imported directly by {sorted(importing)}"


def test_names_imported_from_sglang_api_are_in_its_table():
    """`from .sglang_api import X`: each X is an entry of the table (or one of its functions), checked without
    importing SGLang, so a misspelt or unlisted name fails here and not at the first forward that reads it."""
    from sglang_dflash.srt import sglang_api

    known = set(sglang_api.NAMES) | set(vars(sglang_api))
    used = {(rel, a.name) for rel, f in _package_files().items() for node in ast.walk(ast.parse(f.read_text()))
            if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("sglang_api") for a in node.names}
    assert len(used) > 20
    assert not [u for u in used if u[1] not in known], [u for u in used if u[1] not in known]


def test_no_table_entry_names_builtin_dflash():
    from sglang_dflash.srt import sglang_api

    locations = [e.location.split(":")[0] for e in sglang_api.NAMES.values()] + [sglang_api.LAUNCH_SERVER_MODULE]
    assert len(locations) > 40 and all(_is_sglang(m) for m in locations)
    bad = [m for m in locations if m.startswith(FORBIDDEN)]
    assert not bad, f"sglang_api names SGLang's built-in DFLASH code: {bad}"
