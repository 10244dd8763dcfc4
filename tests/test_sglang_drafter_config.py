"""A drafter whose config carries yarn RoPE, a sliding-window causal layer, an explicit activation and its target
layers out of ascending order: the SGLang worker equals the reference loop step for step.

The bundled trained drafter's weights with such a config (yarn factor 2, layer 0 sliding with a 12-token window), so
drafts are still accepted often enough for the step-for-step comparison to mean something; a config the worker read
differently from the reference (plain RoPE, no window) changes the acceptance, which the first test shows. Its
target layers are listed as (2, 0, 1) with fc's input blocks permuted to match: the same function as (0, 1, 2), which
SGLang captures in ascending order, so a worker that fed the features in capture order would lose the acceptance."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file, save_file
from sglang_dflash.assets import heldout_prompts
from sglang_dflash.drafter import DFlashDrafter
from sglang_dflash.reference import generate
from sglang_server import Server

MAX_NEW = 32
ROPE = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 2048, "rope_theta": 10000.0}


@pytest.fixture(scope="module")
def drafter_dir(tiny_pair, tmp_path_factory):
    _, draft = tiny_pair
    path = tmp_path_factory.mktemp("yarn_sliding") / "draft"
    shutil.copytree(draft, path)
    raw = json.loads((path / "config.json").read_text())
    raw.update(rope_parameters=ROPE, layer_types=["sliding_attention", "full_attention"], sliding_window=12,
               use_sliding_window=True, hidden_act="silu")
    assert raw["dflash_config"]["target_layer_ids"] == [0, 1, 2]
    raw["dflash_config"]["target_layer_ids"] = [2, 0, 1]
    (path / "config.json").write_text(json.dumps(raw))
    weights = load_file(path / "model.safetensors")
    H = raw["hidden_size"]
    blocks = weights["fc.weight"].split(H, dim=1)  # fc's input: one [H, H] block per target layer, in config order
    weights["fc.weight"] = torch.cat([blocks[2], blocks[0], blocks[1]], dim=1).contiguous()
    save_file(weights, path / "model.safetensors")
    return path


@pytest.fixture(scope="module")
def server(tiny_pair, drafter_dir):
    target, _ = tiny_pair
    s = Server(target, drafter_dir, env={"SGLANG_DFLASH_ADAPTIVE": "0"}).wait_ready()  # full block every step
    yield s
    s.stop()


@pytest.fixture(scope="module")
def prompts():
    return heldout_prompts()[:10]


@pytest.fixture(scope="module")
def oracle(tiny_pair_models, drafter_dir, prompts):
    target, plain_drafter = tiny_pair_models
    drafter = DFlashDrafter.from_pretrained(drafter_dir)
    assert drafter.cfg.layer_attention(0) == (True, 11) and drafter.rotary.attention_factor != 1.0
    got = generate(target, drafter, prompts, MAX_NEW, stop_ids=frozenset())
    plain = generate(target, plain_drafter, prompts, MAX_NEW, stop_ids=frozenset())
    return got, plain


def test_reference_acceptance_depends_on_the_config(oracle):
    got, plain = oracle
    assert [r.output_ids for r in got] == [r.output_ids for r in plain]  # lossless either way
    assert [r.accepted_drafts for r in got] != [r.accepted_drafts for r in plain]
    steps = sum(len(r.accepted_drafts) for r in got)
    assert sum(len(r.output_ids) - 1 for r in got) / steps > 1.5  # drafts still accepted


def test_worker_equals_reference_step_for_step(server, prompts, oracle):
    got = server.generate_many(prompts, MAX_NEW, concurrency=1, ignore_eos=True)
    for i, (g, r) in enumerate(zip(got, oracle[0])):
        assert g["output_ids"] == r.output_ids, f"prompt {i}"
        meta = g["meta_info"]
        assert meta["spec_verify_ct"] == len(r.accepted_drafts), f"prompt {i}"
        hist = meta["spec_correct_drafts_histogram"]
        assert Counter({k: v for k, v in enumerate(hist) if v}) == Counter(r.accepted_drafts), f"prompt {i}"


def test_concurrent_requests_equal_reference(server, prompts, oracle):
    got = server.generate_many(prompts, MAX_NEW, concurrency=5, ignore_eos=True)
    assert [g["output_ids"] for g in got] == [r.output_ids for r in oracle[0]]
