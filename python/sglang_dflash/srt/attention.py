"""torch_native attention that also runs TARGET_VERIFY forwards, so one worker code path runs on CPU.

SGLang 0.5.23's `TorchNativeAttnBackend` handles EXTEND and DECODE only: in a TARGET_VERIFY forward
`ForwardBatch.extend_prefix_lens` is None and `seq_lens` holds the committed prefix L_i, the GPU backends
adding `spec_info.draft_token_num` (k) themselves. This subclass does the same, for the whole batch in one
padded SDPA call: the k block queries of request i, at positions L_i..L_i+k-1, attend to the request's
first L_i + k keys,
  - causally (key position <= query position) for the target's verify (a linear chain: plain causal
    attention is exact, no tree mask), and
  - all of them for the drafter's layers (`AttentionType.ENCODER_ONLY`: non-causal over context + block).
Every other mode is left to the stock backend. Registered for the name "torch_native" by `hooks.py`.
"""

from __future__ import annotations

import torch
from torch.nn.functional import scaled_dot_product_attention

from .sglang_api import AttentionType, KVWriteLoc, TorchNativeAttnBackend


class VerifyCapableTorchNativeBackend(TorchNativeAttnBackend):
    _layout_for: tuple | None = None  # (forward batch, causal) the cached layout belongs to
    _layout: tuple = ()

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        _refuse_unknown(kwargs)
        fb = forward_batch
        if not fb.forward_mode.is_target_verify():
            return super().forward_extend(q, k, v, layer, fb, save_kv_cache)
        window = layer.sliding_window_size if layer.sliding_window_size is not None else -1
        if layer.is_cross_attention:
            raise NotImplementedError("torch_native TARGET_VERIFY: cross attention")
        if window > -1 and hasattr(self.token_to_kv_pool, "translate_loc_from_full_to_swa"):
            raise NotImplementedError("torch_native TARGET_VERIFY: sliding-window layers in a hybrid SWA KV pool "
                                      "(start with --disable-hybrid-swa-memory)")
        if save_kv_cache and k is not None and v is not None:
            self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(fb.out_cache_loc, self.swa_out_cache_loc), k, v)
        k = fb.spec_info.draft_token_num
        causal = layer.attn_type != AttentionType.ENCODER_ONLY
        nh, nkv, hd = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        q_ = q.view(-1, nh, hd)
        o = q.new_empty((q_.shape[0], nh * layer.v_head_dim))
        o_ = o.view(-1, nh, layer.v_head_dim)
        k_buf = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        v_buf = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        slots, mask = self._verify_layout(fb, k, causal, window)  # [bs, T], [bs, 1, k, T]: shared by like layers
        bs = slots.shape[0]
        key = k_buf[slots].to(q.dtype).transpose(1, 2)  # [bs, nkv, T, hd]
        val = v_buf[slots].to(q.dtype).transpose(1, 2)
        query = q_.view(bs, k, nh, hd).transpose(1, 2)  # [bs, nh, k, hd]
        out = scaled_dot_product_attention(query, key, val, attn_mask=mask, scale=layer.scaling,
                                           enable_gqa=nh != nkv)
        o_.copy_(out.transpose(1, 2).reshape(bs * k, nh, layer.v_head_dim))
        return o

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        _refuse_unknown(kwargs)
        return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)

    def _verify_layout(self, fb, k: int, causal: bool, window: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All requests padded to T = max(L_i + k) keys: the KV slots to read [bs, T] and the visibility mask
        [bs, 1, k, T]. Computed once per forward and layer kind (causal, window) and reused by the layers of that kind.
        Padding reads slot 0 and is masked out: masked keys get zero weight, so their (finite) values
        never reach the output. A sliding window (SGLang's window_left) hides keys more than `window` positions
        before the query."""
        if self._layout_for is not None and self._layout_for[0] is fb and self._layout_for[1:] == (causal, window):
            return self._layout
        prefix = fb.seq_lens.long()  # [bs] committed lengths L_i
        keys = getattr(fb, "seq_lens_cpu", None)  # [bs] L_i + k on the host (`stages.set_block_key_lengths`)
        keys = prefix + k if keys is None else keys  # this backend runs on CPU only: no sync to fear
        T = int(keys.max())  # host: this backend runs on CPU only, where keys are host memory
        dev = prefix.device
        pos = torch.arange(T, device=dev)
        valid = pos[None, :] < (prefix + k)[:, None]  # [bs, T]
        cols = pos.clamp(max=self.req_to_token_pool.req_to_token.shape[1] - 1)
        slots = self.req_to_token_pool.req_to_token[fb.req_pool_indices.long()[:, None], cols[None, :]].long()
        slots = torch.where(valid, slots, torch.zeros_like(slots))
        mask = valid[:, None, :].expand(-1, k, T)
        query_pos = (prefix[:, None] + torch.arange(k, device=dev))[:, :, None]  # query j of request i: L_i + j
        if causal:
            mask = mask & (pos[None, None, :] <= query_pos)
        if window > -1:
            mask = mask & (pos[None, None, :] >= query_pos - window)
        self._layout_for, self._layout = (fb, causal, window), (slots, mask[:, None])
        return self._layout


def _refuse_unknown(kwargs: dict) -> None:
    """An attention input this backend does not implement (gpt-oss `sinks`, ...) fails loudly: dropping it would
    compute a different attention (the stock backend raises a TypeError for any extra argument)."""
    given = sorted(k for k, v in kwargs.items() if v is not None)
    if given:
        raise NotImplementedError(f"torch_native attention: {given} not supported")
