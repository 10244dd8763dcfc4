"""The drafter as an SGLang model (architecture `DFlashDraftModel`), served by SGLang's ModelRunner.

It IS the reference drafter (`sglang_dflash.drafter.DFlashDrafter`: one layer definition, so the two agree
to float rounding), run with a different attention seam: SGLang's `RadixAttention` with
`AttentionType.ENCODER_ONLY`, so every attention backend attends NON-causally over the request's whole KV
(context K/V written by the worker's `ContextWriter` + the block's own K/V written by this forward); a drafter whose
config makes a layer causal or sliding-window (`DFlashConfig.layer_attention`) gets that layer's RadixAttention built
so (`AttentionType.DECODER`, `sliding_window_size`), as the reference drafter masks it.
Its projections are SGLang's tensor-parallel layers (`srt/parallel.ShardedLinears`): under `--tp-size N`
each rank holds and computes its share of the heads and MLP channels (plain linears at N = 1).

Shapes: `num_tokens` = bs * B block tokens in a draft forward, `H` hidden, `K*H` target features.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from ...config import DFlashConfig, capture_order
from ...drafter import DFlashDrafter, load_weights_into
from ..parallel import ShardedLinears, check_tensor_parallel, load_shard, vocab_logits

if TYPE_CHECKING:
    from ..sglang_api import ForwardBatch

logger = logging.getLogger("sglang_dflash")


def checkpoint_config(raw: dict) -> dict:
    """The drafter config as the checkpoint has it. On CPU, SGLang pads `intermediate_size` (and head counts that
    do not split) over the TP ranks for its CPU kernels and keeps the checkpoint's value as `original_*`; the
    drafter is built at the checkpoint's sizes (exact, and what a GPU server builds), and head counts must
    split as they are (`parallel.check_tensor_parallel`)."""
    originals = {"intermediate_size": "original_intermediate_size",
                 "num_attention_heads": "original_num_attention_heads",
                 "num_key_value_heads": "original_total_num_kv_heads"}
    return {**raw, **{k: raw[o] for k, o in originals.items() if raw.get(o) is not None}}


class DFlashDraftModel(nn.Module):
    """SGLang entry class for z-lab DFlash drafter checkpoints."""

    def __init__(self, config, quant_config=None, prefix: str = "") -> None:
        super().__init__()
        from ..sglang_api import AttentionType, RadixAttention

        if quant_config is not None:
            raise ValueError(f"DFlash drafter: quantization {quant_config!r} is not supported; load it unquantized")
        self.cfg = DFlashConfig.from_dict(checkpoint_config(config.to_dict()))
        self.config = config
        linears = ShardedLinears()
        check_tensor_parallel(self.cfg, linears.tp_size)
        self.drafter = DFlashDrafter(self.cfg, linears)
        c, attn0 = self.cfg, self.drafter.layers[0].self_attn
        self.num_local_kv_heads = attn0.nkv  # this rank's KV heads: its drafter pool's and context writer's
        def attention(i: int) -> RadixAttention:  # non-causal unless the layer is causal; its window, if any
            causal, window_left = c.layer_attention(i)
            return RadixAttention(attn0.nh, c.head_dim, c.head_dim**-0.5, num_kv_heads=attn0.nkv, layer_id=i,
                                  sliding_window_size=window_left,
                                  attn_type=AttentionType.DECODER if causal else AttentionType.ENCODER_ONLY,
                                  prefix=f"{prefix}attn.{i}")

        self.attn = nn.ModuleList(attention(i) for i in range(c.num_hidden_layers))
        self._stacked: tuple | None = None  # stacked_kv() cache; not parameters, so never loaded or saved
        self._feature_order = capture_order(self.cfg.target_layer_ids)  # None: captured in config order
        if linears.tp_size > 1:
            logger.info("sglang-dflash: drafter sharded over %d tensor-parallel ranks: this rank (%d) holds %d of %d "
                        "attention heads, %d of %d KV heads, %d of %d MLP channels", linears.tp_size, linears.tp_rank,
                        attn0.nh, c.num_attention_heads, attn0.nkv, c.num_key_value_heads,
                        self.drafter.layers[0].mlp.gate_proj.weight.shape[0], c.intermediate_size)

    # -- the target's frozen embedding and lm_head (the drafter has neither) ---------------------
    def attach_target(self, target_model: nn.Module, vocab_size: int) -> None:
        """The target whose input embedding and lm_head the drafter uses; `vocab_size` its vocabulary (the
        model config's: composite targets keep it in their text config)."""
        # in a list: not submodules, so no weights are loaded or owned
        self._target = [target_model, target_model.get_input_embeddings()]
        self._vocab_size = vocab_size

    def draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """drafter hidden [..., H] -> logits [..., V] float32 through the target's lm_head, the whole vocabulary on
        every rank (`parallel.vocab_logits`: under TP each rank computes its rows, then an all-gather).

        SGLang pads the lm_head's rows to a multiple of 64; the padding rows are cut off, as SGLang's own
        LogitsProcessor does, so no draft can name a token outside the vocabulary."""
        target = self._target[0]
        return vocab_logits(hidden, target.lm_head, self._vocab_size)

    # -- context: target hidden states -> drafter K/V (written by the worker) -----------------
    def project(self, target_hidden: torch.Tensor) -> torch.Tensor:
        """target_hidden [num_tokens, K*H] in SGLang's capture order (ascending layer ids) -> context [num_tokens, H];
        a config listing its layers in another order gets its features in that order first."""
        if self._feature_order is not None:
            n, K = target_hidden.shape[0], len(self._feature_order)
            target_hidden = target_hidden.view(n, K, -1)[:, self._feature_order].reshape(n, -1)
        return self.drafter.project(target_hidden.to(self.drafter.fc.weight.dtype))

    def context_kv(self, context: torch.Tensor, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """context [n, H], positions [n] -> per layer (k, v) [n, nkv, hd] (this rank's KV heads), k normed and
        rotated."""
        return [(k[0], v[0]) for k, v in self.drafter.context_kv(context[None], positions[None])]

    def stacked_kv(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Every layer's k_proj / v_proj as one weight [L*2*nkv*hd, H] (+ bias) and the k_norm weights [L, hd] (times
        RoPE's attention factor),
        nkv = this rank's KV heads (the local shards of k_proj / v_proj),
        for kernel `context_kv`. Built on first use (one extra copy of the K/V projections, 52 MB at
        Qwen3-4B-DFlash shapes in bf16) and dropped when weights are (re)loaded."""
        if self._stacked is None:
            from dflash_kernels.context_kv import stack_kv_projection

            layers = self.drafter.layers
            w, b = stack_kv_projection(layers)
            # RoPE's attention factor (yarn) scales cos and sin, so the rotated k: folded into the k_norm weights
            factor = self.drafter.rotary.attention_factor
            self._stacked = (w, b, torch.stack([ly.self_attn.k_norm.weight for ly in layers]) * factor)
        return self._stacked

    # -- the block forward ---------------------------------------------------------------------
    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens] block ids: [bonus, MASK...] per request
        positions: torch.Tensor,  # [num_tokens] int64
        forward_batch: ForwardBatch,
        input_embeds: torch.Tensor | None = None,
        **_: object,
    ):
        """Embedded here with the target's embedding (SGLang would cast passed input_embeds to bf16)."""
        from ..sglang_api import LogitsProcessorOutput

        h = self._target[1](input_ids).to(self.drafter.fc.weight.dtype)[None]  # [1, n, H]
        n = h.shape[1]
        for layer, attn in zip(self.drafter.layers, self.attn):
            def attend(q, k, v, attn=attn):  # the block's K/V go to the pool; attention sees context + block
                return attn(q.reshape(n, -1), k.reshape(n, -1), v.reshape(n, -1), forward_batch)[None]

            h = layer(h, positions[None], attend)
        return LogitsProcessorOutput(next_token_logits=None, hidden_states=self.drafter.norm(h[0]))

    # -- weights ---------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Every drafter tensor must be present with its full (unsharded) shape; extras are skipped with a warning
        (`drafter.load_weights_into`). Each rank keeps its share of the sharded ones (`parallel.load_shard`)."""
        self._stacked = None
        with torch.device("meta"):  # the checkpoint's shapes, without memory
            full = DFlashDrafter(self.cfg).state_dict()
        params = dict(self.drafter.named_parameters())
        load_weights_into(full, weights, getattr(self.config, "_name_or_path", "?"),
                          copy=lambda name, tensor: load_shard(params[name], tensor))


EntryClass = DFlashDraftModel
