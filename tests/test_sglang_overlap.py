"""The overlap (V2) path end to end on CPU: SGLANG_ENABLE_DFLASH_SPEC_V2=1 makes SGLang's scheduler run its overlap
branch with our worker (SGLang 0.5.23 forces the synchronous scheduler on CPU only for the EAGLE family and
NGRAM: `_disable_overlap_schedule_for_cpu` is called from `_handle_eagle_family` and `_handle_ngram` in
`arg_groups/speculative_hook.py`, never from `_handle_dflash`).

Three overlap servers, strict idle leak check on: the bundled pair (chunked prefill, a small KV pool with
optimistic admission so long requests are retracted; the full block every step), a random pair with KV pages of 4
(every verify width in turn, SGLANG_DFLASH_ADAPTIVE=cycle), and a tiny-vocabulary pair for the sampling
distribution (widths chosen adaptively). Greedy output equals the target alone at concurrency 1, 8 and 32."""

from __future__ import annotations

import http.client
import json
import time

import pytest
import torch
from conftest import make_drafter, make_target
from sampling_check import check_first_two_tokens
from sglang_dflash.assets import heldout_prompts
from sglang_dflash.reference import generate
from sglang_dflash.server import start_all, verify_width_counts
from sglang_dflash.target import default_stop_ids
from sglang_server import Server

OVERLAP = {"SGLANG_ENABLE_DFLASH_SPEC_V2": "1"}
OVERLAP_LINE = "the scheduler overlaps steps"
PROMPTS = [[(7 * i + 3 * j) % 60 + 2 for j in range(3 + (i * 5) % 29)] for i in range(12)]


@pytest.fixture(scope="module")
def servers(tiny_pair, tmp_path_factory):
    root = tmp_path_factory.mktemp("overlap")
    target, draft = tiny_pair
    page4 = make_target(heads=4, kv_heads=4, layers=4, seed=12)
    page4.save_pretrained(root / "page4_target")
    page4_draft = make_drafter(page4, layers=2, block_size=8, layer_ids=(0, 2), mask_token_id=63)
    page4_draft.save_pretrained(root / "page4_draft")
    V = 8
    small = make_target(vocab=V, seed=5)
    with torch.no_grad():
        small.get_input_embeddings().weight.div_(10)
    small.save_pretrained(root / "small_target")
    make_drafter(small, block_size=4, mask_token_id=V - 1, seed=6).save_pretrained(root / "small_draft")
    s = {
        # the full block every step (SGLANG_DFLASH_ADAPTIVE=0): at concurrency 32 on this CPU the adaptive width
        # decodes mostly plainly, and these tests are about drafts relayed through the overlap scheduler
        "bundled": Server(target, draft, "--chunked-prefill-size", "64", "--max-total-tokens", "2048",
                          "--schedule-conservativeness", "0.05", env={**OVERLAP, "SGLANG_DFLASH_ADAPTIVE": "0"}),
        # verify widths 1, 2, 4, 8 in turn, step by step: every width and switch under the overlap scheduler
        "page4": Server(root / "page4_target", root / "page4_draft", "--skip-tokenizer-init", "--page-size", "4",
                        "--enable-metrics", env={**OVERLAP, "SGLANG_DFLASH_ADAPTIVE": "cycle"}),
        "small": Server(root / "small_target", root / "small_draft", "--skip-tokenizer-init", env=OVERLAP),
    }
    start_all(*s.values())
    yield s, page4, small
    for server in s.values():
        server.stop()


@pytest.fixture(scope="module")
def bundled_oracle(tiny_pair_models):
    prompts = heldout_prompts()[:32]
    return prompts, generate(tiny_pair_models[0], None, prompts, 24)


@pytest.mark.parametrize("concurrency", [1, 8, 32])
def test_bundled_greedy_equals_target_only(servers, bundled_oracle, concurrency):
    prompts, want = bundled_oracle
    n = {1: 8, 8: 16, 32: 32}[concurrency]
    got = servers[0]["bundled"].generate_many(prompts[:n], 24, concurrency=concurrency, ignore_eos=True)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g["output_ids"] == w.output_ids, f"prompt {i}"
    assert sum(g["meta_info"]["spec_accept_length"] for g in got) / n > 1.5  # drafts really accepted


def test_scheduler_really_runs_its_overlap_branch(servers):
    """The worker logs once when SGLang hands it `on_publish`, which the scheduler does only in the overlap
    branch of `run_batch` (`if self.enable_overlap:`); without the flag the same servers never log it."""
    for name, server in servers[0].items():
        log = server.log()
        assert OVERLAP_LINE in log, (name, log[-2000:])
        assert "'disable_overlap_schedule': False" in log, name


def test_long_requests_retracted_under_overlap_equal_target_only(servers, tiny_pair_models):
    """Sixteen long requests honouring EOS in a 2048-token pool, admitted optimistically: the scheduler must
    retract some mid-decode; every answer still equals the target alone's."""
    base = heldout_prompts()
    prompts = [sum(base[32 + 2 * i: 34 + 2 * i], []) for i in range(16)]
    target = tiny_pair_models[0]
    want = generate(target, None, prompts, 160, stop_ids=default_stop_ids(target))
    server = servers[0]["bundled"]
    got = server.generate_many(prompts, 160, concurrency=16, ignore_eos=False)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g["output_ids"] == w.output_ids, f"prompt {i}"
    assert "#retracted_reqs" in server.log(), "no request was retracted: the pool did not run out"


def _stream(server, prompt, new, drop_after=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
    try:
        conn.request("POST", "/generate", json.dumps({"input_ids": prompt, "stream": True, "sampling_params": {
            "max_new_tokens": new, "temperature": 0, "ignore_eos": True}}), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        last, chunks = None, 0
        for line in resp:
            if line.startswith(b"data:") and line.strip() != b"data: [DONE]":
                last, chunks = json.loads(line[5:]), chunks + 1
                if drop_after is not None and chunks >= drop_after:
                    return None  # the client goes away; the server must abort the request and free its slots
        return last
    finally:
        conn.close()


def test_streaming_and_dropped_streams_then_idle_pools_whole(servers, bundled_oracle):
    prompts, want = bundled_oracle
    server = servers[0]["bundled"]
    for i in range(3):
        assert _stream(server, prompts[i], 24)["output_ids"] == want[i].output_ids
    for i in range(6):
        _stream(server, prompts[i], 200, drop_after=2)
    time.sleep(4)  # idle: SGLang's strict check finds every KV slot free, or the scheduler dies
    assert server.proc.poll() is None and "leak" not in server.log().lower(), server.log()[-3000:]
    assert server.generate(prompts[0], 24, ignore_eos=True)["output_ids"] == want[0].output_ids


@pytest.mark.parametrize("concurrency", [1, 8])
def test_page_size_4_greedy_equals_target_only(servers, concurrency):
    _, page4, _ = servers
    want = generate(page4, None, PROMPTS, 24)
    got = servers[0]["page4"].generate_many(PROMPTS, 24, concurrency=concurrency, ignore_eos=True)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g["output_ids"] == w.output_ids, f"prompt {i}"
    counts = verify_width_counts(servers[0]["page4"])  # every width ran, in turn
    assert sorted(counts) == [1, 2, 4, 8] and min(counts.values()) >= 5, counts


def test_sampling_matches_target_distribution_under_overlap(servers):
    n = 1200
    accepted = check_first_two_tokens(servers[0]["small"], servers[2], n=n)
    assert accepted > n // 10, f"only {accepted} drafts accepted in {n} requests"
