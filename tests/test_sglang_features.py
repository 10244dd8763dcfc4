"""Request features on a DFLASH server, each against SGLang without speculation on the same target:
penalties, min_new_tokens, logit_bias, custom logit processors, logprobs, constrained decoding.

The plain server runs with `--disable-overlap-schedule`: SGLang's overlapped scheduler (its CPU default without
speculation) counts penalties one token late (it reads `req.output_ids[-1]` before the previous step's token is
in it, and the last prompt token at the first step), so only the synchronous one gives the exact
non-speculative output that DFLASH must equal."""

from __future__ import annotations

import json

import pytest
from sglang.srt.sampling.custom_logit_processor import DisallowedTokensLogitsProcessor
from sglang_dflash.assets import heldout_prompts
from sglang_server import Server, start_all

N_PROMPTS = 4
MAX_NEW = 40


@pytest.fixture(scope="module")
def servers(tiny_pair):
    target, draft = tiny_pair
    extra = ("--enable-custom-logit-processor", "--enable-return-hidden-states")
    dflash = Server(target, draft, *extra)
    plain = Server(target, None, "--disable-overlap-schedule", *extra)
    start_all(dflash, plain)
    yield dflash, plain
    dflash.stop()
    plain.stop()


@pytest.fixture(scope="module")
def prompts():
    return heldout_prompts()[:N_PROMPTS]


def _both(servers, body):
    dflash, plain = servers
    outs = []
    for s in (dflash, plain):
        status, out = s.post("/generate", body)
        assert status == 200, out
        outs.append(out)
    return outs


PENALTIES = {
    "frequency": dict(frequency_penalty=0.8),
    "presence": dict(presence_penalty=1.2),
    "repetition": dict(repetition_penalty=1.5),
    "additive_together": dict(frequency_penalty=0.3, presence_penalty=0.2, min_new_tokens=10),
    "min_new_tokens": dict(min_new_tokens=30),
    "logit_bias": dict(logit_bias={"10": 3.0, "20": -100.0, "297": -2.5}),
}


@pytest.mark.parametrize("name", list(PENALTIES))
def test_greedy_with_penalties_equals_no_speculation(servers, prompts, name):
    """Token for token: row j of each block sees the drafts before it (SGLang's own DFLASH applies one
    per-request penalty to the whole block)."""
    accepted = 0
    for i, p in enumerate(prompts):
        body = {"input_ids": p, "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0, **PENALTIES[name]}}
        d, s = _both(servers, body)
        assert d["output_ids"] == s["output_ids"], f"{name}, prompt {i}"
        accepted += d["meta_info"]["spec_num_correct_drafts"]
    assert accepted > 0  # the blocks were not all rejected: in-block penalties were exercised


def _penalised_reference(target, prompt, out, f, pres, rep):
    """log p(out[k] | prompt + out[:k]) under SGLang's penalty rule, additive (frequency, presence) then scaling
    (repetition), on the reference target."""
    import torch

    got = []
    for k in range(len(out)):
        with torch.no_grad():
            logits = target(torch.tensor([prompt + out[:k]])).logits[0, -1].float()
        c = torch.zeros_like(logits)
        for t in out[:k]:
            c[t] += 1
        logits = logits - f * c - pres * (c > 0).float()
        scale = torch.where(c > 0, torch.tensor(rep), torch.tensor(1.0))
        logits = torch.where(logits < 0, logits * scale, logits / scale)
        got.append(torch.log_softmax(logits, -1)[out[k]].item())
    return got


def test_repetition_with_additive_penalties_exact(servers, prompts, tiny_pair_models):
    """Repetition (scaling) together with frequency / presence (additive): the order matters, and SGLang
    0.5.23 without speculation has no fixed one: its overlapped scheduler adds then scales (one token late),
    its synchronous one applies its penalizers in the iteration order of a Python set of classes, which
    depends on where the classes sit in memory. We add then scale, as SGLang's speculative and overlap paths do,
    and check every logprob against that rule computed on the reference target."""
    dflash, _ = servers
    target, _ = tiny_pair_models
    f, pres, rep = 0.3, 0.2, 1.3
    for p in prompts[:2]:
        body = {"input_ids": p, "return_logprob": True, "sampling_params": {
            "max_new_tokens": 30, "temperature": 0, "frequency_penalty": f, "presence_penalty": pres,
            "repetition_penalty": rep}}
        status, out = dflash.post("/generate", body)
        assert status == 200, out
        want = _penalised_reference(target, p, out["output_ids"], f, pres, rep)
        assert _values(out["meta_info"]["output_token_logprobs"]) == pytest.approx(want, abs=2e-4)
        assert out["meta_info"]["spec_num_correct_drafts"] > 0


def test_mixed_batch_each_request_its_own_rules(servers, prompts):
    """Requests with different rules and none, in flight together: each equals its own plain answer."""
    dflash, plain = servers
    kinds = [{}, *PENALTIES.values(), {"regex": "(def|class) [a-z_]+\\("}]
    bodies = [{"input_ids": prompts[i % len(prompts)],
               "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0, **kinds[i % len(kinds)]}}
              for i in range(16)]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda b: dflash.post("/generate", b), bodies))
    for i, (b, (status, out)) in enumerate(zip(bodies, got)):
        assert status == 200, out
        assert out["output_ids"] == plain.post("/generate", b)[1]["output_ids"], f"request {i}: {b['sampling_params']}"


def test_custom_logit_processor(servers, prompts):
    banned = [297, 271, 18]
    for p in prompts[:3]:
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
    for p in prompts[:4]:
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


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "n": {"type": "integer"}}, "required": ["name", "n"]}
GRAMMARS = {
    "regex": {"regex": "(def|class) [a-z_]{1,20}\\("},
    "json_schema": {"json_schema": json.dumps(SCHEMA)},
    "ebnf": {"ebnf": 'root ::= "def " name "(" name ")"\nname ::= [a-z_]+'},
}


@pytest.mark.parametrize("name", list(GRAMMARS))
def test_constrained_decoding_equals_no_speculation(servers, prompts, name):
    """Per-position grammar masks along the drafted chain: the same text as without speculation, and for the
    JSON schema a valid object."""
    for i, p in enumerate(prompts[:3]):
        body = {"input_ids": p, "sampling_params": {"max_new_tokens": 64, "temperature": 0, **GRAMMARS[name]}}
        d, s = _both(servers, body)
        assert d["output_ids"] == s["output_ids"], f"{name}, prompt {i}"
        if name == "json_schema" and d["meta_info"]["finish_reason"]["type"] == "stop":
            obj = json.loads(d["text"])
            assert set(obj) == {"name", "n"} and isinstance(obj["n"], int)


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

    for p in heldout_prompts()[10:12]:  # prompts no other test sent: no prefix-cache hit, every prompt row returned
        body = {"input_ids": p, "return_hidden_states": True, "sampling_params": {"max_new_tokens": 24,
                                                                                  "temperature": 0}}
        d, s = _both(servers, body)
        assert d["output_ids"] == s["output_ids"]
        dh, sh = _flat_rows(d["meta_info"]["hidden_states"]), _flat_rows(s["meta_info"]["hidden_states"])
        assert len(dh) == len(sh) == len(p) + 24 - 1
        assert len(dh[0]) == len(sh[0])
        np.testing.assert_allclose(np.array(dh), np.array(sh), atol=1e-3, rtol=1e-3)
