"""The torch_native TARGET_VERIFY extension against a naive attention over each request's whole sequence."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from sglang.srt.layers.radix_attention import AttentionType
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang_dflash.srt.attention import VerifyCapableTorchNativeBackend


class FakePool:
    def __init__(self, n, nkv, hd):
        self.k = torch.full((n, nkv, hd), float("nan"))
        self.v = torch.full((n, nkv, hd), float("nan"))

    def set_kv_buffer(self, layer, loc, k, v):
        self.k[loc.loc] = k.view(-1, *self.k.shape[1:])
        self.v[loc.loc] = v.view(-1, *self.v.shape[1:])

    def get_key_buffer(self, layer_id):
        return self.k

    def get_value_buffer(self, layer_id):
        return self.v


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("nh,nkv", [(4, 4), (4, 2), (4, 1)])
def test_verify_attention_matches_naive(causal, nh, nkv):
    torch.manual_seed(0)
    hd, B, prefix = 8, 4, [5, 0, 9]
    bs, slots_total = len(prefix), 128
    req_to_token = torch.zeros(bs + 1, 64, dtype=torch.int32)
    perm = torch.randperm(slots_total - 1) + 1
    pool = FakePool(slots_total, nkv, hd)
    pool.k[0], pool.v[0] = 50.0, -70.0  # slot 0 (SGLang's padding slot): padded key columns read it, masked out
    full_k, full_v = [], []
    used = 0
    for i, L in enumerate(prefix):  # the prefix K/V already in the pool at scattered slots
        s = perm[used : used + L + B]
        used += L + B
        req_to_token[i + 1, : L + B] = s.int()
        k, v = torch.randn(L + B, nkv, hd), torch.randn(L + B, nkv, hd)
        pool.k[s[:L]], pool.v[s[:L]] = k[:L], v[:L]
        full_k.append(k)
        full_v.append(v)
    runner = SimpleNamespace(device="cpu", req_to_token_pool=SimpleNamespace(req_to_token=req_to_token),
                             token_to_kv_pool=pool)
    backend = VerifyCapableTorchNativeBackend(runner)
    layer = SimpleNamespace(tp_q_head_num=nh, tp_k_head_num=nkv, qk_head_dim=hd, v_head_dim=hd, layer_id=0,
                            scaling=hd**-0.5, is_cross_attention=False, sliding_window_size=-1,
                            attn_type=AttentionType.DECODER if causal else AttentionType.ENCODER_ONLY)
    seq_lens = torch.tensor(prefix)
    rows = torch.arange(1, bs + 1)
    out_loc = torch.cat([req_to_token[r, L : L + B] for r, L in zip(rows.tolist(), prefix)]).long()
    fb = SimpleNamespace(forward_mode=ForwardMode.TARGET_VERIFY, spec_info=SimpleNamespace(draft_token_num=B),
                         seq_lens=seq_lens, req_pool_indices=rows, out_cache_loc=out_loc)
    backend.swa_out_cache_loc = None
    q = torch.randn(bs * B, nh * hd)
    k_new = torch.cat([k[-B:] for k in full_k]).view(bs * B, -1)
    v_new = torch.cat([v[-B:] for v in full_v]).view(bs * B, -1)
    got = backend.forward_extend(q, k_new, v_new, layer, fb).view(bs, B, nh, hd)
    again = backend.forward_extend(q, k_new, v_new, layer, fb).view(bs, B, nh, hd)  # next layer: cached layout
    torch.testing.assert_close(again, got)
    for i, L in enumerate(prefix):
        for j in range(B):
            for h in range(nh):
                kv_h = h // (nh // nkv)
                n_keys = L + j + 1 if causal else L + B
                keys, vals = full_k[i][:n_keys, kv_h], full_v[i][:n_keys, kv_h]
                w = torch.softmax(keys @ q.view(bs, B, nh, hd)[i, j, h] / math.sqrt(hd), dim=0)
                torch.testing.assert_close(got[i, j, h], w @ vals, rtol=1e-5, atol=1e-5)
