"""The end-to-end sampling check shared by the server tests: the joint distribution of the first sampled tokens
from a server against the target's exact probabilities (temperature 1, top-k 6, optionally with penalties),
chi-square."""

from __future__ import annotations

import itertools

import torch
from sglang_dflash.sampling import SamplingParams, probs_for


def penalised(logits, output, penalties=None, stop_ids=()):
    """SGLang's penalty rule at one sampling point, written out plainly (the oracle for `srt/logit_rules.py`):
    additive (frequency per occurrence, presence once, min_new_tokens holding back `stop_ids` while the output
    is shorter) then scaling (repetition), on the logits [..., V] of the token after `output`."""
    if not penalties:
        return logits
    c = torch.zeros_like(logits)
    for t in output:
        c[..., t] += 1
    x = logits - penalties.get("frequency_penalty", 0.0) * c - penalties.get("presence_penalty", 0.0) * (c > 0).float()
    if len(output) < penalties.get("min_new_tokens", 0):
        x[..., list(stop_ids)] = float("-inf")
    scale = torch.where(c > 0, torch.tensor(penalties.get("repetition_penalty", 1.0)), torch.tensor(1.0))
    return torch.where(x < 0, x * scale, x / scale)


def assert_joint(outs, joint: dict, k: int) -> None:
    """The first k tokens of the server's answers `outs` against the exact joint probabilities `joint`
    {sequence: p}: none outside its support, and chi-square p-value > 1e-3 (cells expected under 5 pooled)."""
    from scipy.stats import chisquare

    n, counts = len(outs), {}
    for o in outs:
        key = tuple(o["output_ids"][:k])
        assert key in joint, f"sampled {key}, a sequence of probability 0"
        counts[key] = counts.get(key, 0) + 1
    big = [c for c in joint if joint[c] * n >= 5]
    assert len(big) > 1, "too few likely sequences for the test to mean anything"
    obs = [counts.get(c, 0) for c in big] + [n - sum(counts.get(c, 0) for c in big)]
    exp = [joint[c] * n for c in big] + [n - sum(joint[c] * n for c in big)]
    if exp[-1] < 1e-9:
        obs, exp = obs[:-1], exp[:-1]
    assert chisquare(obs, exp).pvalue > 1e-3, list(itertools.islice(zip(big, obs, exp), 20))


def check_first_tokens(server, target, *, k: int = 2, vocab: int = 8, prompt=(1, 2, 3), n: int = 1200,
                       penalties: dict | None = None) -> int:
    """Sample `n` requests of k + 1 tokens; assert no zero-probability sequence and a chi-square p-value > 1e-3
    against the target's exact joint of the first k tokens (cells expected under 5 pooled). -> drafts accepted
    in all (the caller decides if that is enough)."""
    prompt = list(prompt)
    params = SamplingParams(temperature=1.0, top_k=6)
    joint = {}

    def walk(prefix, prob):
        if len(prefix) == k:
            joint[tuple(prefix)] = prob
            return
        with torch.no_grad():
            logits = target(torch.tensor([prompt + prefix])).logits[0, -1:]
        p = probs_for(penalised(logits, prefix, penalties), params)[0]
        for t in range(vocab):
            if p[t] > 0:
                walk(prefix + [t], prob * float(p[t]))

    walk([], 1.0)
    outs = server.generate_many([prompt] * n, k + 1, concurrency=16, temperature=1.0, top_k=6, ignore_eos=True,
                                **(penalties or {}))
    assert_joint(outs, joint, k)
    return sum(o["meta_info"]["spec_num_correct_drafts"] for o in outs)


def check_first_two_tokens(server, target, *, vocab: int = 8, prompt=(1, 2, 3), n: int = 1200) -> int:
    return check_first_tokens(server, target, k=2, vocab=vocab, prompt=prompt, n=n)
