"""The SGLang plugin entry points: registered, load inside SGLang's own loader without errors, every SGLang name and
hook target we use resolves in the installed SGLang, and another SGLang release is refused by name."""

import subprocess
import sys
from importlib.metadata import entry_points
from types import SimpleNamespace

import pytest

LOAD = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout)
from sglang.srt.plugins import load_plugins
load_plugins()
"""


def _run(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)


def test_entry_points_registered():
    eps = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "dflash"]
    assert len(eps) == 1 and eps[0].value == "sglang_dflash.plugin:register"
    eps = [ep for ep in entry_points(group="sglang.srt.platforms") if ep.name == "dflash_cpu"]
    assert len(eps) == 1 and eps[0].value == "sglang_dflash.srt.platform:activate"


def test_sglang_loads_plugin_without_error():
    out = _run(LOAD)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log
    assert "Executed general plugin: dflash" in log, log
    assert "Failed" not in log and "Traceback" not in log, log


IMPORT_CLEAN = """
import sys
import torch
import sglang_dflash.plugin, sglang_dflash.srt.platform, sglang_dflash.srt.sglang_api, sglang_dflash.srt.hooks
import sglang_dflash.srt.parallel, sglang_dflash.srt.graphs, sglang_dflash.srt.context, sglang_dflash.srt.draft_health
import sglang_dflash.srt.models.draft_model
loaded = [m for m in sys.modules if m == "sglang" or m.startswith("sglang.")]
assert not loaded, loaded
assert not torch.cuda.is_initialized()
print("CLEAN")
"""


def test_entry_points_and_drafter_code_import_without_sglang():
    """The entry points, the SGLang name table and the modules that read SGLang names where they use them import no
    SGLang module (and initialise no CUDA): SGLang runs both entry points in every process."""
    out = _run(IMPORT_CLEAN)
    assert out.returncode == 0 and "CLEAN" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]


RESOLVE = """
import importlib.util
from sglang_dflash import plugin
from sglang_dflash.srt import hooks, sglang_api
bad = []
for name, entry in sglang_api.NAMES.items():
    try:
        value = getattr(sglang_api, name)
    except (ImportError, AttributeError) as e:
        bad.append(f"{name} at {entry.location}: {type(e).__name__}: {e}")
        continue
    if value is None or not entry.why:
        bad.append(f"{name}: resolved to None or has no reason")
bad += [f"hook target {t}" for t in hooks.TARGETS + plugin.MISMATCH_TARGETS if not plugin._resolves(t)]
if importlib.util.find_spec(sglang_api.LAUNCH_SERVER_MODULE) is None:
    bad.append(sglang_api.LAUNCH_SERVER_MODULE)
assert not bad, bad
print("RESOLVED", len(sglang_api.NAMES), len(hooks.TARGETS) + len(plugin.MISMATCH_TARGETS))
"""


def test_every_sglang_name_and_hook_target_resolves():
    """Each entry of `sglang_api.NAMES` imports from the SGLang location it names, and each dotted string we hook
    (hooks.TARGETS, plugin.MISMATCH_TARGETS) names an attribute, in the installed SGLang (0.5.23)."""
    out = _run(RESOLVE)
    assert out.returncode == 0 and "RESOLVED" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]


def test_hook_targets_list_every_target_and_the_table_refuses_unknown_names():
    from sglang_dflash.srt import hooks, sglang_api

    constants = {v for k, v in vars(hooks).items() if k.endswith("_TARGET")}
    assert len(constants) >= 7 and constants == set(hooks.TARGETS)
    with pytest.raises(AttributeError, match="sglang_api.NAMES"):
        sglang_api.NotAnSGLangName  # noqa: B018
    with pytest.raises(ImportError):
        from sglang_dflash.srt.sglang_api import NotAnSGLangName  # noqa: F401
    assert all(e.location.startswith("sglang.") and ":" in e.location for e in sglang_api.NAMES.values())


@pytest.fixture
def another_release(monkeypatch):
    """The plugin sees SGLang 0.4.0 installed; the once-per-process warning not yet given."""
    from sglang_dflash import plugin

    monkeypatch.setattr(plugin, "installed_sglang_version", lambda: "0.4.0")
    monkeypatch.setattr(plugin, "_mismatch_warned", False)
    return plugin


def test_version_mismatch_is_named_once(another_release, caplog):
    from sglang_dflash.srt import platform

    assert another_release.check_sglang_version() is False
    assert "0.5.23" in caplog.text and "0.4.0" in caplog.text
    assert platform.activate() is None  # the platform entry point: the same gate, no second warning
    assert sum("0.4.0" in r.getMessage() for r in caplog.records) == 1


def test_platform_activates_on_this_release_without_a_gpu():
    import pkgutil

    import torch
    from sglang.srt.platforms.cpu import CpuSRTPlatform
    from sglang_dflash.srt import platform

    found = platform.activate()
    if torch.cuda.is_available():
        assert found is None
    else:
        assert found == "sglang_dflash.srt.cpu_platform.DFlashCpuPlatform"
        assert issubclass(pkgutil.resolve_name(found), CpuSRTPlatform)


MISMATCH = """
from sglang_dflash import plugin
plugin.installed_sglang_version = lambda: "0.4.0"
from sglang.srt.plugins import load_plugins
load_plugins()
from sglang.srt.arg_groups import speculative_hook
from sglang.srt.models.registry import ModelRegistry
from sglang.srt.server_args import ServerArgs
assert not ModelRegistry.models["DFlashDraftModel"].__module__.startswith("sglang_dflash")  # nothing of ours
for step in (speculative_hook._handle_dflash, ServerArgs.check_server_args):
    try:
        step(ServerArgs(model_path="x", speculative_algorithm="dflash"))
    except RuntimeError as e:
        assert "0.4.0" in str(e) and "0.5.23" in str(e) and "built-in" in str(e), e
    else:
        raise AssertionError(f"{step.__qualname__} did not refuse DFLASH")
print("REFUSED")
"""


def test_another_release_refuses_a_dflash_server_at_start():
    """On another SGLang release nothing of ours is attached, and the steps where SGLang starts a DFLASH server
    (its DFLASH argument resolution, ServerArgs validation) raise an error naming both versions, instead of
    serving SGLang's built-in DFLASH worker silently. Run in SGLang's own plugin loader, no server started."""
    out = _run(MISMATCH)
    assert out.returncode == 0 and "REFUSED" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]


def test_refusal_hook_passes_other_servers():
    from sglang_dflash import plugin

    for algorithm in (None, "EAGLE", "NGRAM"):
        assert plugin._refuse_if_dflash(SimpleNamespace(speculative_algorithm=algorithm)) is None
    assert plugin._refuse_if_dflash(object()) is None  # a release whose arguments lack the field: not ours to judge
    with pytest.raises(RuntimeError, match="sglang==0.5.23"):
        plugin._refuse_if_dflash(SimpleNamespace(speculative_algorithm="DFLASH"))


def test_without_a_hook_target_the_command_line_is_refused_at_plugin_load(another_release):
    gone = ("sglang.srt.no_such_module.handle", "sglang_dflash.plugin.no_such_function")
    for argv in (["--speculative-algorithm", "DFLASH"], ["--port", "1", "--speculative-algorithm=dflash"]):
        with pytest.raises(SystemExit, match=r"0\.4\.0.*0\.5\.23|0\.5\.23.*0\.4\.0"):
            another_release.refuse_dflash("0.4.0", targets=gone, argv=argv)
    for argv in ([], ["--speculative-algorithm", "EAGLE"], ["--model-path", "DFLASH"], ["--speculative-algorithm"]):
        assert another_release.refuse_dflash("0.4.0", targets=gone, argv=argv) is None


def test_admit_input_serves_exactly_or_names_each_bad_value():
    """The tokenizer-manager check (`srt/requests.admit_input`) on one generate sub-request."""
    from sglang_dflash.srt.requests import admit_input

    def req(**kw):
        base = dict(input_ids=None, input_embeds=None, image_data=None, sampling_params={}, top_logprobs_num=None)
        return SimpleNamespace(**{**base, **kw})

    admit_input(req(input_ids=[0, 9]), [0, 9], vocab=10, hidden_size=4)  # fine
    admit_input(req(image_data=["x"]), [0, 10**6], vocab=10, hidden_size=4)  # multimodal placeholders pass
    admit_input(req(input_embeds=[[0.0] * 4] * 3), None, vocab=10, hidden_size=4)
    # served exactly, rewritten: stop ids no token can equal are dropped; a top_k past int32 is off (-1)
    served = req(sampling_params={"stop_token_ids": [3, -2, 10, 9], "top_k": 2**31, "top_p": 0.5})
    admit_input(served, [1], vocab=10, hidden_size=4)
    assert served.sampling_params == {"stop_token_ids": [3, 9], "top_k": -1, "top_p": 0.5}
    kept = req(sampling_params={"top_k": 50})
    admit_input(kept, [1], vocab=10, hidden_size=4)
    assert kept.sampling_params == {"top_k": 50}
    cases = [
        (req(), [1, 10], "token id 10 at position 1"),
        (req(), [], "input_ids is empty"),
        (req(), [1, True], "token id True"),  # as SGLang's own HTTP schema: a bool is not a token id
        (req(input_embeds=[[0.0] * 4, [0.0] * 3]), None, "input_embeds row 1 has 3 values, expected the model's "
                                                         "hidden size 4"),
        (req(input_embeds=[]), None, "input_embeds is empty"),
        (req(top_logprobs_num=11), [1], "top_logprobs_num=11"),
    ]
    for obj, ids, words in cases:
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace("[", r"\[")):
            admit_input(obj, ids, vocab=10, hidden_size=4)
