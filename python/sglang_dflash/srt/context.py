"""Target hidden states -> drafter context K/V, written into the drafter's KV pool (after prefill and
after each accept).

    target_hidden [n, K*H] --fc + hidden_norm--> context [n, H] --k/v_proj, k_norm, RoPE--> every drafter
    layer's K/V at the target's slot ids [n]

Shapes: `n` tokens, `K*H` concatenated target features, `H` hidden.
"""

from __future__ import annotations

import logging

import dflash_kernels
import torch

logger = logging.getLogger("sglang_dflash")


class ContextWriter:
    """target_hidden [n, K*H] at positions [n] -> every drafter layer's context K/V, written into the drafter's
    pool at the target's slot ids [n]. Under tensor parallelism each rank writes its own KV heads into its own
    pool (`target_hidden` and the replicated `fc` are whole on every rank; k_proj / v_proj are the rank's shards).

    Fast path (kernel `context_kv`): fc + hidden_norm, ONE matmul for all layers' K/V, then k_norm + RoPE +
    the scatter into every layer's pool in one launch. Pools the kernel cannot address (quantized or
    non-[slots, heads, dim] layouts) take the per-layer path through SGLang's `set_kv_buffer`."""

    CHUNK_ROWS = 2048

    def __init__(self, draft_model, draft_runner) -> None:
        self.draft_model = draft_model  # srt.models.draft_model.DFlashDraftModel
        self.draft_runner = draft_runner  # its KV pool is attached after the worker is built: read it per call
        self.kernel = dflash_kernels.get("context_kv", draft_runner.device, head_dim=draft_model.cfg.head_dim)
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
            cfg = self.draft_model.cfg
            heads_dim = (self.draft_model.num_local_kv_heads, cfg.head_dim)  # this rank's KV heads under TP
            self._pools = self._kernel_pools(self.pool, cfg.num_hidden_layers, heads_dim)
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
        model = self.draft_model
        context = model.project(target_hidden)
        if not self.fast:
            from .sglang_api import KVWriteLoc

            for attn, (k, v) in zip(model.attn, model.context_kv(context, positions)):
                self.pool.set_kv_buffer(attn, KVWriteLoc(slots, physical=True), k, v)
            return
        cfg = model.cfg
        w, b, k_norm = model.stacked_kv()
        pools, inv_freq = self._pools, model.drafter.rotary.inv_freq
        # in chunks of rows: the stacked K/V of a long prefill chunk would otherwise be one large temporary
        # (8192 rows x 5 layers x 2 x 8 x 128 in bf16 = 168 MB) on top of a KV pool sized to fill memory
        for start in range(0, context.shape[0], self.CHUNK_ROWS):
            rows = slice(start, start + self.CHUNK_ROWS)
            kv = torch.nn.functional.linear(context[rows], w, b)
            kv = kv.view(-1, cfg.num_hidden_layers, 2, model.num_local_kv_heads, cfg.head_dim)
            self.kernel(kv, k_norm, cfg.rms_norm_eps, positions[rows], inv_freq, slots[rows], pools)
