"""The reference speculative loop: a plain PyTorch + transformers oracle for every other path.

    python -m sglang_dflash.reference --target DIR --draft DIR --prompt-ids '[[1,2,3],[4,5]]' \
        --max-new-tokens N [--temperature T] [--top-k K] [--top-p P] [--min-p M] [--block-size B] [--seed S]

prints one JSON line per prompt: {"output_ids": [generated ids], "accept_lengths": [tokens per step]}.

Requests run one after another, each with its own KV caches and its own random generator (seeded
`seed + index`), so a request's result never depends on what it was batched with. One step:

    draft   block = [bonus, MASK x (n-1)] -> drafter -> target lm_head -> d1..d(n-1)
    verify  target forward on the block at positions L..L+n-1, keeping the features
    accept  the rule the worker uses, from `dflash_kernels` (greedy_accept.accept / sample_accept.reference)
            -> accept_len a, bonus
    commit  tokens d1..da, bonus (greedy_accept.committed_tokens; cut at max_new_tokens and after a stop
            token); target cache cropped to L+a+1; drafter context gains the features of the a+1
            committed block tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field

import torch
from dflash_kernels import greedy_accept, sample_accept

from .drafter import DFlashDrafter
from .families import recurrent_layers, text_config
from .sampling import SamplingParams, probs_for
from .target import default_stop_ids, load_target, target_features


@dataclass
class GenerationResult:
    output_ids: list[int]
    accept_lengths: list[int] = field(default_factory=list)  # tokens committed per decode step
    # drafts the target accepted per step, before the cut at max_new_tokens / a stop token (what SGLang's
    # spec_correct_drafts_histogram counts)
    accepted_drafts: list[int] = field(default_factory=list)


def _crop(cache, length: int) -> None:
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def _pick(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> torch.Tensor:
    """logits [n, V] -> one token per row [n]: argmax when greedy, else a sample of SGLang's p."""
    if params.greedy:
        return logits.argmax(dim=-1)
    return torch.multinomial(probs_for(logits, params), 1, generator=gen)[:, 0]


def _cut_at_stop(tokens: list[int], stop_ids: frozenset[int]) -> tuple[list[int], bool]:
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[: i + 1], True
    return tokens, False


def _new_cache(target):
    from transformers import DynamicCache

    return DynamicCache(config=target.config)


@torch.inference_mode()
def generate_one(
    target,
    drafter: DFlashDrafter | None,
    prompt_ids: list[int],
    max_new_tokens: int,
    params: SamplingParams,
    stop_ids: frozenset[int],
    block_size: int,
    gen: torch.Generator,
) -> GenerationResult:
    """One request. `drafter=None` (or block_size 1) is plain target-only decoding."""
    dev = target.device
    embed = target.get_input_embeddings()
    lm_head = target.get_output_embeddings()
    cfg = drafter.cfg if drafter is not None else None
    use_draft = drafter is not None and block_size >= 2
    cache = _new_cache(target)
    ids = torch.tensor([prompt_ids], device=dev)
    out = target(input_ids=ids, past_key_values=cache, use_cache=True, output_hidden_states=use_draft)
    first = int(_pick(out.logits[0, -1:], params, gen)[0])
    result = GenerationResult(output_ids=[first])
    if first in stop_ids or max_new_tokens <= 1:
        return result
    ctx_kv = None
    if use_draft:
        feats = target_features(out.hidden_states, cfg.target_layer_ids)
        ctx_pos = torch.arange(len(prompt_ids), device=dev)[None]
        ctx_kv = drafter.context_kv(drafter.project(feats), ctx_pos)
        mask_id = cfg.mask_token_id

    while len(result.output_ids) < max_new_tokens:
        start = len(prompt_ids) + len(result.output_ids) - 1  # position of the anchor (last bonus)
        n = block_size if use_draft else 1  # always a full block, as the SGLang worker does
        block = torch.full((1, n), mask_id if use_draft else 0, device=dev, dtype=torch.int64)
        block[0, 0] = result.output_ids[-1]
        positions = torch.arange(start, start + n, device=dev)[None]
        draft_probs = None
        if n > 1:  # draft
            hidden = drafter(embed(block), positions, ctx_kv)
            draft_logits = lm_head(hidden[0, 1:])  # [n-1, V]
            if params.greedy:
                block[0, 1:] = draft_logits.argmax(dim=-1)
            else:
                draft_probs = probs_for(draft_logits, params)
                block[0, 1:] = torch.multinomial(draft_probs, 1, generator=gen)[:, 0]
        # verify
        out = target(input_ids=block, position_ids=positions, past_key_values=cache, use_cache=True,
                     output_hidden_states=use_draft)
        logits = out.logits[0]  # [n, V]
        # accept
        if params.greedy:
            accept_len, bonus = greedy_accept.accept(block, logits.argmax(dim=-1)[None])
        else:
            uniforms = torch.rand((1, n - 1), generator=gen, device=dev)
            exponentials = torch.empty((1, logits.shape[-1]), device=dev).exponential_(generator=gen)
            q = draft_probs[None] if draft_probs is not None else logits.new_zeros(1, 0, logits.shape[-1])
            accept_len, bonus = sample_accept.reference(block, q, probs_for(logits, params)[None], uniforms,
                                                        exponentials)
        a = int(accept_len[0])
        # commit
        run = greedy_accept.committed_tokens(block[:, 1:], accept_len, bonus)[0, : a + 1]
        new, stopped = _cut_at_stop(run.tolist()[: max_new_tokens - len(result.output_ids)], stop_ids)
        result.output_ids += new
        result.accept_lengths.append(len(new))
        result.accepted_drafts.append(a)
        if stopped:
            break
        _crop(cache, start + a + 1)
        if use_draft:
            feats = target_features(out.hidden_states, cfg.target_layer_ids)[:, : a + 1]
            new_kv = drafter.context_kv(drafter.project(feats), positions[:, : a + 1])
            ctx_kv = [(torch.cat([k, nk], 1), torch.cat([v, nv], 1)) for (k, v), (nk, nv) in zip(ctx_kv, new_kv)]
    return result


def generate(
    target,
    drafter: DFlashDrafter | None,
    prompts: list[list[int]],
    max_new_tokens: int,
    params: SamplingParams = SamplingParams(),
    stop_ids: frozenset[int] | set[int] | list[int] = (),
    block_size: int | None = None,
    seed: int = 0,
) -> list[GenerationResult]:
    """Speculative generation for a batch of prompts (drafter=None: target only)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}, expected >= 1")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty, expected at least one token id")
    if block_size is None:
        block_size = drafter.cfg.block_size if drafter is not None else 1
    if drafter is not None and block_size < 2:
        raise ValueError(f"block_size={block_size}, expected >= 2 with a drafter")
    recurrent = recurrent_layers(text_config(target.config))
    if drafter is not None and recurrent is not None:  # transformers' cache keeps the state after the whole block
        raise NotImplementedError(f"the reference loop verifies a block through transformers' cache, which cannot "
                                  f"roll a recurrent state back to the accepted prefix; this target has {recurrent} "
                                  "(target-only decoding, drafter=None, is exact)")
    results = []
    for i, prompt in enumerate(prompts):
        gen = torch.Generator(device=target.device).manual_seed(seed + i)
        results.append(
            generate_one(target, drafter, prompt, max_new_tokens, params, frozenset(stop_ids), block_size, gen)
        )
    return results


def load_pair(target_dir, draft_dir, *, device="cpu", dtype=torch.float32, block_size=None):
    """-> (target, drafter), the drafter validated against the target's config."""
    target = load_target(target_dir, device=device, dtype=dtype)
    drafter = DFlashDrafter.from_pretrained(draft_dir, device=device, dtype=dtype, block_size=block_size)
    drafter.cfg.validate_against_target(target.config)
    return target, drafter


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sglang_dflash.reference", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, help="HF target model directory")
    ap.add_argument("--draft", required=True, help="z-lab DFlash drafter directory")
    ap.add_argument("--prompt-ids", required=True, help="JSON list of token-id lists")
    ap.add_argument("--max-new-tokens", type=int, required=True)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=-1)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--min-p", type=float, default=0.0)
    ap.add_argument("--block-size", type=int, default=None, help="default: the drafter's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stop-ids", default=None, help="JSON list of stop ids (default: the target's EOS ids)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)
    try:
        prompts = json.loads(args.prompt_ids)
        if not isinstance(prompts, list) or not all(
            isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompts
        ):
            raise ValueError
    except ValueError:
        ap.error(f"--prompt-ids={args.prompt_ids!r}: expected a JSON list of lists of token ids")
    params = SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p)
    target, drafter = load_pair(args.target, args.draft, device=args.device,
                                dtype=getattr(torch, args.dtype), block_size=args.block_size)
    vocab = target.config.vocab_size
    for p in prompts:
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            ap.error(f"--prompt-ids holds ids {bad[:5]} outside the target vocabulary [0, {vocab})")
    stop_ids = frozenset(json.loads(args.stop_ids)) if args.stop_ids else default_stop_ids(target)
    for r in generate(target, drafter, prompts, args.max_new_tokens, params, stop_ids, args.block_size, args.seed):
        print(json.dumps({"output_ids": r.output_ids, "accept_lengths": r.accept_lengths}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
