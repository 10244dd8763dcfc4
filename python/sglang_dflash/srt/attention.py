"""torch_native attention that also runs TARGET_VERIFY forwards, so one worker code path runs on CPU.

SGLang 0.5.23's `TorchNativeAttnBackend` handles EXTEND and DECODE only: in a TARGET_VERIFY forward
`ForwardBatch.extend_prefix_lens` is None and `seq_lens` holds the committed prefix L_i, the GPU backends
adding `spec_info.draft_token_num` (B) themselves. This subclass does the same, for the whole batch in one
padded SDPA call: the B block queries of request i, at positions L_i..L_i+B-1, attend to the request's
first L_i + B keys,
  - causally (key position <= query position) for the target's verify (a linear chain: plain causal
    attention is exact, no tree mask), and
  - all of them for the drafter's layers (`AttentionType.ENCODER_ONLY`: non-causal over context + block).
Every other mode is left to the stock backend. Registered for the name "torch_native" by `hooks.py`.
"""

from __future__ import annotations

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.layers.radix_attention import AttentionType
from sglang.srt.mem_cache.memory_pool import KVWriteLoc
from torch.nn.functional import scaled_dot_product_attention


class VerifyCapableTorchNativeBackend(TorchNativeAttnBackend):
    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        fb = forward_batch
        if not fb.forward_mode.is_target_verify():
            return super().forward_extend(q, k, v, layer, fb, save_kv_cache)
        if layer.is_cross_attention or (layer.sliding_window_size or -1) > -1:
            raise NotImplementedError("torch_native TARGET_VERIFY: cross or sliding-window attention")
        if save_kv_cache and k is not None and v is not None:
            self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(fb.out_cache_loc, self.swa_out_cache_loc), k, v)
        B = fb.spec_info.draft_token_num
        causal = layer.attn_type != AttentionType.ENCODER_ONLY
        nh, nkv, hd = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        q_ = q.view(-1, nh, hd)
        o = q.new_empty((q_.shape[0], nh * layer.v_head_dim))
        o_ = o.view(-1, nh, layer.v_head_dim)
        k_buf = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        v_buf = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        # All requests in one padded SDPA call: keys [bs, nkv, T, hd] with T = max(L_i) + B.
        prefix = fb.seq_lens.long()  # [bs] committed lengths L_i
        bs = prefix.shape[0]
        T = int(prefix.max()) + B  # sync: the padded key length (one scalar per layer call)
        pos = torch.arange(T, device=q.device)
        valid = pos[None, :] < (prefix + B)[:, None]  # [bs, T]
        cols = pos.clamp(max=self.req_to_token_pool.req_to_token.shape[1] - 1)
        slots = self.req_to_token_pool.req_to_token[fb.req_pool_indices.long()[:, None], cols[None, :]].long()
        slots = torch.where(valid, slots, torch.zeros_like(slots))  # padding reads slot 0, then is zeroed
        keep = valid[:, :, None, None]
        key = torch.where(keep, k_buf[slots], 0).to(q.dtype).transpose(1, 2)  # [bs, nkv, T, hd]
        val = torch.where(keep, v_buf[slots], 0).to(q.dtype).transpose(1, 2)
        query = q_.view(bs, B, nh, hd).transpose(1, 2)  # [bs, nh, B, hd]
        mask = valid[:, None, :].expand(bs, B, T)
        if causal:  # query j of request i sits at position L_i + j
            mask = mask & (pos[None, None, :] <= (prefix[:, None] + torch.arange(B, device=q.device))[:, :, None])
        out = scaled_dot_product_attention(query, key, val, attn_mask=mask[:, None], scale=layer.scaling,
                                           enable_gqa=nh != nkv)
        o_.copy_(out.transpose(1, 2).reshape(bs * B, nh, layer.v_head_dim))
        return o
