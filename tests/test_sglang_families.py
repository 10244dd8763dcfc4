"""Two more target families through the DFLASH worker on CPU: a Llama with llama3 rope scaling (every rotary
frequency but the fastest rescaled) and a Qwen3-MoE (4 experts, top 2 renormalised, every layer sparse).

Each family is a tiny random target (vocabulary 64, 3 layers, GQA 2) and a drafter (mask token 63, target layers
0 and 1) served by one DFLASH server with a fixed verify width (SGLANG_DFLASH_ADAPTIVE=0: every step verifies the
full block, as the reference loop does). Both servers run without a tokenizer and start together.

How these tests can fail, and why a failure is a bug rather than noise:
- The targets are random but not degenerate: an untied lm_head and weights of std 0.3, so attention, the rotary
  embedding and the experts shape every token (with the tied, sharpened embeddings of conftest.make_target a
  target only repeats the last prompt token, whatever its attention computes). test_the_checks_can_fail shows
  that a server misreading the family's config (no llama3 rescaling; top-1 routing or no top-k renormalisation)
  would produce different greedy text, and that no greedy choice along the reference text is a near tie
  (top-2 logit gap, and for the MoE the gap between the 2nd and 3rd expert's router logit).
- The drafter is trained for a few seconds on the reference continuations of the very prompts served (a random
  one is practically never accepted, and acceptance then compares nothing). Its acceptance spans "none" to "the
  whole block", so a wrong capture of the target's hidden states, a wrong drafter context or a wrong acceptance
  shows up in the per-request acceptance, even where the output (always the target's) stays right.
SGLang reports per request the number of verify steps and a histogram of drafts kept per step, not the steps in
order; those two, beside the output, are compared with the reference loop's steps."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from conftest import make_drafter, train_drafter
from sglang_dflash.reference import generate
from sglang_dflash.server import start_all
from sglang_server import Server

MAX_NEW = 24
PROMPTS = [[(7 * i + 3 * j) % 60 + 2 for j in range(3 + (i * 5) % 29)] for i in range(12)]
FIXED = {"SGLANG_DFLASH_ADAPTIVE": "0"}  # the full block every step, so acceptance matches the reference loop's
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
MIN_LOGIT_GAP = 1e-3  # far above float32 differences between SGLang's CPU kernels and transformers' (~1e-6)
COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0,
              tie_word_embeddings=False, initializer_range=0.3, eos_token_id=None, bos_token_id=None,
              pad_token_id=None)


def _llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**{**COMMON, "rope_scaling": dict(LLAMA3), **overrides}))


def _qwen3_moe(**overrides):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**{
        **COMMON, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "norm_topk_prob": True,
        "decoder_sparse_step": 1, "mlp_only_layers": [], **overrides}))


@dataclass(frozen=True)
class Family:
    build: Callable[..., torch.nn.Module]  # config overrides -> an untrained target
    seed: int  # chosen for the widest top-2 logit gap along the reference text
    embed_scale: float  # the embedding sharpened (conftest.make_target's x20 makes these targets repeat a token)
    block_size: int  # the drafter's
    train_steps: int  # the drafter's: enough for acceptance from none to the whole block
    near_misses: dict[str, dict]  # what a server misreading the family's config would compute instead


FAMILIES = {
    "llama3_rope": Family(_llama, 1, 1.0, 4, 40, {"plain rope": dict(rope_scaling=None)}),
    "qwen3_moe": Family(_qwen3_moe, 5, 5.0, 8, 80, {"top-1 routing": dict(num_experts_per_tok=1),
                                                    "no top-k renormalisation": dict(norm_topk_prob=False)}),
}


def _target(family: Family, **overrides):
    torch.manual_seed(family.seed)
    model = family.build(**overrides).float().eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(family.embed_scale)
    return model


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """name -> (target, drafter, target-only reference, reference with the drafter, directory of target/ and
    draft/)."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for name, family in FAMILIES.items():
        target = _target(family)
        plain = generate(target, None, PROMPTS, MAX_NEW)
        # target layer ids ascending: SGLang hands the drafter the captured layers in layer order, whatever the
        # order in the drafter's config, while the reference loop concatenates them in config order
        drafter = make_drafter(target, layers=1, block_size=family.block_size, layer_ids=(0, 1), mask_token_id=63,
                               seed=family.seed)
        train_drafter(target, drafter, PROMPTS, [r.output_ids for r in plain], family.train_steps)
        target.save_pretrained(root / name / "target")
        drafter.save_pretrained(root / name / "draft")
        out[name] = (target, drafter, plain, generate(target, drafter, PROMPTS, MAX_NEW), root / name)
    return out


@pytest.fixture(scope="module")
def servers(families):
    started = {name: Server(d / "target", d / "draft", "--skip-tokenizer-init", "--max-total-tokens", "4096", env=FIXED)
               for name, (*_, d) in families.items()}
    start_all(*started.values())
    yield started
    for s in started.values():
        s.stop()


@torch.no_grad()
def _min_gaps(target, results) -> tuple[float, float]:
    """-> (smallest top-2 logit gap, smallest 2nd-to-3rd router logit gap (inf without experts)) over the
    target's forward on every prompt + its reference text."""
    router = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: router.append(o[0]))
             for n, m in target.named_modules() if n.endswith("mlp.gate")]
    logit_gap = float("inf")
    try:
        for p, r in zip(PROMPTS, results):
            logits = target(torch.tensor([p + r.output_ids])).logits[0, len(p) - 1 : -1]
            top = logits.topk(2, dim=-1).values
            logit_gap = min(logit_gap, float((top[:, 0] - top[:, 1]).min()))
    finally:
        for h in hooks:
            h.remove()
    router_gap = min((float((t[:, 1] - t[:, 2]).min()) for t in (x.topk(3, dim=-1).values for x in router)),
                     default=float("inf"))
    return logit_gap, router_gap


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_checks_can_fail(families, name):
    family = FAMILIES[name]
    target, _, plain, with_drafter, _ = families[name]
    assert all(len(set(r.output_ids)) >= 4 for r in plain), "degenerate target: repeats a few tokens"
    for what, change in family.near_misses.items():
        near = _target(family, **change)
        near.load_state_dict(target.state_dict())
        differ = sum(a.output_ids != b.output_ids for a, b in zip(generate(near, None, PROMPTS, MAX_NEW), plain))
        assert differ >= len(PROMPTS) // 2, f"{what}: only {differ} prompts decode differently"
    logit_gap, router_gap = _min_gaps(target, plain)
    assert logit_gap > MIN_LOGIT_GAP and router_gap > MIN_LOGIT_GAP / 10, (logit_gap, router_gap)
    # the drafter is accepted sometimes, not always: several acceptance lengths, from none to half the block or more
    kept = Counter(a for r in with_drafter for a in r.accepted_drafts)
    assert len(kept) >= 3 and kept[0] > 0 and max(kept) >= family.block_size // 2, kept


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("concurrency", [1, 8])
def test_greedy_equals_target_only(families, servers, name, concurrency):
    plain = families[name][2]
    got = servers[name].generate_many(PROMPTS, MAX_NEW, concurrency=concurrency, ignore_eos=True)
    for i, (g, w) in enumerate(zip(got, plain)):
        assert g["output_ids"] == w.output_ids, f"{name} prompt {i}"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_acceptance_equals_reference_loop(families, servers, name):
    """One request at a time: per request, the output, the number of verify steps and the drafts kept per step
    (as a histogram) equal the reference loop's with the same drafter."""
    with_drafter = families[name][3]
    log = servers[name].log()
    assert "DFLASH worker active" in log and "verify widths fixed" in log, log[-3000:]  # ours, the full block
    got = servers[name].generate_many(PROMPTS, MAX_NEW, concurrency=1, ignore_eos=True)
    for i, (g, r) in enumerate(zip(got, with_drafter)):
        assert g["output_ids"] == r.output_ids, f"{name} prompt {i}"
        meta = g["meta_info"]
        assert meta["spec_verify_ct"] == len(r.accepted_drafts), f"{name} prompt {i}"
        hist = meta["spec_correct_drafts_histogram"]
        assert Counter({k: v for k, v in enumerate(hist) if v}) == Counter(r.accepted_drafts), f"{name} prompt {i}"
