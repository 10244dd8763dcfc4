"""The stages of one SGLang decode step, as functions of tensors and SGLang's batch objects.

    block_layout -> propose (draft tokens) -> verify_ids -> accept (tokens to commit, new lengths)
    ContextWriter: target hidden states -> drafter K/V (after prefill and after each accept)

Shapes: `bs` requests, `B` block size, `V` vocab, `H` hidden, `K*H` concatenated target features.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import dflash_kernels
import torch

from ..sampling import processed_probs

logger = logging.getLogger("sglang_dflash")


class BlockLayout(NamedTuple):
    ids: torch.Tensor  # [bs, B] int64: [bonus, MASK, ..., MASK]
    positions: torch.Tensor  # [bs, B] int64: L_i + j
    slots: torch.Tensor  # [bs, B] int64: KV slot ids req_to_token[row_i, L_i + j]


class StepBuffers:
    """A step's block scratch, allocated once for the most requests SGLang can run at a time (its
    req_to_token rows) and sliced per step: block ids, positions and the verify ids. Not pooled: what
    SGLang may keep past the step: the outputs (the scheduler reads them while the next step runs under
    overlap scheduling) and the block's KV slots (they become `batch.out_cache_loc`, which SGLang 0.5.23
    hands to a unified-memory allocator as this forward's write set). CUDA graphs need none of this:
    SGLang's graph runners copy inputs into their own static buffers at replay."""

    def __init__(self, max_requests: int, B: int, device) -> None:
        new = lambda: torch.empty((max_requests, B), dtype=torch.int64, device=device)  # noqa: E731
        self.max_requests = max_requests
        self.ids, self.positions, self.verify_ids = new(), new(), new()

    def block(self, bs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, positions, slots) for `bs` requests; slots freshly allocated (see above)."""
        if bs > self.max_requests:
            raise ValueError(f"sglang-dflash: batch of {bs} requests, step buffers sized for {self.max_requests}")
        return self.ids[:bs], self.positions[:bs], torch.empty_like(self.positions[:bs])


def block_layout(batch, bonus: torch.Tensor, mask_id: int, B: int, buffers: StepBuffers) -> BlockLayout:
    """The next block of every request (kernel `block_prep`), written into the step buffers."""
    prep = dflash_kernels.get("block_prep", bonus.device)
    return BlockLayout(*prep(bonus, batch.seq_lens, batch.req_pool_indices, batch.req_to_token_pool.req_to_token,
                             mask_id, B, out=buffers.block(bonus.shape[0])))


def verify_ids(block: BlockLayout, drafts: torch.Tensor, buffers: StepBuffers) -> torch.Tensor:
    """[anchor, d_1 .. d_(B-1)] per request: the tokens the target verifies [bs, B]."""
    out = buffers.verify_ids[: drafts.shape[0]]
    out[:, :1] = block.ids[:, :1]
    out[:, 1:] = drafts
    return out


def extend_positions(batch) -> torch.Tensor:
    """Absolute positions [num_tokens] of the tokens an extend batch computes (prefix hits skipped)."""
    dev = batch.seq_lens.device
    return torch.cat([torch.arange(p, p + n, device=dev) for p, n in zip(batch.prefix_lens, batch.extend_lens)])


class ContextWriter:
    """target_hidden [n, K*H] at positions [n] -> every drafter layer's context K/V, written into the drafter's
    pool at the target's slot ids [n].

    Fast path (kernel `context_kv`): fc + hidden_norm, ONE matmul for all layers' K/V, then k_norm + RoPE +
    the scatter into every layer's pool in one launch. Pools the kernel cannot address (quantized or
    non-[slots, heads, dim] layouts) take the per-layer path through SGLang's `set_kv_buffer`."""

    CHUNK_ROWS = 2048

    def __init__(self, drafter, draft_runner) -> None:
        self.drafter = drafter
        self.draft_runner = draft_runner  # its KV pool is attached after the worker is built: read it per call
        self.kernel = dflash_kernels.get("context_kv", draft_runner.device)
        self._pools = None
        self._fast: bool | None = None

    @property
    def pool(self):
        return self.draft_runner.token_to_kv_pool

    @property
    def fast(self) -> bool:
        """Whether the kernel can address the pool; decided, and its address table built, on first use (the
        pool exists by then; SGLang 0.5.23 allocates its tensors once and never replaces them)."""
        if self._fast is None:
            cfg = self.drafter.cfg
            self._pools = self._kernel_pools(self.pool, cfg.num_hidden_layers, (cfg.num_key_value_heads, cfg.head_dim))
            self._fast = self._pools is not None
            logger.info("sglang-dflash: context K/V %s (drafter KV pool %s)",
                        "stacked, kernel context_kv" if self._fast else "per layer", type(self.pool).__name__)
        return self._fast

    @staticmethod
    def _kernel_pools(pool, num_layers: int, heads_dim: tuple[int, int]):
        """The kernel's address table for a plain per-layer [slots, kv_heads, head_dim] pool in the model's
        dtype with the drafter's own head shape (the kernel takes the row layout from the drafter's
        config); None for any other pool."""
        from dflash_kernels.context_kv import layer_pools

        k, v = getattr(pool, "k_buffer", None), getattr(pool, "v_buffer", None)
        if not isinstance(k, list) or not isinstance(v, list) or len(k) != num_layers or len(v) != num_layers:
            return None
        if tuple(k[0].shape[1:]) != heads_dim:
            return None
        if getattr(pool, "is_quantized_kv_cache", False) or getattr(pool, "store_dtype", None) != pool.dtype:
            return None
        try:
            return layer_pools(k, v)
        except ValueError:
            return None

    def __call__(self, target_hidden: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> None:
        drafter = self.drafter
        context = drafter.project(target_hidden)
        if not self.fast:
            from sglang.srt.mem_cache.memory_pool import KVWriteLoc

            for attn, (k, v) in zip(drafter.attn, drafter.context_kv(context, positions)):
                self.pool.set_kv_buffer(attn, KVWriteLoc(slots, physical=True), k, v)
            return
        cfg = drafter.cfg
        w, b, k_norm = drafter.stacked_kv()
        pools, inv_freq = self._pools, drafter.drafter.rotary.inv_freq
        # in chunks of rows: the stacked K/V of a long prefill chunk would otherwise be one large temporary
        # (8192 rows x 5 layers x 2 x 8 x 128 in bf16 = 168 MB) on top of a KV pool sized to fill memory
        for start in range(0, context.shape[0], self.CHUNK_ROWS):
            rows = slice(start, start + self.CHUNK_ROWS)
            kv = torch.nn.functional.linear(context[rows], w, b)
            kv = kv.view(-1, cfg.num_hidden_layers, 2, cfg.num_key_value_heads, cfg.head_dim)
            self.kernel(kv, k_norm, cfg.rms_norm_eps, positions[rows], inv_freq, slots[rows], pools)


def _sampling_tensors(sampling_info, rows: int, vocab: int):
    """Per-request (temperature, top_k, top_p, min_p) repeated for `rows` rows per request."""
    rep = lambda t: t.reshape(-1).repeat_interleave(rows)  # noqa: E731
    top_k = sampling_info.top_ks.long().clamp(max=vocab)
    return rep(sampling_info.temperatures), rep(top_k), rep(sampling_info.top_ps), rep(sampling_info.min_ps)


def propose(draft_logits: torch.Tensor, sampling_info) -> tuple[torch.Tensor, torch.Tensor | None]:
    """draft_logits [bs, B-1, V] -> drafts [bs, B-1] int64 and q [bs, B-1, V] (None when all greedy).

    Sampling requests draw each draft from the drafter's own distribution, processed with the request's
    temperature / top-k / top-p / min-p, so acceptance can use the real q (not a point mass)."""
    if sampling_info.is_all_greedy:
        return draft_logits.argmax(dim=-1), None
    bs, n, V = draft_logits.shape
    q = processed_probs(draft_logits.reshape(bs * n, V), *_sampling_tensors(sampling_info, n, V))
    drafts = torch.multinomial(q, 1)[:, 0].view(bs, n)
    return drafts, q.view(bs, n, V)


class Accepted(NamedTuple):
    accept_len: torch.Tensor  # [bs] int64: drafts kept, 0..B-1
    bonus: torch.Tensor  # [bs] int64
    tokens: torch.Tensor  # [bs, B] int64: d1..d_a, bonus, then padding (the scheduler reads a+1)
    new_seq_lens: torch.Tensor  # [bs] int64: L + a + 1


def accept(verify_ids: torch.Tensor, logits: torch.Tensor, draft_probs: torch.Tensor | None, seq_lens: torch.Tensor,
           sampling_info) -> Accepted:
    """verify_ids [bs, B], target logits [bs, B, V] -> what the step commits."""
    if draft_probs is None:  # all greedy: kernel `greedy_accept`
        greedy = dflash_kernels.get("greedy_accept", logits.device)
        return Accepted(*greedy(verify_ids, logits.argmax(dim=-1), seq_lens))
    bs, B, V = logits.shape
    p = processed_probs(logits.reshape(bs * B, V), *_sampling_tensors(sampling_info, B, V)).view(bs, B, V)
    uniforms = torch.rand(bs, B - 1, device=logits.device)
    exponentials = torch.empty(bs, V, device=logits.device).exponential_()
    sample = dflash_kernels.get("sample_accept", logits.device)  # rejection sampling with the real q
    accept_len, bonus = sample(verify_ids, draft_probs, p, uniforms, exponentials)
    tokens = committed_tokens(verify_ids[:, 1:], accept_len, bonus)
    return Accepted(accept_len, bonus, tokens, seq_lens.long() + accept_len + 1)


def committed_tokens(drafts: torch.Tensor, accept_len: torch.Tensor, bonus: torch.Tensor) -> torch.Tensor:
    """-> [bs, B]: row i = d1..d_a, bonus, then padding; the scheduler reads the first a+1 entries."""
    out = torch.cat([drafts, torch.zeros_like(drafts[:, :1])], dim=1)
    return out.scatter(1, accept_len[:, None], bonus[:, None])


def check_config(draft_hf_config, target_hf_config, block_size: int) -> None:
    """Refuse to start on a drafter that does not fit the target; each error names the bad value."""
    from ..config import DFlashConfig

    cfg = DFlashConfig.from_dict(draft_hf_config.to_dict(), block_size=block_size)
    cfg.validate_against_target(target_hf_config)
    n_layers = target_hf_config.num_hidden_layers
    last = max(cfg.target_layer_ids)
    if last >= n_layers - 1:
        raise ValueError(
            f"DFlash drafter: target_layer_ids={list(cfg.target_layer_ids)} holds {last}, the target's last layer; "
            f"SGLang captures a layer's output as the next layer's input, so ids must be < {n_layers - 1}"
        )


def check_target(target_model) -> None:
    if not hasattr(target_model, "set_dflash_layers_to_capture"):
        raise ValueError(
            f"DFlash: target model class {type(target_model).__name__} cannot capture hidden states "
            "(it has no set_dflash_layers_to_capture); use a target such as Qwen3 or Llama"
        )
