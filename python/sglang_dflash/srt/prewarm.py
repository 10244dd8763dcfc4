"""The start-up rehearsal of a sampled step, which reserves its memory peak beside SGLang's KV pool.

SGLang sizes its KV pool from the memory free after start-up, less the headroom a sampler reports
(`ModelRunner.prewarm_sampling`). A sampled DFLASH step makes larger temporaries than SGLang's sampler (the
full-vocabulary sort over q for bs*(B-1) rows and p for bs*B rows), so on a GPU the worker rehearses that step
at the largest batch it can see and reports the measured peak, as SGLang's own DFLASH does. Not a step: its
host syncs are start-up only.
"""

from __future__ import annotations

import logging
import types

import torch

from . import stages

logger = logging.getLogger("sglang_dflash")


def rehearse_sampled_step(bs: int, k: int, vocab: int, device) -> stages.Accepted:
    """One sampled step's distributions and acceptance at batch `bs` and width k on zero logits, with top-p 0.95
    in every request: the full-vocabulary sort, the largest temporaries a step makes (q over bs*(k-1) rows, p over
    bs*k rows). The worker runs it at k = B (the block size)."""
    full = lambda value, dtype=torch.float32: torch.full((bs,), value, dtype=dtype, device=device)  # noqa: E731
    info = types.SimpleNamespace(is_all_greedy=False, temperatures=full(1.0)[:, None], top_ks=full(vocab, torch.int32),
                                 top_ps=full(0.95), min_ps=full(0.0), need_top_k_sampling=False,
                                 need_top_p_sampling=True, need_min_p_sampling=False, max_top_k=None)
    proposal = stages.propose(torch.zeros(bs, k - 1, vocab, device=device), info)
    verify = torch.cat([torch.zeros(bs, 1, dtype=torch.int64, device=device), proposal.drafts], dim=1)
    logits = torch.zeros(bs, k, vocab, device=device)
    return stages.accept(verify, logits, proposal.q, torch.zeros(bs, dtype=torch.int64, device=device), info)


def prewarm_sampling(runner, block_size: int, device):
    """SGLang's own prewarm on the target's runner, then, on a GPU, the rehearsal's peak (measured at the largest
    batch the runner can decode) reported as headroom SGLang's KV sizing keeps free when it does not serve such
    temporaries from graph storage. Elsewhere (CPU) nothing more is reserved, as SGLang's default."""
    from .sglang_api import SamplingPrewarmResult

    result = runner.prewarm_sampling()
    if not str(device).startswith("cuda"):
        return result
    B, vocab = block_size, runner.model_config.vocab_size
    bs = runner.max_decode_logits_rows() // B
    if runner.max_running_requests is not None:
        bs = min(bs, int(runner.max_running_requests))  # host: a server argument
    bs = max(1, bs)
    rehearse_sampled_step(bs, B, vocab, device)  # once, so cached workspaces are off the peak
    torch.cuda.synchronize()  # sync: start-up rehearsal, not a step
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_stats()["allocated_bytes.all.current"]
    rehearse_sampled_step(bs, B, vocab, device)
    torch.cuda.synchronize()  # sync: start-up rehearsal, not a step
    peak = torch.cuda.memory_stats()["allocated_bytes.all.peak"] - base
    inputs = (2 * B - 1) * bs * vocab * 4  # the float32 logits the rehearsal itself allocates
    result = SamplingPrewarmResult(sampling_input_bytes=inputs, sampling_headroom_bytes=peak + inputs)
    runner.sampling_prewarm_result = result
    logger.info("sglang-dflash: sampled-step rehearsal at batch %d: peak %.1f MiB kept free beside the KV pool",
                bs, result.sampling_headroom_bytes / 2**20)
    return result
