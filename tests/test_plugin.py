"""The SGLang plugin entry point: registered, loads inside SGLang's own loader without errors."""

import subprocess
import sys
from importlib.metadata import entry_points

LOAD = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout)
from sglang.srt.plugins import load_plugins
load_plugins()
"""


def test_entry_point_registered():
    eps = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "dflash"]
    assert len(eps) == 1 and eps[0].value == "sglang_dflash.plugin:register"


def test_sglang_loads_plugin_without_error():
    out = subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True, timeout=300)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log
    assert "Executed general plugin: dflash" in log, log
    assert "Failed" not in log and "Traceback" not in log, log


def test_version_mismatch_is_named(monkeypatch, caplog):
    from sglang_dflash import plugin

    monkeypatch.setattr(plugin, "installed_sglang_version", lambda: "0.4.0")
    assert plugin.check_sglang_version() is False
    assert "0.5.23" in caplog.text and "0.4.0" in caplog.text
