"""A GPU attention backend's contract, run on CPU: SGLang's `triton` attention backend for both the target's
verify and the drafter's non-causal block forward, its kernels on Triton's CPU interpreter (TRITON_INTERPRET=1;
the CPU platform then allows triton for the drafter). The metadata our block forwards hand a GPU backend
(seq_lens, kv indptr, no custom mask, ENCODER_ONLY layers) go through SGLang's own code, not our torch_native
extension. Greedy output equals the target alone, and per-request acceptance equals the reference loop's step
for step (a drafter attending wrongly would accept differently; the verify width is fixed at the block for
that). About 4 s per 16-token request here."""

from __future__ import annotations

from collections import Counter

import pytest
from sglang_dflash.assets import heldout_prompts
from sglang_dflash.reference import generate
from sglang_server import Server


def test_triton_attention_backend_under_the_interpreter(tiny_pair, tiny_pair_models):
    target_dir, draft_dir = tiny_pair
    server = Server(target_dir, draft_dir, "--attention-backend", "triton", "--speculative-draft-attention-backend",
                    "triton", env={"TRITON_INTERPRET": "1", "SGLANG_DFLASH_ADAPTIVE": "0"})
    try:
        server.wait_ready()
        prompts = heldout_prompts()[:3]
        want = generate(tiny_pair_models[0], None, prompts, 16)
        oracle = generate(*tiny_pair_models, prompts, 16, stop_ids=frozenset())
        for i, (p, w, r) in enumerate(zip(prompts, want, oracle)):
            out = server.generate(p, 16, ignore_eos=True)
            assert out["output_ids"] == w.output_ids == r.output_ids, f"prompt {i}"
            hist = out["meta_info"]["spec_correct_drafts_histogram"]
            assert Counter({k: v for k, v in enumerate(hist) if v}) == Counter(r.accepted_drafts), f"prompt {i}"
        log = server.log()
        assert "attention backends: target TritonAttnBackend, drafter TritonAttnBackend" in log, log[-3000:]
        assert sum(r.accepted_drafts.count(0) < len(r.accepted_drafts) for r in oracle) > 0  # drafts accepted
    finally:
        server.stop()


@pytest.mark.slow
def test_triton_attention_backend_at_every_verify_width(tiny_pair, tiny_pair_models):
    """SGLang's triton backend reads a block forward's width from its spec_info: both forwards at widths 1, 2, 4,
    8, 16 in turn (SGLANG_DFLASH_ADAPTIVE=cycle) give the target's greedy output."""
    target_dir, draft_dir = tiny_pair
    server = Server(target_dir, draft_dir, "--attention-backend", "triton", "--speculative-draft-attention-backend",
                    "triton", env={"TRITON_INTERPRET": "1", "SGLANG_DFLASH_ADAPTIVE": "cycle"})
    try:
        server.wait_ready()
        prompts = heldout_prompts()[3:5]
        want = generate(tiny_pair_models[0], None, prompts, 16)
        got = server.generate_many(prompts, 16, concurrency=2, ignore_eos=True)
        for i, (g, w) in enumerate(zip(got, want)):
            assert g["output_ids"] == w.output_ids, f"prompt {i}"
        assert "verify widths cycle [1, 2, 4, 8, 16]" in server.log()
    finally:
        server.stop()
