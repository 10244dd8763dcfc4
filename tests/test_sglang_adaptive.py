"""Adaptive verify width end to end (`srt/adaptive.py`): lossless at every width and across switches.

The bundled pair stepping through the widths 1, 2, 4, 8, 16 in turn (SGLANG_DFLASH_ADAPTIVE=cycle), strict idle
KV-leak check on: every request is served at every width and switches width at every step; greedy output equal
to the target alone; the step-timing log and the Prometheus histogram name the widths run.
Elsewhere: sampling at a forced width 2 (chi-square, with and without penalties) in test_sglang_pairs.py; request
features at every width in test_sglang_features.py and the overlap scheduler at every width in
test_sglang_overlap.py (cycle servers); the adaptive default serves the other DFLASH servers, and
test_broken_drafter.py checks it leaves the full block when drafts never pass; the chooser's logic on synthetic
data is tests/test_adaptive.py."""

from __future__ import annotations

import pytest
from sglang_dflash.assets import heldout_prompts
from sglang_dflash.reference import generate
from sglang_dflash.server import verify_width_counts
from sglang_server import Server

WIDTHS = [1, 2, 4, 8, 16]


@pytest.fixture(scope="module")
def cycle(tiny_pair):
    server = Server(*tiny_pair, "--enable-metrics",
                    env={"SGLANG_DFLASH_ADAPTIVE": "cycle", "SGLANG_DFLASH_TIMING": "1"}).wait_ready()
    yield server
    server.stop()


def test_greedy_equal_at_every_width_and_across_switches(cycle, tiny_pair_models):
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

