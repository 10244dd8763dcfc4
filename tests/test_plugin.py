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


def test_admit_input_serves_exactly_or_names_each_bad_value():
    """The tokenizer-manager check (`srt/requests.admit_input`) on one generate sub-request."""
    import types

    import pytest
    from sglang_dflash.srt.requests import admit_input

    def req(**kw):
        base = dict(input_ids=None, input_embeds=None, image_data=None, sampling_params={}, top_logprobs_num=None)
        return types.SimpleNamespace(**{**base, **kw})

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
