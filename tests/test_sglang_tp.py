"""Tensor parallelism on CPU: DFLASH served at `--tp-size 2` (gloo, one core per rank), lossless.

The drafter is sharded over the two ranks (each holds 2 of 4 heads, 1 of 2 KV heads, half the MLP), its logits
gathered over the target's vocab-parallel lm_head, rank 0's drafts and acceptance broadcast. Checked against
`reference.generate` target-only, which equals our TP 1 server's output (test_sglang_bundled.py,
test_sglang_pairs.py) and, on the bundled target, SGLang's own TP 2 server without speculation
(`test_plain_tp2_equals_reference`). One server at a time (a class-scoped fixture each); the strict idle
KV-leak check is on in every server.

A TP 2 server takes 45-90 s to start on this 2-core machine, so the default run (`scripts/test.sh`: -m "not
slow") is the bundled pair alone (82 s when the machine was otherwise idle); the random pairs, the plain
TP 2 server and the overlap scheduler are marked slow (`-m slow`; 2-5 minutes each, depending on what else
runs)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import make_drafter, make_target
from sampling_check import check_first_two_tokens
from sglang_dflash.assets import heldout_prompts
from sglang_dflash.reference import generate
from sglang_server import Server

TP2 = ("--tp-size", "2", "--max-total-tokens", "4096", "--skip-tokenizer-init")
# one core per rank: without it SGLang refuses more ranks than NUMA nodes on this machine
TP_ENV = {"SGLANG_CPU_OMP_THREADS_BIND": "0|1"}
# the full block every step, so acceptance can be compared with the unsharded reference loop step for step (the
# width each rank would choose is rank 0's: RankSync.width, tests/test_parallel.py; adaptive at TP 2: slow test)
FIXED = {**TP_ENV, "SGLANG_DFLASH_ADAPTIVE": "0"}
MAX_NEW = 24


def _assert_sharded(server: Server, heads: str) -> None:
    log = server.log()
    for rank in (0, 1):
        assert f"this rank ({rank}) holds {heads}" in log, log[-3000:]


class TestBundledPair:
    """The trained pair: real multi-token acceptance, so the sharded drafter's drafts matter."""

    @pytest.fixture(scope="class")
    def server(self, tiny_pair):
        s = Server(*tiny_pair, *TP2, "--decode-log-interval", "1", env=FIXED).wait_ready()
        yield s
        s.stop()

    @pytest.fixture(scope="class")
    def prompts(self):
        return heldout_prompts()[:12]

    @pytest.fixture(scope="class")
    def sample_prompt(self):
        return tuple(heldout_prompts()[0][:24])

    @pytest.fixture(scope="class")
    def oracle(self, tiny_pair_models, prompts):
        return generate(*tiny_pair_models, prompts, MAX_NEW, stop_ids=frozenset())

    def test_greedy_equals_target_and_reference_acceptance(self, server, prompts, oracle):
        """Output equal to the target alone; acceptance equal to the unsharded reference loop's, step for step
        (so the sharded drafter drafts what the whole one does)."""
        got = server.generate_many(prompts[:4], MAX_NEW, concurrency=1, ignore_eos=True)
        for i, (g, r) in enumerate(zip(got, oracle)):
            assert g["output_ids"] == r.output_ids, f"prompt {i}"
            hist = g["meta_info"]["spec_correct_drafts_histogram"]
            assert Counter({k: v for k, v in enumerate(hist) if v}) == Counter(r.accepted_drafts), f"prompt {i}"
        steps = sum(o["meta_info"]["spec_verify_ct"] for o in got)
        produced = sum(len(o["output_ids"]) - 1 for o in got)
        assert produced / steps > 2.0  # real multi-token acceptance
        _assert_sharded(server, "2 of 4 attention heads, 1 of 2 KV heads, 384 of 768 MLP channels")
        assert "context K/V stacked, kernel context_kv" in server.log()  # each rank's heads through the kernel

    def test_greedy_batched_equals_target(self, server, prompts, oracle):
        got = server.generate_many(prompts, MAX_NEW, concurrency=6, ignore_eos=True)
        for i, (g, r) in enumerate(zip(got, oracle)):
            assert g["output_ids"] == r.output_ids, f"prompt {i}"

    def test_sampling_matches_target_distribution(self, server, tiny_pair_models, sample_prompt):
        """First two sampled tokens (temperature 1, top-k 6) against the target's exact joint distribution,
        chi-square; 400 requests (the TP 1 tests use 1200: here the point is that the ranks stay in step)."""
        n = 400
        accepted = check_first_two_tokens(server, tiny_pair_models[0], vocab=4096, prompt=sample_prompt, n=n)
        assert accepted > n // 10, f"only {accepted} drafts accepted in {n} requests"


@pytest.mark.slow
def test_plain_tp2_equals_reference(tiny_pair, tiny_pair_models):
    """SGLang without speculation at TP 2 gives the reference's target-only output on the bundled target (so
    the comparisons above are to SGLang's own TP 2 output too)."""
    _assert_tp2_equals_target(tiny_pair_models[0], Server(tiny_pair[0], None, *TP2, env=TP_ENV), 12, 6)


def _assert_tp2_equals_target(target, server: Server, n_prompts: int, concurrency: int) -> str:
    """Greedy output of a TP 2 server (started and stopped here) on held-out prompts equal to the target alone;
    -> the server's log."""
    prompts = heldout_prompts()[:n_prompts]
    want = generate(target, None, prompts, MAX_NEW, stop_ids=frozenset())
    server.wait_ready()
    try:
        got = server.generate_many(prompts, MAX_NEW, concurrency=concurrency, ignore_eos=True)
    finally:
        server.stop()
    for i, (g, w) in enumerate(zip(got, want)):
        assert g["output_ids"] == w.output_ids, f"prompt {i}"
    return server.log()


@pytest.mark.slow
class TestRandomPair:
    """A random pair on a vocabulary of 8 (4 heads, 2 KV heads: both split over 2 ranks): greedy equal to the
    target alone, and the sampled distribution the target's (chi-square, tests/sampling_check.py). Vocabulary
    8 pads to 64 rows of lm_head, so rank 1's shard is all padding: the gather must cut it off."""

    V = 8

    @pytest.fixture(scope="class")
    def pair(self, tmp_path_factory):
        root = tmp_path_factory.mktemp("tp_vocab8")
        target = make_target(vocab=self.V, heads=4, kv_heads=2, seed=5)
        with torch.no_grad():
            target.get_input_embeddings().weight.div_(10)  # flatter: several likely tokens per step
        drafter = make_drafter(target, block_size=4, mask_token_id=self.V - 1, seed=6)
        target.save_pretrained(root / "target")
        drafter.save_pretrained(root / "draft")
        server = Server(root / "target", root / "draft", *TP2, env=TP_ENV).wait_ready()
        yield target, server
        server.stop()

    def test_greedy_equals_target(self, pair):
        target, server = pair
        prompts = [[(3 * i + j) % 6 + 1 for j in range(2 + i % 5)] for i in range(8)]
        want = generate(target, None, prompts, 16)
        got = server.generate_many(prompts, 16, concurrency=4, ignore_eos=True)
        for i, (g, w) in enumerate(zip(got, want)):
            assert g["output_ids"] == w.output_ids, f"prompt {i}"
        _assert_sharded(server, "2 of 4 attention heads, 1 of 2 KV heads")

    def test_sampling_matches_target_distribution(self, pair):
        target, server = pair
        n = 1200
        accepted = check_first_two_tokens(server, target, vocab=self.V, n=n)
        assert accepted > n // 10, f"only {accepted} drafts accepted in {n} requests"


@pytest.mark.slow
def test_one_kv_head_replicated_on_both_ranks(tmp_path):
    """A drafter with 1 KV head over 2 ranks: each rank keeps the whole head (as SGLang's QKVParallelLinear
    replicates KV heads) beside its 2 of 4 query heads; greedy output equal to the target alone."""
    target = make_target(vocab=64, heads=4, kv_heads=2, layers=3, seed=11)
    drafter = make_drafter(target, layers=1, block_size=4, layer_ids=(0, 1), mask_token_id=63, kv_heads=1)
    target.save_pretrained(tmp_path / "target")
    drafter.save_pretrained(tmp_path / "draft")
    prompts = [[(7 * i + 3 * j) % 60 + 2 for j in range(3 + (i * 5) % 29)] for i in range(8)]
    want = generate(target, None, prompts, 16)
    server = Server(tmp_path / "target", tmp_path / "draft", *TP2, env=TP_ENV).wait_ready()
    try:
        got = server.generate_many(prompts, 16, concurrency=4, ignore_eos=True)
        _assert_sharded(server, "2 of 4 attention heads, 1 of 1 KV heads")
    finally:
        server.stop()
    for i, (g, w) in enumerate(zip(got, want)):
        assert g["output_ids"] == w.output_ids, f"prompt {i}"


@pytest.mark.slow
def test_overlap_scheduler_tp2(tiny_pair, tiny_pair_models):
    """SGLang's overlap scheduler (SGLANG_ENABLE_DFLASH_SPEC_V2=1) at TP 2: both ranks take the overlap branch and
    greedy output equals the target alone at concurrency 1 and 6."""
    prompts = heldout_prompts()[:12]
    want = generate(tiny_pair_models[0], None, prompts, MAX_NEW, stop_ids=frozenset())
    s = Server(*tiny_pair, *TP2, env={**TP_ENV, "SGLANG_ENABLE_DFLASH_SPEC_V2": "1"}).wait_ready()
    try:
        runs = [s.generate_many(prompts, MAX_NEW, concurrency=c, ignore_eos=True) for c in (1, 6)]
        log = s.log()
    finally:
        s.stop()
    for rank in (0, 1):
        assert f"TP{rank}] sglang-dflash: the scheduler overlaps steps" in log
    for got in runs:
        for i, (g, w) in enumerate(zip(got, want)):
            assert g["output_ids"] == w.output_ids, f"prompt {i}"


@pytest.mark.slow
def test_every_verify_width_at_tp2_equals_target(tiny_pair, tiny_pair_models):
    """The verify widths 1, 2, 4, 8, 16 in turn (SGLANG_DFLASH_ADAPTIVE=cycle) at TP 2: every rank runs rank 0's
    width (`RankSync.width`), drafts and verifies at it; greedy output equal to the target alone."""
    server = Server(*tiny_pair, *TP2, env={**TP_ENV, "SGLANG_DFLASH_ADAPTIVE": "cycle"})
    assert "verify widths cycle [1, 2, 4, 8, 16]" in _assert_tp2_equals_target(tiny_pair_models[0], server, 8, 4)
