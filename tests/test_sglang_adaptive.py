"""Adaptive verify width end to end (`srt/adaptive.py`): lossless at every width and across switches.

Two servers, strict idle KV-leak check on:
  - the bundled pair stepping through the widths 1, 2, 4, 8, 16 in turn (SGLANG_DFLASH_ADAPTIVE=cycle), so
    every request is served at every width and switches width at every step: greedy output equal to the
    target alone; the step-timing log and the Prometheus histogram name the widths run;
  - a tiny-vocabulary pair forced to width 2 (SGLANG_DFLASH_VERIFY_WIDTHS=2): the sampled joint of the first
    three tokens against the target's exact probabilities (chi-square).
The adaptive default itself serves the other test modules' DFLASH servers (and the chooser's logic is
tests/test_adaptive.py); test_broken_drafter.py checks it settles on plain decode when drafts never pass."""

from __future__ import annotations

import pytest
import torch
from conftest import make_drafter, make_target
from sampling_check import check_first_tokens
from sglang_dflash.assets import heldout_prompts
from sglang_dflash.reference import generate
from sglang_server import Server, start_all, verify_width_counts

WIDTHS = [1, 2, 4, 8, 16]


@pytest.fixture(scope="module")
def servers(tiny_pair, tmp_path_factory):
    root = tmp_path_factory.mktemp("adaptive")
    V = 8
    small = make_target(vocab=V, seed=5)
    with torch.no_grad():
        small.get_input_embeddings().weight.div_(10)  # flatter: several likely tokens per step
    small.save_pretrained(root / "target")
    make_drafter(small, block_size=4, mask_token_id=V - 1, seed=6).save_pretrained(root / "draft")
    cycle = Server(*tiny_pair, "--enable-metrics",
                   env={"SGLANG_DFLASH_ADAPTIVE": "cycle", "SGLANG_DFLASH_TIMING": "1"})
    width2 = Server(root / "target", root / "draft", "--skip-tokenizer-init",
                    env={"SGLANG_DFLASH_VERIFY_WIDTHS": "2"})
    start_all(cycle, width2)
    yield cycle, width2, small
    cycle.stop()
    width2.stop()


def test_greedy_equal_at_every_width_and_across_switches(servers, tiny_pair_models):
    cycle = servers[0]
    prompts = heldout_prompts()[:12]
    want = generate(tiny_pair_models[0], None, prompts, 40)
    # 4 at a time: requests join at different steps, so each meets the widths in its own order
    got = cycle.generate_many(prompts, 40, concurrency=4, ignore_eos=True)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g["output_ids"] == w.output_ids, f"prompt {i}"
    assert sum(g["meta_info"]["spec_accept_length"] for g in got) / len(got) > 1.5  # drafts really accepted
    counts = verify_width_counts(cycle)
    assert sorted(counts) == WIDTHS and min(counts.values()) >= 10, counts
    assert max(counts.values()) - min(counts.values()) <= 1, counts  # one step per width in turn
    log = cycle.log()
    assert "verify widths cycle [1, 2, 4, 8, 16]" in log
    assert "widths {1: 10, 2: 10, 4: 10, 8: 10, 16: 10}" in log, log[-3000:]


def test_sampling_at_width_2_matches_target_distribution(servers):
    _, width2, small = servers
    n = 1200
    accepted = check_first_tokens(width2, small, k=3, n=n)
    assert accepted > n // 10, f"only {accepted} drafts accepted in {n} requests"
    assert "verify widths adaptive [2]" in width2.log()
