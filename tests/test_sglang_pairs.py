"""SGLang DFLASH on tiny random pairs of several shapes (block 4, 8, 16; GQA ratios), and the sampling
distribution check on a tiny vocabulary (its server verifies 2 tokens per step: a small forced width). Servers run
without a tokenizer (token ids in and out)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_drafter, make_target
from sampling_check import check_first_tokens, check_first_two_tokens
from sglang_dflash.reference import generate
from sglang_dflash.server import start_all
from sglang_server import Server

SHAPES = {  # name: (target kwargs, drafter kwargs, extra server args)
    "b4_gqa2": (dict(heads=4, kv_heads=2, layers=3, seed=11), dict(layers=1, block_size=4, layer_ids=(0, 1)), ()),
    # KV pages of 4 slots: block slots are reserved in whole pages (reserve_block_slots' paged branch)
    "b8_mha_page4": (dict(heads=4, kv_heads=4, layers=4, seed=12), dict(layers=2, block_size=8, layer_ids=(0, 2)),
                     ("--page-size", "4")),
    # a 64-token context (test_generation_up_to_the_context_length)
    "b16_gqa4": (dict(heads=4, kv_heads=1, layers=3, seed=13), dict(layers=2, block_size=16, layer_ids=(1,)),
                 ("--context-length", "64")),
}
PROMPTS = [[(7 * i + 3 * j) % 60 + 2 for j in range(3 + (i * 5) % 29)] for i in range(20)]


def _save_pair(root, name, t_kw, d_kw):
    target = make_target(**t_kw)
    target.config.max_position_embeddings = 512
    drafter = make_drafter(target, mask_token_id=63, **d_kw)
    target.save_pretrained(root / name / "target")
    drafter.save_pretrained(root / name / "draft")
    return target, drafter


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    models, servers = {}, {}
    for name, (t_kw, d_kw, extra) in SHAPES.items():
        models[name] = _save_pair(root, name, t_kw, d_kw)
        servers[name] = Server(root / name / "target", root / name / "draft", "--skip-tokenizer-init",
                               "--max-total-tokens", "4096", *extra)
    start_all(*servers.values())
    yield models, servers
    for s in servers.values():
        s.stop()


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("concurrency", [1, 8])
def test_greedy_equals_target_only(pairs, name, concurrency):
    models, servers = pairs
    target, _ = models[name]
    want = generate(target, None, PROMPTS, 24)
    got = servers[name].generate_many(PROMPTS, 24, concurrency=concurrency, ignore_eos=True)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g["output_ids"] == w.output_ids, f"{name} prompt {i}"


@pytest.fixture(scope="module")
def small_vocab_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab8")
    V = 8
    target = make_target(vocab=V, seed=5)
    with torch.no_grad():
        target.get_input_embeddings().weight.div_(10)  # flatter: several likely tokens per step
    drafter = make_drafter(target, block_size=4, mask_token_id=V - 1, seed=6)
    target.save_pretrained(root / "target")
    drafter.save_pretrained(root / "draft")
    # forced to verify width 2 (of the block's 4; SGLANG_DFLASH_VERIFY_WIDTHS): the distribution checks below run
    # at a small adaptive width (the adaptive default draws samples in test_sglang_overlap.py's small server)
    server = Server(root / "target", root / "draft", "--skip-tokenizer-init",
                    env={"SGLANG_DFLASH_VERIFY_WIDTHS": "2"}).wait_ready()
    assert "verify widths adaptive [2]" in server.log()
    yield target, server
    server.stop()


def test_sampling_matches_target_distribution(small_vocab_server):
    """Joint distribution of the first two sampled tokens from the DFLASH server against the exact target
    probabilities (temperature 1, top-k 6), chi-square; drafts must be accepted often enough to matter."""
    target, server = small_vocab_server
    n = 1200
    accepted = check_first_two_tokens(server, target, n=n)
    assert accepted > n // 10, f"only {accepted} drafts accepted in {n} requests"


def test_sampling_with_penalties_matches_target_distribution(small_vocab_server):
    """Sampling with all three penalties: the joint of the first three tokens (the third drawn from a verify row
    that must count the accepted draft before it) against the target's penalised probabilities."""
    target, server = small_vocab_server
    n = 1500
    accepted = check_first_tokens(server, target, k=3, n=n, penalties=dict(
        frequency_penalty=0.7, presence_penalty=0.5, repetition_penalty=1.6))
    assert accepted > n // 10, f"only {accepted} drafts accepted in {n} requests"


def test_generation_up_to_the_context_length(pairs):
    """b16_gqa4 serves a 64-token context: a 40-token prompt asking for (nearly) all the rest decodes its last
    blocks within two blocks of the end of its req_to_token row (SGLang 0.5.23 gives rows context + 4 + B
    columns); the 2*B block reserve is cut at the row end (without the cut the server died)."""
    models, servers = pairs
    target, _ = models["b16_gqa4"]
    prompt = [(5 * j) % 60 + 2 for j in range(40)]
    got = servers["b16_gqa4"].generate(prompt, 23, ignore_eos=True)["output_ids"]
    want = generate(target, None, [prompt], 23)[0].output_ids
    assert len(got) >= 20 and got == want[: len(got)]
    assert servers["b16_gqa4"].proc.poll() is None
