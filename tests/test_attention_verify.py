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


@pytest.mark.parametrize("host_keys", [False, True])  # fb.seq_lens_cpu = L + B as the worker sets it, or absent
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("nh,nkv", [(4, 4), (4, 2), (4, 1)])
def test_verify_attention_matches_naive(causal, nh, nkv, host_keys):
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
    if host_keys:
        fb.seq_lens_cpu = seq_lens + B
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


class RecordingTranslator:
    """Stands in for SGLang's KVIndexTranslator: packs req_to_token[row, :len] into the CSR rows, as its
    `pack_read_stream` does for plain full-attention pools, and records what it was asked."""

    def __init__(self, req_to_token):
        self.req_to_token, self.calls = req_to_token, []

    def pack_read_stream(self, plan, *, req_pool_indices, seq_lens, indptr, out, kv_start_idx=None, kind=None):
        self.calls.append(dict(seq_lens=seq_lens.clone(), indptr=indptr.clone(), kind=kind))
        for i, (row, n) in enumerate(zip(req_pool_indices.tolist(), seq_lens.tolist())):
            out[indptr[i] : indptr[i] + n] = self.req_to_token[row, :n]
        return True


def test_flashinfer_prefill_arguments():
    """What FlashInfer's paged prefill plan gets from our block input: B queries and L + B keys per request,
    the keys' slots in request order, no custom mask (SGLang 0.5.23 flashinfer_backend.call_begin_forward)."""
    from sglang.srt.mem_cache.kv_loc_plan import IdSpaceKind
    from sglang_dflash.srt.spec_inputs import BlockForwardInput

    B, L = 4, torch.tensor([5, 0, 9])
    req_to_token = torch.arange(4 * 32, dtype=torch.int32).view(4, 32)
    rows = torch.tensor([2, 0, 3])
    spec = BlockForwardInput(draft_token_num=B, positions=torch.zeros(12, dtype=torch.int64))
    translator = RecordingTranslator(req_to_token)
    kv_indices, kv_indptr, qo_indptr, mask = spec.generate_attn_arg_prefill(
        req_pool_indices=rows, paged_kernel_lens=L, paged_kernel_lens_sum=int(L.sum()), translator=translator,
        plan=None, kv_start_idx=None, kind=IdSpaceKind.FULL)
    assert mask is None
    assert qo_indptr.tolist() == [0, 4, 8, 12] and qo_indptr.dtype == torch.int32
    assert kv_indptr.tolist() == [0, 9, 13, 26] and kv_indptr.dtype == torch.int32
    assert kv_indices.dtype == torch.int32 and kv_indices.numel() == int(L.sum()) + 3 * B
    want = torch.cat([req_to_token[r, : n + B] for r, n in zip(rows.tolist(), L.tolist())])
    assert torch.equal(kv_indices, want)
    assert translator.calls[0]["seq_lens"].tolist() == [9, 4, 13] and translator.calls[0]["kind"] == IdSpaceKind.FULL
    # a caller's buffer (FlashInfer MLA passes one) is filled in place
    buf = torch.full((40,), -1, dtype=torch.int32)
    got, *_ = spec.generate_attn_arg_prefill(req_pool_indices=rows, paged_kernel_lens=L,
                                             paged_kernel_lens_sum=int(L.sum()), translator=translator, plan=None,
                                             kv_indices_buf=buf)
    assert got is buf and torch.equal(buf[:26], want)


def test_block_key_lengths_are_host_only():
    from sglang_dflash.srt.stages import set_block_key_lengths

    batch = SimpleNamespace(seq_lens=torch.tensor([5, 0, 9]), seq_lens_cpu=torch.tensor([5, 0, 9]), seq_lens_sum=14)
    set_block_key_lengths(batch, 4)
    assert batch.seq_lens_cpu.tolist() == [9, 4, 13] and batch.seq_lens_sum == 26
    assert batch.seq_lens.tolist() == [5, 0, 9]  # the device lengths stay L (FA3 and triton add B themselves)
    unset = SimpleNamespace(seq_lens=torch.tensor([5]), seq_lens_cpu=None, seq_lens_sum=5)
    set_block_key_lengths(unset, 4)  # overlap with a backend that needs no host lengths: nothing to widen
    assert unset.seq_lens_cpu is None and unset.seq_lens_sum == 5
