"""Request features on a DFLASH server, each against SGLang without speculation on the same target:
penalties, min_new_tokens, logit_bias, custom logit processors, logprobs, constrained decoding.

The plain server runs with `--disable-overlap-schedule`: SGLang's overlapped scheduler (its CPU default without
speculation) counts penalties one token late (it reads `req.output_ids[-1]` before the previous step's token is
in it, and the last prompt token at the first step), so only the synchronous one gives the exact
non-speculative output that DFLASH must equal. The synchronous DFLASH server steps through every verify width in
turn (SGLANG_DFLASH_ADAPTIVE=cycle); the overlap one chooses its widths (the default)."""

from __future__ import annotations

import json

import pytest
from sglang.srt.sampling.custom_logit_processor import DisallowedTokensLogitsProcessor
from sglang_dflash.assets import heldout_prompts
from sglang_dflash.server import start_all
from sglang_server import Server

N_PROMPTS = 4
MAX_NEW = 40


@pytest.fixture(scope="module")
def servers(tiny_pair):
    target, draft = tiny_pair
    extra = ("--enable-custom-logit-processor", "--enable-return-hidden-states")
    # the synchronous DFLASH server steps through every verify width in turn (1 = plain decode ... 16): each
    # feature is then served at every width and across width switches within a request
    dflash = Server(target, draft, *extra, env={"SGLANG_DFLASH_ADAPTIVE": "cycle"})
    plain = Server(target, None, "--disable-overlap-schedule", *extra)
    overlap = Server(target, draft, *extra, env={"SGLANG_ENABLE_DFLASH_SPEC_V2": "1"})
    start_all(dflash, plain, overlap)
    yield dflash, plain, overlap
    for s in (dflash, plain, overlap):
        s.stop()


@pytest.fixture(scope="module")
def prompts():
    return heldout_prompts()[:N_PROMPTS]


def _both(servers, body):
    dflash, plain, _ = servers
    outs = []
    for s in (dflash, plain):
        status, out = s.post("/generate", body)
        assert status == 200, out
        outs.append(out)
    return outs


GRAMMARS = {
    "regex": {"regex": "(def|class) [a-z_]{1,20}\\("},
    "json_schema": {"json_schema": json.dumps({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12}, "n": {"type": "integer"}}, "required": ["name", "n"]})},
    "ebnf": {"ebnf": 'root ::= "def " name "(" name ")"\nname ::= [a-z_]+'},
}
PENALTIES = {
    "frequency": dict(frequency_penalty=0.8),
    "presence": dict(presence_penalty=1.2),
    "repetition": dict(repetition_penalty=1.5),
    "additive_together": dict(frequency_penalty=0.3, presence_penalty=0.2, min_new_tokens=10),
    "min_new_tokens": dict(min_new_tokens=30),
    "logit_bias": dict(logit_bias={"10": 3.0, "20": -100.0, "297": -2.5}),
}


def _many(server, bodies, concurrency=8):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(concurrency) as pool:
        got = list(pool.map(lambda b: server.post("/generate", b), bodies))
    for status, out in got:
        assert status == 200, out
    return [out for _, out in got]


def test_greedy_with_penalties_equals_no_speculation(servers, prompts):
    """Token for token, every penalty on its own and together, in one batch with plain requests and a grammar
    request (each request its own rules): row j of each block sees the drafts before it (SGLang's own DFLASH
    applies one per-request penalty to the whole block)."""
    dflash, plain, _ = servers
    kinds = [{}, *PENALTIES.values(), GRAMMARS["regex"]]
    bodies = [{"input_ids": p, "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0, **kind}}
              for kind in kinds for p in prompts[:2]]
    got, want = _many(dflash, bodies), _many(plain, bodies)
    for b, g, w in zip(bodies, got, want):
        assert g["output_ids"] == w["output_ids"], b["sampling_params"]
    assert sum(g["meta_info"]["spec_num_correct_drafts"] for g in got) > len(bodies)  # in-block rows exercised


def _penalised_reference(target, prompt, out, penalties):
    """log p(out[k] | prompt + out[:k]) under SGLang's penalty rule (`sampling_check.penalised`: additive, then
    scaling) on the reference target."""
    import torch
    from sampling_check import penalised

    got = []
    for k in range(len(out)):
        with torch.no_grad():
            logits = target(torch.tensor([prompt + out[:k]])).logits[0, -1].float()
        got.append(torch.log_softmax(penalised(logits, out[:k], penalties), -1)[out[k]].item())
    return got


def test_repetition_with_additive_penalties_exact(servers, prompts, tiny_pair_models):
    """Repetition (scaling) together with frequency / presence (additive): the order matters, and SGLang
    0.5.23 without speculation has no fixed one: its overlapped scheduler adds then scales (one token late),
    its synchronous one applies its penalizers in the iteration order of a Python set of classes, which
    depends on where the classes sit in memory. We add then scale, as SGLang's speculative and overlap paths do,
    and check every logprob against that rule computed on the reference target."""
    dflash = servers[0]
    target, _ = tiny_pair_models
    penalties = {"frequency_penalty": 0.3, "presence_penalty": 0.2, "repetition_penalty": 1.3}
    for p in prompts[:1]:
        body = {"input_ids": p, "return_logprob": True,
                "sampling_params": {"max_new_tokens": 30, "temperature": 0, **penalties}}
        status, out = dflash.post("/generate", body)
        assert status == 200, out
        want = _penalised_reference(target, p, out["output_ids"], penalties)
        assert _values(out["meta_info"]["output_token_logprobs"]) == pytest.approx(want, abs=2e-4)
        assert out["meta_info"]["spec_num_correct_drafts"] > 0


def test_custom_logit_processor(servers, prompts):
    banned = [297, 271, 18]
    for p in prompts[:2]:
        body = {"input_ids": p, "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0,
                                                    "custom_params": {"token_ids": banned}},
                "custom_logit_processor": DisallowedTokensLogitsProcessor.to_str()}
        d, s = _both(servers, body)
        assert d["output_ids"] == s["output_ids"]
        assert not set(banned) & set(d["output_ids"])


def _values(rows):
    return [r[0] for r in rows]


def test_logprobs_equal_no_speculation(servers, prompts):
    """Output logprobs (with top-5 and asked-for ids) from the target's verify rows and input logprobs from the
    prefill, against the plain server: the same values to float rounding, one per completion token."""
    for p in prompts[:2]:
        body = {"input_ids": p, "return_logprob": True, "top_logprobs_num": 5, "token_ids_logprob": [5, 18, 297],
                "logprob_start_len": 3, "sampling_params": {"max_new_tokens": 24, "temperature": 0}}
        d, s = _both(servers, body)
        dm, sm = d["meta_info"], s["meta_info"]
        assert d["output_ids"] == s["output_ids"]
        assert len(dm["output_token_logprobs"]) == dm["completion_tokens"] == 24
        assert [r[1] for r in dm["output_token_logprobs"]] == d["output_ids"]
        assert _values(dm["output_token_logprobs"]) == pytest.approx(_values(sm["output_token_logprobs"]), abs=1e-4)
        assert len(dm["input_token_logprobs"]) == len(sm["input_token_logprobs"]) == len(p) - 3
        assert [r[1] for r in dm["input_token_logprobs"]] == [r[1] for r in sm["input_token_logprobs"]]
        for a, b in zip(dm["output_top_logprobs"], sm["output_top_logprobs"]):
            assert [r[1] for r in a] == [r[1] for r in b]
            assert _values(a) == pytest.approx(_values(b), abs=1e-4)
        for a, b in zip(dm["output_token_ids_logprobs"], sm["output_token_ids_logprobs"]):
            assert [r[1] for r in a] == [5, 18, 297]
            assert _values(a) == pytest.approx(_values(b), abs=1e-4)


def test_logprobs_with_penalties_are_the_penalised_distribution(servers, prompts):
    """Logprobs are of the distribution the token was chosen from: with a penalty, the penalised one."""
    body = {"input_ids": prompts[1], "return_logprob": True,
            "sampling_params": {"max_new_tokens": 32, "temperature": 0, "repetition_penalty": 1.5}}
    d, s = _both(servers, body)
    assert d["output_ids"] == s["output_ids"]
    assert _values(d["meta_info"]["output_token_logprobs"]) == pytest.approx(
        _values(s["meta_info"]["output_token_logprobs"]), abs=1e-4)


@pytest.mark.parametrize("name", list(GRAMMARS))
def test_constrained_decoding_equals_no_speculation(servers, prompts, name):
    """Per-position grammar masks along the drafted chain: the same text as without speculation, and for the
    JSON schema a valid object."""
    for i, p in enumerate(prompts[:2]):
        body = {"input_ids": p, "sampling_params": {"max_new_tokens": 48, "temperature": 0, **GRAMMARS[name]}}
        d, s = _both(servers, body)
        assert d["output_ids"] == s["output_ids"], f"{name}, prompt {i}"
        if name == "json_schema" and d["meta_info"]["finish_reason"]["type"] == "stop":
            obj = json.loads(d["text"])
            assert set(obj) == {"name", "n"} and isinstance(obj["n"], int)


def test_sampled_constrained_output_obeys_the_grammar(servers, prompts):
    """Sampling under a grammar: the drafts are redrawn from q restricted to what the grammar allows (the q
    acceptance then uses); every answer obeys the grammar and nothing follows its end."""
    import re

    dflash = servers[0]
    bodies = [{"input_ids": prompts[i % len(prompts)], "sampling_params": {
        "max_new_tokens": 48, "temperature": 1.0, **GRAMMARS["regex" if i % 2 else "json_schema"]}} for i in range(6)]
    accepted = 0
    for b, out in zip(bodies, _many(dflash, bodies)):
        accepted += out["meta_info"]["spec_num_correct_drafts"]
        if out["meta_info"]["finish_reason"]["type"] != "stop":
            continue
        if "regex" in b["sampling_params"]:
            assert re.fullmatch("(def|class) [a-z_]{1,20}\\(", out["text"]), out["text"]
        else:
            obj = json.loads(out["text"])
            assert set(obj) == {"name", "n"} and isinstance(obj["n"], int)
    assert accepted > 0


def test_sampled_grammar_matches_the_masked_target_distribution(servers, prompts, tiny_pair, tiny_pair_models):
    """Sampling under a regex (temperature 1, top-k 6): the joint of the first three tokens against the target's
    probabilities with xgrammar's mask applied at each point, chi-square. The second and third come from drafts
    redrawn from q restricted to the grammar and accepted by rejection sampling."""
    import torch
    import xgrammar as xgr
    from sampling_check import assert_joint
    from sglang_dflash.sampling import SamplingParams, probs_for
    from transformers import AutoTokenizer

    dflash = servers[0]
    target, _ = tiny_pair_models
    V, k, n, prompt = target.config.vocab_size, 3, 1200, prompts[2]
    tok = AutoTokenizer.from_pretrained(str(tiny_pair[0]))
    compiled = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, vocab_size=V)).compile_regex(
        GRAMMARS["regex"]["regex"])
    matcher, mask = xgr.GrammarMatcher(compiled), xgr.allocate_token_bitmask(1, V)
    params, joint = SamplingParams(temperature=1.0, top_k=6), {}

    def walk(prefix, prob):
        if len(prefix) == k:
            joint[tuple(prefix)] = prob
            return
        with torch.no_grad():
            logits = target(torch.tensor([prompt + prefix])).logits[0, -1:].float()
        matcher.fill_next_token_bitmask(mask, 0)
        xgr.apply_token_bitmask_inplace(logits, mask)
        p = probs_for(logits, params)[0]
        for t in p.nonzero().flatten().tolist():
            assert matcher.accept_token(t)
            walk(prefix + [t], prob * float(p[t]))
            matcher.rollback(1)

    walk([], 1.0)
    body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": k, "temperature": 1.0, "top_k": 6,
                                                     **GRAMMARS["regex"]}}
    outs = _many(dflash, [body] * n, concurrency=16)
    assert_joint(outs, joint, k)
    assert sum(o["meta_info"]["spec_num_correct_drafts"] for o in outs) > n // 10


def _flat_rows(hidden):
    """meta_info hidden_states: [prefill rows (a list of rows), then one row per decode token]."""
    rows = []
    for item in hidden:
        rows.extend(item if item and isinstance(item[0], list) else [item])
    return rows


def test_return_hidden_states_equal_no_speculation(servers, prompts):
    """The target's final hidden states: every prompt position from the prefill, then one row per output token
    after the first (the input that produced it), as without speculation; the drafter's captured layers are
    never returned."""
    import numpy as np

    for p in heldout_prompts()[10:11]:  # a prompt no other test sent: no prefix-cache hit, every prompt row returned
        body = {"input_ids": p, "return_hidden_states": True, "sampling_params": {"max_new_tokens": 24,
                                                                                  "temperature": 0}}
        d, s = _both(servers, body)
        assert d["output_ids"] == s["output_ids"]
        dh, sh = _flat_rows(d["meta_info"]["hidden_states"]), _flat_rows(s["meta_info"]["hidden_states"])
        assert len(dh) == len(sh) == len(p) + 24 - 1
        assert len(dh[0]) == len(sh[0])
        np.testing.assert_allclose(np.array(dh), np.array(sh), atol=1e-3, rtol=1e-3)


def test_overlap_scheduler_serves_the_same(servers):
    """SGLANG_ENABLE_DFLASH_SPEC_V2=1 (the scheduler's overlap branch; the worker calls SGLang's grammar barrier
    before its masks): penalties, logprobs, grammar and hidden states in flight together, each equal to SGLang
    without speculation."""
    _, plain, overlap = servers
    kinds = [dict(sampling_params=dict(frequency_penalty=0.8)), dict(sampling_params=dict(repetition_penalty=1.5)),
             dict(sampling_params=dict(min_new_tokens=30)), dict(sampling_params=GRAMMARS["regex"]),
             dict(sampling_params=GRAMMARS["json_schema"]), dict(return_logprob=True, top_logprobs_num=3),
             dict(return_hidden_states=True)]
    bodies = []
    for i, kind in enumerate(kinds):
        body = {"input_ids": heldout_prompts()[20 + i], **kind}
        body["sampling_params"] = {"max_new_tokens": 32, "temperature": 0, **kind.get("sampling_params", {})}
        bodies.append(body)
    got, wants = _many(overlap, bodies), _many(plain, bodies)
    assert "the scheduler overlaps steps" in overlap.log()
    for b, out, want in zip(bodies, got, wants):
        assert out["output_ids"] == want["output_ids"], b
        if b.get("return_logprob"):
            assert _values(out["meta_info"]["output_token_logprobs"]) == pytest.approx(
                _values(want["meta_info"]["output_token_logprobs"]), abs=1e-4)
        if b.get("return_hidden_states"):
            assert len(out["meta_info"]["hidden_states"]) == len(want["meta_info"]["hidden_states"])


def test_sampling_masks(servers, prompts):
    """return_sampling_mask (SGLang's own DFLASH refuses non-greedy requests without its CUDA kernel, and min_p
    everywhere): one mask per output token holding it, greedy masks the token alone, support logprobs a
    distribution; greedy masks equal SGLang without speculation."""
    import math

    params = [{"temperature": 0.0, "top_k": 1}, {"temperature": 1.0, "top_k": 10, "top_p": 0.95, "min_p": 0.02}] * 2
    body = {"input_ids": [prompts[0]] * 4, "return_sampling_mask": True,
            "sampling_logprobs_mode": ["selected", "selected", "support", "support"],
            "sampling_params": [{**p, "max_new_tokens": 12, "ignore_eos": True} for p in params]}
    d, s = _both(servers, body)
    for i, (out, plain) in enumerate(zip(d, s)):
        meta = out["meta_info"]
        masks, logprobs = meta["output_token_sampling_mask"], meta["output_token_sampling_logprobs"]
        assert len(masks) == len(logprobs) == len(out["output_ids"]) == 12
        for token, mask, lp in zip(out["output_ids"], masks, logprobs):
            assert token in mask and len(mask) <= 10
            if i >= 2:
                assert len(lp) == len(mask) and abs(sum(math.exp(v) for v in lp) - 1.0) < 1e-4
        if i % 2 == 0:
            assert out["output_ids"] == plain["output_ids"]
            assert masks == [[t] for t in out["output_ids"]]
