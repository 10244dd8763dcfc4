"""The end-to-end sampling check shared by the server tests: the joint distribution of the first two sampled
tokens from a server against the target's exact probabilities (temperature 1, top-k 6), chi-square."""

from __future__ import annotations

import torch
from sglang_dflash.sampling import SamplingParams, probs_for


def check_first_two_tokens(server, target, *, vocab: int = 8, prompt=(1, 2, 3), n: int = 1200) -> int:
    """Sample `n` requests of 3 tokens; assert no zero-probability pair and a chi-square p-value > 1e-3 against
    the target's joint p(t1) p(t2 | t1). -> drafts accepted in all (the caller decides if that is enough)."""
    from scipy.stats import chisquare

    prompt = list(prompt)
    params = SamplingParams(temperature=1.0, top_k=6)
    with torch.no_grad():
        p1 = probs_for(target(torch.tensor([prompt])).logits[0, -1:], params)[0]
        joint = torch.zeros(vocab, vocab)
        for a in range(vocab):
            if p1[a] > 0:
                joint[a] = p1[a] * probs_for(target(torch.tensor([prompt + [a]])).logits[0, -1:], params)[0]
    outs = server.generate_many([prompt] * n, 3, concurrency=16, temperature=1.0, top_k=6, ignore_eos=True)
    counts = torch.zeros(vocab, vocab)
    for o in outs:
        counts[o["output_ids"][0], o["output_ids"][1]] += 1
    assert counts.flatten()[joint.flatten() == 0].sum() == 0, "a token of probability 0 was sampled"
    keep = joint.flatten() > 1e-3
    obs = counts.flatten()[keep]
    exp = joint.flatten()[keep] / joint.flatten()[keep].sum() * obs.sum()
    assert chisquare(obs.numpy(), exp.numpy()).pvalue > 1e-3
    return sum(o["meta_info"]["spec_num_correct_drafts"] for o in outs)
