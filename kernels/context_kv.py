"""context_kv: drafter context K/V for every drafter layer, from the projected context, in one pass.

Inputs: kv [n, L, 2, nkv, hd] (the stacked K/V projection of the context for all L drafter layers: one
matmul with the layers' k_proj / v_proj weights stacked), k_norm weights [L, hd], eps, positions [n],
inv_freq [hd/2] (RoPE), slots [n], and the pools k_pool / v_pool [L, S, nkv, hd].
Computes, for every layer l and token t:
    k = rope(rms_norm(kv[t, l, 0]) * k_norm[l], positions[t])   (Qwen3 neox rotation, float32 math)
    k_pool[l, slots[t]] = k ;  v_pool[l, slots[t]] = kv[t, l, 1]
Reference: `reference` below (same math as sglang_dflash.drafter.DrafterAttention.kv). Tolerance: 1e-5
relative in float32, 2e-2 in bfloat16.
Versions: Triton 3.x; checked on CPU under TRITON_INTERPRET=1 (tests/kernel_cases.py).
"""

from __future__ import annotations

import torch

from . import lazy_jit


def stack_kv_weights(layers) -> torch.Tensor:
    """The drafter layers' k_proj / v_proj weights as one [L * 2 * nkv * hd, H] matrix (rows: layer, k|v)."""
    return torch.cat([torch.cat([ly.self_attn.k_proj.weight, ly.self_attn.v_proj.weight]) for ly in layers])


def reference(kv, k_norm, eps: float, positions, inv_freq, slots, k_pool, v_pool):
    k = kv[:, :, 0].float()  # [n, L, nkv, hd]
    k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + eps) * k_norm.float()[None, :, None, :]
    freqs = positions[:, None].float() * inv_freq.float()[None]  # [n, hd/2]
    cos, sin = freqs.cos()[:, None, None], freqs.sin()[:, None, None]
    k1, k2 = k.chunk(2, dim=-1)
    k = torch.cat([k1 * cos - k2 * sin, k2 * cos + k1 * sin], dim=-1)
    k_pool[:, slots] = k.transpose(0, 1).to(k_pool.dtype)
    v_pool[:, slots] = kv[:, :, 1].transpose(0, 1).to(v_pool.dtype)


def triton_impl(kv, k_norm, eps: float, positions, inv_freq, slots, k_pool, v_pool):
    import triton

    n, L, _, nkv, hd = kv.shape
    if n == 0:
        return
    kv = kv.contiguous()
    _kernel()[(n, L)](kv, k_norm.float().contiguous(), positions, inv_freq.float().contiguous(), slots,
                      k_pool, v_pool, eps, k_pool.stride(0), k_pool.stride(1), L=L, NKV=nkv, HD=hd,
                      HALF=hd // 2, BLOCK_H=triton.next_power_of_2(nkv))


@lazy_jit
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def context_kv_kernel(kv_ptr, norm_ptr, pos_ptr, inv_ptr, slot_ptr, k_pool, v_pool, eps,
                          pool_stride_l, pool_stride_s, L: tl.constexpr, NKV: tl.constexpr,
                          HD: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        layer = tl.program_id(1).to(tl.int64)
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, HALF)[None, :]
        live = h < NKV
        base = ((t * L + layer) * 2) * NKV * HD  # kv[t, layer, 0]
        k1 = tl.load(kv_ptr + base + h * HD + d, mask=live, other=0.0).to(tl.float32)
        k2 = tl.load(kv_ptr + base + h * HD + HALF + d, mask=live, other=0.0).to(tl.float32)
        var = (tl.sum(k1 * k1, axis=1) + tl.sum(k2 * k2, axis=1)) / HD
        rstd = 1.0 / tl.sqrt(var + eps)
        w1 = tl.load(norm_ptr + layer * HD + d).to(tl.float32)
        w2 = tl.load(norm_ptr + layer * HD + HALF + d).to(tl.float32)
        k1 = k1 * rstd[:, None] * w1
        k2 = k2 * rstd[:, None] * w2
        ang = tl.load(pos_ptr + t).to(tl.float32) * tl.load(inv_ptr + d)
        c, s = tl.cos(ang), tl.sin(ang)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        out = layer * pool_stride_l + slot * pool_stride_s + h * HD
        tl.store(k_pool + out + d, (k1 * c - k2 * s).to(k_pool.dtype.element_ty), mask=live)
        tl.store(k_pool + out + HALF + d, (k2 * c + k1 * s).to(k_pool.dtype.element_ty), mask=live)
        vbase = base + NKV * HD
        v1 = tl.load(kv_ptr + vbase + h * HD + d, mask=live, other=0.0)
        v2 = tl.load(kv_ptr + vbase + h * HD + HALF + d, mask=live, other=0.0)
        tl.store(v_pool + out + d, v1.to(v_pool.dtype.element_ty), mask=live)
        tl.store(v_pool + out + HALF + d, v2.to(v_pool.dtype.element_ty), mask=live)

    return context_kv_kernel
