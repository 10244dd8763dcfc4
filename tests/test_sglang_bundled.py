"""SGLang end to end on the bundled trained pair (real multi-token acceptance), CPU.

One DFLASH server (chunked prefill of 64 tokens, so longer prompts are prefilled in chunks; verify width fixed at
the block, so acceptance can be compared with the reference loop step for step) and one server without
speculation, shared by the module; both started in child processes."""

from __future__ import annotations

import time
from collections import Counter

import pytest
from sglang_dflash.assets import heldout_prompts
from sglang_dflash.reference import generate
from sglang_dflash.server import start_all
from sglang_server import Server

MAX_NEW = 32
CHUNK = 64
FIXED = {"SGLANG_DFLASH_ADAPTIVE": "0"}


@pytest.fixture(scope="module")
def servers(tiny_pair):
    target, draft = tiny_pair
    # a fixed verify width (the full block): acceptance is compared with the reference loop's step for step
    dflash = Server(target, draft, "--chunked-prefill-size", str(CHUNK), "--decode-log-interval", "1", env=FIXED)
    plain = Server(target)
    start_all(dflash, plain)
    yield dflash, plain
    dflash.stop()
    plain.stop()


@pytest.fixture(scope="module")
def prompts():
    base = heldout_prompts()
    long = [base[0] + base[1] + base[2] + base[3], base[4] + base[5] + base[6]]  # > CHUNK tokens: chunked
    assert all(len(p) > CHUNK for p in long)
    return base[:20] + long


@pytest.fixture(scope="module")
def oracle(tiny_pair_models, prompts):
    target, drafter = tiny_pair_models
    return generate(target, drafter, prompts, MAX_NEW, stop_ids=frozenset())


def test_greedy_batch1_equals_baseline_and_reference(servers, prompts, oracle):
    dflash, plain = servers
    got = dflash.generate_many(prompts, MAX_NEW, concurrency=1, ignore_eos=True)
    want = plain.generate_many(prompts, MAX_NEW, concurrency=1, ignore_eos=True)
    for i, (g, w, r) in enumerate(zip(got, want, oracle)):
        assert g["output_ids"] == w["output_ids"] == r.output_ids, f"prompt {i}"
        meta = g["meta_info"]
        # per-request acceptance equals the reference loop's, step for step (as a histogram of drafts kept)
        assert meta["spec_verify_ct"] == len(r.accepted_drafts), f"prompt {i}"
        hist = meta["spec_correct_drafts_histogram"]
        assert Counter({k: v for k, v in enumerate(hist) if v}) == Counter(r.accepted_drafts), f"prompt {i}"
    # real multi-token acceptance: mean tokens per verify step above 2
    steps = sum(o["meta_info"]["spec_verify_ct"] for o in got)
    produced = sum(len(o["output_ids"]) - 1 for o in got)  # the first token comes from prefill
    assert produced / steps > 2.0
    assert all(o["meta_info"]["spec_accept_length"] > 1 for o in got)


def test_greedy_batch8_equals_reference(servers, prompts, oracle):
    dflash, _ = servers
    got = dflash.generate_many(prompts, MAX_NEW, concurrency=8, ignore_eos=True)
    for i, (g, r) in enumerate(zip(got, oracle)):
        assert g["output_ids"] == r.output_ids, f"prompt {i}"


def test_prefix_cache_hit_same_output(servers, prompts, oracle, tiny_pair_models):
    dflash, _ = servers
    prompt = prompts[-1]
    first = dflash.generate(prompt, MAX_NEW, ignore_eos=True)
    again = dflash.generate(prompt, MAX_NEW, ignore_eos=True)
    assert again["meta_info"]["cached_tokens"] > 0
    assert first["output_ids"] == again["output_ids"] == oracle[-1].output_ids
    # a new prompt that shares a cached prefix but continues differently
    branch = prompt[:40] + prompts[3][:10]
    cold = generate(*tiny_pair_models, [branch], MAX_NEW, stop_ids=frozenset())[0]
    hit = dflash.generate(branch, MAX_NEW, ignore_eos=True)
    assert hit["meta_info"]["cached_tokens"] >= 32
    assert hit["output_ids"] == cold.output_ids


def test_stop_and_max_new_tokens(servers, oracle, prompts):
    dflash, _ = servers
    r = oracle[0]
    stop = r.output_ids[5]
    cut = r.output_ids.index(stop) + 1
    out = dflash.generate(prompts[0], MAX_NEW, stop_token_ids=[stop])  # (ignore_eos would ignore it too)
    assert out["output_ids"] == r.output_ids[:cut]
    for n in (1, 2, 5, 17):
        out = dflash.generate(prompts[0], n, ignore_eos=True)
        assert out["output_ids"] == r.output_ids[:n]


def test_sampling_runs(servers, prompts):
    dflash, _ = servers
    outs = dflash.generate_many(prompts[:6], 24, concurrency=3, temperature=0.8, top_p=0.9, top_k=50, min_p=0.02,
                                ignore_eos=True)
    for o in outs:
        assert len(o["output_ids"]) == 24 and all(0 <= t < 4096 for t in o["output_ids"])


def test_bad_sampling_params_get_400_and_server_keeps_serving(servers, prompts):
    dflash, _ = servers
    for bad in ({"temperature": -1.0}, {"top_p": 1.5}, {"top_k": -5}, {"min_p": 2.0}):
        status, body = dflash.post("/generate", {"input_ids": prompts[0],
                                                 "sampling_params": {"max_new_tokens": 4, **bad}})
        assert status == 400, (bad, status, body)
    assert len(dflash.generate(prompts[0], 4)["output_ids"]) == 4


def test_inputs_that_would_crash_a_forward_get_400_naming_the_value(servers, prompts):
    """Stock SGLang 0.5.23's scheduler dies on out-of-vocabulary prompt ids (IndexError in the embedding); a
    DFLASH server with our plugin answers 400 naming the bad value and the valid range, and serves exactly
    what it can (stop ids outside the vocabulary, a top_k past int32)."""
    dflash, _ = servers
    V = 4096  # the bundled target's vocabulary
    ok = {"max_new_tokens": 4}
    cases = [
        ({"input_ids": prompts[0][:5] + [V], "sampling_params": ok}, [f"token id {V}", "position 5", f"[0, {V})"]),
        ({"input_ids": [3, -1, 5], "sampling_params": ok}, ["token id -1", "position 1"]),
        ({"input_ids": [[1, 2], [3, 99999]], "sampling_params": ok}, ["token id 99999"]),
        ({"input_ids": [2**63 + 1, 2], "sampling_params": ok}, [str(2**63 + 1)]),
    ]
    for body, words in cases:
        status, out = dflash.post("/generate", body)
        assert status == 400, (body, status, out)
        assert all(w in str(out) for w in words), (words, out)
    status, out = dflash.post("/v1/completions", {"model": "default", "prompt": [5, V + 1], "max_tokens": 4})
    assert status == 400 and f"token id {V + 1}" in str(out), (status, out)
    # served exactly instead: a stop id no token can equal (stock SGLang serves it, and dies on it beside a
    # min_new_tokens request) changes nothing; a top_k past int32 (stock dies) is the same as no top-k
    plain = dflash.generate(prompts[0], 8, ignore_eos=True)["output_ids"]
    assert dflash.generate(prompts[0], 8, ignore_eos=True, stop_token_ids=[V + 5])["output_ids"] == plain
    assert dflash.generate(prompts[0], 8, ignore_eos=True, top_k=2**40)["output_ids"] == plain  # greedy: same
    assert dflash.proc.poll() is None, dflash.log()[-3000:]
    assert len(dflash.generate(prompts[0], 4)["output_ids"]) == 4


def test_openai_chat_streaming_and_not(servers):
    from openai import OpenAI

    dflash, plain = servers
    msgs = [{"role": "user", "content": "def parse_header(line):"}]
    answers = []
    for server in (dflash, plain):
        client = OpenAI(base_url=server.url + "/v1", api_key="none")
        full = client.chat.completions.create(model="default", messages=msgs, max_tokens=24, temperature=0)
        answers.append(full.choices[0].message.content)
    assert answers[0] == answers[1] and answers[0]
    client = OpenAI(base_url=dflash.url + "/v1", api_key="none")
    stream = client.chat.completions.create(model="default", messages=msgs, max_tokens=24, temperature=0, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == answers[0]


def test_kv_pools_back_to_idle(servers, prompts):
    """After every request finished, SGLang's strict idle memory check (on in these servers) finds the
    shared KV allocator whole; a leak would raise in the scheduler and kill the server."""
    dflash, _ = servers
    dflash.generate_many(prompts[:8], 20, concurrency=8, ignore_eos=True)
    time.sleep(3)  # idle: the scheduler runs its memory check
    status, _ = dflash.post("/flush_cache", {})
    assert status == 200
    assert dflash.proc.poll() is None, dflash.log()[-3000:]
    assert "leak" not in dflash.log().lower()
    assert len(dflash.generate(prompts[0], 4)["output_ids"]) == 4


def _find(obj, key):
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        obj = list(obj.values())
    if isinstance(obj, list):
        for v in obj:
            found = _find(v, key)
            if found is not None:
                return found
    return None


def test_server_metrics_report_acceptance(servers, prompts):
    import json
    import urllib.request

    dflash, _ = servers
    dflash.generate_many(prompts[:4], 24, concurrency=4, ignore_eos=True)
    with urllib.request.urlopen(dflash.url + "/get_server_info", timeout=30) as r:
        info = json.loads(r.read())
    # SGLang folds step counts into its server-wide totals when it logs a decode batch (every batch here)
    assert _find(info, "avg_spec_accept_length") > 1.5, info
    assert "accept len: " in dflash.log()


def test_worker_reports_its_paths(servers):
    """The startup line names the context K/V path: on SGLang's plain per-layer pool it must be the
    stacked one (kernel context_kv), not the per-layer fallback."""
    dflash, _ = servers
    assert "DFLASH worker active" in dflash.log()
    assert "the scheduler overlaps steps" not in dflash.log()  # synchronous by default (test_sglang_overlap.py)
    line = next((x for x in dflash.log().splitlines() if "sglang-dflash: context K/V" in x), "")
    assert "context K/V stacked, kernel context_kv" in line, line or dflash.log()[-3000:]


ENGINE = """
import sglang as sgl
from sglang_dflash.assets import tiny_pair, heldout_prompts
t, d = tiny_pair()
if __name__ == "__main__":
    eng = sgl.Engine(model_path=str(t), speculative_algorithm="DFLASH", speculative_draft_model_path=str(d),
                     device="cpu")
    out = eng.generate(input_ids=heldout_prompts()[:2], sampling_params={"max_new_tokens": 16, "temperature": 0})
    print("OUT", [o["output_ids"] for o in out])
    eng.shutdown()
"""


def test_engine_with_no_further_arguments(oracle):
    """sglang.Engine(model_path, speculative_algorithm="DFLASH", speculative_draft_model_path, device="cpu")."""
    import ast
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", ENGINE], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("OUT "))
    got = ast.literal_eval(line[4:])
    assert got == [r.output_ids[:16] for r in oracle[:2]]
