"""The reference loop: lossless against target-only decoding, stop handling, CLI contract."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import make_drafter, make_target
from sglang_dflash.reference import generate
from sglang_dflash.sampling import SamplingParams

PROMPTS_3 = [[5, 9, 2, 11, 3], [7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]


@pytest.mark.parametrize("heads,kv_heads,draft_layers,B,batch", [
    (4, 2, 1, 2, 1), (4, 4, 2, 4, 3), (4, 1, 3, 8, 3), (4, 2, 2, 16, 1), (4, 2, 1, 16, 3),
])
def test_greedy_equals_target_only(heads, kv_heads, draft_layers, B, batch):
    target = make_target(heads=heads, kv_heads=kv_heads, seed=B)
    drafter = make_drafter(target, layers=draft_layers, block_size=B, layer_ids=(0, 2), seed=B + 1)
    prompts = PROMPTS_3[:batch]
    want = generate(target, None, prompts, 40)
    got = generate(target, drafter, prompts, 40)
    for w, g in zip(want, got):
        assert g.output_ids == w.output_ids
        assert len(g.output_ids) == 40 and sum(g.accept_lengths) == 39  # the first token is the prefill's
        assert all(1 <= a <= B for a in g.accept_lengths)


def test_max_new_tokens_never_exceeded(tiny_pair_models):
    target, drafter = tiny_pair_models
    prompt = [[10, 20, 30, 40, 50, 60]]
    for n in (1, 2, 3, 7, 16, 17, 33):
        r = generate(target, drafter, prompt, n)[0]
        assert len(r.output_ids) == n
        assert r.output_ids == generate(target, None, prompt, n)[0].output_ids


def test_stop_token_inside_accepted_run(tiny_pair_models):
    """Pick a token committed in the middle of a multi-token run; with it as a stop id the output ends
    right after its first occurrence, still equal to target-only decoding with the same stop id."""
    from sglang_dflash.assets import heldout_prompts

    target, drafter = tiny_pair_models
    found = None
    for prompt in heldout_prompts()[:20]:
        r = generate(target, drafter, [prompt], 48)[0]
        pos = 1
        for a in r.accept_lengths:
            if a >= 3:
                cand = r.output_ids[pos + 1]  # second token of a run of >= 3
                if cand not in r.output_ids[: pos + 1]:
                    found = (prompt, cand, pos + 1)
                    break
            pos += a
        if found:
            break
    assert found, "no multi-token accepted run in 20 held-out prompts"
    prompt, stop, index = found
    r = generate(target, drafter, [prompt], 48, stop_ids={stop})[0]
    assert r.output_ids[-1] == stop and len(r.output_ids) == index + 1
    assert r.output_ids == generate(target, None, [prompt], 48, stop_ids={stop})[0].output_ids
    assert sum(r.accept_lengths) + 1 == len(r.output_ids)


def test_stop_on_first_token():
    target = make_target()
    first = generate(target, None, [[3, 4]], 5)[0].output_ids[0]
    drafter = make_drafter(target)
    r = generate(target, drafter, [[3, 4]], 5, stop_ids={first})[0]
    assert r.output_ids == [first] and r.accept_lengths == []


def test_bad_arguments():
    target = make_target()
    drafter = make_drafter(target)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        generate(target, drafter, [[1]], 0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(target, drafter, [[1], []], 3)
    with pytest.raises(ValueError, match="block_size=1"):
        generate(target, drafter, [[1]], 3, block_size=1)
    with pytest.raises(ValueError, match="temperature=-1"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p=0"):
        SamplingParams(temperature=1, top_p=0)


def test_sampling_matches_target_only_distribution():
    """Joint distribution of the first two generated tokens: speculative sampling (real q) against the
    exact target probabilities, enumerated. Tiny vocabulary, many seeds, chi-square."""
    from scipy.stats import chisquare

    V = 8
    target = make_target(vocab=V, seed=5)
    with torch.no_grad():
        target.get_input_embeddings().weight.div_(10)  # flatter: several likely tokens per step
    drafter = make_drafter(target, block_size=4, mask_token_id=V - 1, seed=6)
    params = SamplingParams(temperature=1.0, top_k=6)
    prompt = [1, 2, 3]
    from sglang_dflash.sampling import probs_for

    with torch.no_grad():
        p1 = probs_for(target(torch.tensor([prompt])).logits[0, -1:], params)[0]
        joint = torch.zeros(V, V)
        for a in range(V):
            if p1[a] > 0:
                p2 = probs_for(target(torch.tensor([prompt + [a]])).logits[0, -1:], params)[0]
                joint[a] = p1[a] * p2
    n = 2500
    results = generate(target, drafter, [prompt] * n, 3, params, seed=0)
    counts = torch.zeros(V, V)
    accepted_any = 0
    for r in results:
        counts[r.output_ids[0], r.output_ids[1]] += 1
        accepted_any += r.accept_lengths[0] > 1
    assert accepted_any > n // 10, "drafts were almost never accepted: the test would not exercise acceptance"
    keep = joint.flatten() > 1e-3
    assert counts.flatten()[joint.flatten() == 0].sum() == 0
    obs = counts.flatten()[keep]
    exp = joint.flatten()[keep] / joint.flatten()[keep].sum() * obs.sum()
    assert chisquare(obs.numpy(), exp.numpy()).pvalue > 1e-3


def test_cli_contract(tmp_path):
    target = make_target()
    drafter = make_drafter(target, block_size=4)
    target.save_pretrained(tmp_path / "t")
    drafter.save_pretrained(tmp_path / "d")
    cmd = [sys.executable, "-m", "sglang_dflash.reference", "--target", str(tmp_path / "t"), "--draft",
           str(tmp_path / "d"), "--prompt-ids", json.dumps(PROMPTS_3[:2]), "--max-new-tokens", "9"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()
    rows = [json.loads(line) for line in out]
    assert len(rows) == 2 and set(rows[0]) == {"output_ids", "accept_lengths"}
    assert rows[0]["output_ids"] == generate(target, None, PROMPTS_3[:1], 9)[0].output_ids
    sampled = subprocess.run(cmd + ["--temperature", "0.8", "--seed", "3"], capture_output=True, text=True, check=True)
    assert len(json.loads(sampled.stdout.splitlines()[0])["output_ids"]) == 9
    bad = subprocess.run(cmd[:-4] + ["--prompt-ids", "[1,2]", "--max-new-tokens", "3"], capture_output=True, text=True)
    assert bad.returncode != 0 and "expected a JSON list of lists" in bad.stderr
