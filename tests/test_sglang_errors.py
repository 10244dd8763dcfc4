"""Bad drafters make the server refuse to start, with an error that names the problem."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import make_drafter, make_target
from sglang_server import Server


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    target = make_target(layers=3, vocab=64)
    target.config.max_position_embeddings = 512
    target.save_pretrained(root / "target")
    make_drafter(target, block_size=4, layer_ids=(0, 1), mask_token_id=63).save_pretrained(root / "draft")
    return root


def _variant(root, name, edit):
    d = root / name
    shutil.copytree(root / "draft", d)
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg, d)
    if cfg is not None:
        (d / "config.json").write_text(json.dumps(cfg))
    return d


def _set(path, value):
    def edit(cfg, _d):
        node = cfg
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    return edit


def _corrupt(cfg, d):
    (d / "model.safetensors").write_bytes(b"not a safetensors file")


CASES = {
    "layer_ids_out_of_range": (_set(("dflash_config", "target_layer_ids"), [0, 7]), ["target_layer_ids", "7"]),
    "last_target_layer": (_set(("dflash_config", "target_layer_ids"), [0, 2]), ["target_layer_ids", "< 2"]),
    "mask_outside_vocab": (_set(("dflash_config", "mask_token_id"), 500), ["mask_token_id=500", "[0, 64)"]),
    "hidden_mismatch": (_set(("hidden_size",), 48), ["hidden_size=48", "hidden_size=32"]),
    "corrupt_weights": (_corrupt, ["DFlash drafter: cannot read the weights", "corrupt_weights"]),
}


def _refused(server: Server, words: list[str]) -> None:
    rc = server.wait_exit(timeout=240)
    log = server.log()
    assert rc != 0, log[-3000:]
    missing = [w for w in words if w not in log]
    assert not missing, f"missing {missing} in:\n{log[-3000:]}"


@pytest.mark.parametrize("case", list(CASES))
def test_bad_drafter_refused(good, case):
    edit, words = CASES[case]
    draft = _variant(good, case, edit)
    _refused(Server(good / "target", draft, "--skip-tokenizer-init"), words)


def test_missing_draft_directory(good):
    _refused(Server(good / "target", good / "no_such_drafter", "--skip-tokenizer-init",
                    env={"HF_HUB_OFFLINE": "1"}), ["no_such_drafter"])


def test_block_size_below_two(good):
    _refused(Server(good / "target", good / "draft", "--skip-tokenizer-init", "--speculative-num-draft-tokens", "1"),
             ["block_size=1", ">= 2"])


def test_mixed_chunk_refused_at_start(good):
    _refused(Server(good / "target", good / "draft", "--skip-tokenizer-init", "--enable-mixed-chunk"),
             ["--enable-mixed-chunk is not supported"])
