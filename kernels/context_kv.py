"""context_kv: drafter context K/V for every drafter layer, from the projected context, in one pass.

Inputs: kv [n, L, 2, nkv, hd] (the stacked K/V projection of the context for all L drafter layers: one
matmul with the layers' k_proj / v_proj weights stacked, `stack_kv_projection`), k_norm weights [L, hd],
eps, positions [n], inv_freq [hd/2] (RoPE), slots [n], and `pools`: the per-layer K and V pool tensors
[S, nkv, hd] (SGLang keeps one allocation per layer) with a device table of their data pointers.
Computes, for every layer l and token t:
    k = rope(rms_norm(kv[t, l, 0]) * k_norm[l], positions[t])   (Qwen3 neox rotation, float32 math)
    pools.k[l][slots[t]] = k ;  pools.v[l][slots[t]] = kv[t, l, 1]
Reference: `reference` below (same math as sglang_dflash.drafter.DrafterAttention.kv). Tolerance: 1e-5
relative in float32, 2e-2 in bfloat16.
Versions: Triton 3.x; checked on CPU under TRITON_INTERPRET=1 (tests/kernel_cases.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import lazy_jit


class LayerPools(NamedTuple):
    """The per-layer pool tensors and a [L] int64 table of their addresses on the pools' device."""

    k: list[torch.Tensor]  # L x [S, nkv, hd]
    v: list[torch.Tensor]
    k_ptrs: torch.Tensor
    v_ptrs: torch.Tensor


def layer_pools(k: list[torch.Tensor], v: list[torch.Tensor]) -> LayerPools:
    """Check the per-layer tensors share one layout (the kernel uses one set of strides) and build the
    address table, once: it stays valid as long as the pool tensors do."""
    first = k[0]
    for t in [*k, *v]:
        if t.shape != first.shape or t.stride() != first.stride() or t.dtype != first.dtype or t.dim() != 3:
            raise ValueError(f"context_kv: pool tensors must all be [slots, kv_heads, head_dim] with one layout; "
                             f"got {tuple(t.shape)} stride {t.stride()} {t.dtype} beside {tuple(first.shape)} "
                             f"stride {first.stride()} {first.dtype}")
    if first.stride(2) != 1 or first.stride(1) != first.shape[2]:
        raise ValueError(f"context_kv: pool rows must be contiguous [kv_heads, head_dim], got stride {first.stride()}")
    misaligned = [t.data_ptr() for t in [*k, *v] if t.data_ptr() % 16]
    if misaligned:  # the kernel promises Triton 16-byte aligned pool starts (vector stores)
        raise ValueError(f"context_kv: pool tensors must start 16-byte aligned, got addresses {misaligned[:3]}")
    table = lambda ts: torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64).to(first.device)  # noqa: E731
    return LayerPools(list(k), list(v), table(k), table(v))


def supports(head_dim: int) -> bool:
    """The kernel works on half a head at a time with tl.arange: head_dim / 2 must be a power of two
    (64 and 128 are; 80 and 96 are not: those take the reference)."""
    half = head_dim // 2
    return head_dim % 2 == 0 and half >= 1 and half & (half - 1) == 0


def stack_kv_projection(layers) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The drafter layers' k_proj / v_proj as one [L * 2 * nkv * hd, H] weight (rows: layer, k|v) and bias."""
    w = torch.cat([torch.cat([ly.self_attn.k_proj.weight, ly.self_attn.v_proj.weight]) for ly in layers])
    if layers[0].self_attn.k_proj.bias is None:
        return w, None
    return w, torch.cat([torch.cat([ly.self_attn.k_proj.bias, ly.self_attn.v_proj.bias]) for ly in layers])


def reference(kv, k_norm, eps: float, positions, inv_freq, slots, pools: LayerPools):
    k = kv[:, :, 0].float()  # [n, L, nkv, hd]
    k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + eps) * k_norm.float()[None, :, None, :]
    freqs = positions[:, None].float() * inv_freq.float()[None]  # [n, hd/2]
    cos, sin = freqs.cos()[:, None, None], freqs.sin()[:, None, None]
    k1, k2 = k.chunk(2, dim=-1)
    k = torch.cat([k1 * cos - k2 * sin, k2 * cos + k1 * sin], dim=-1)
    for layer, (k_pool, v_pool) in enumerate(zip(pools.k, pools.v)):
        k_pool[slots] = k[:, layer].to(k_pool.dtype)
        v_pool[slots] = kv[:, layer, 1].to(v_pool.dtype)


def triton_impl(kv, k_norm, eps: float, positions, inv_freq, slots, pools: LayerPools):
    import triton

    n, L, _, nkv, hd = kv.shape
    if n == 0:
        return
    kv = kv.contiguous()
    k0, v0 = pools.k[0], pools.v[0]
    _kernel()[(n, L)](kv, k_norm.float().contiguous(), positions, inv_freq.float().contiguous(), slots,
                      pools.k_ptrs, pools.v_ptrs, k0, v0, eps, k0.stride(0), v0.stride(0), L=L, NKV=nkv, HD=hd,
                      HALF=hd // 2, BLOCK_H=triton.next_power_of_2(nkv))


@lazy_jit
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def context_kv_kernel(kv_ptr, norm_ptr, pos_ptr, inv_ptr, slot_ptr, k_ptrs, v_ptrs, k_like, v_like, eps,
                          k_stride_s, v_stride_s, L: tl.constexpr, NKV: tl.constexpr,
                          HD: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
        # k_like / v_like: layer 0's pools, passed only for their element type
        t = tl.program_id(0).to(tl.int64)
        layer = tl.program_id(1).to(tl.int64)
        # pool tensors start 16-byte aligned (PyTorch allocations; SGLang's V half starts a whole row block
        # later): say so, or the cast from an integer drops the alignment and every store goes 2 bytes wide
        k_pool = tl.multiple_of(tl.load(k_ptrs + layer).to(k_like.dtype, bitcast=True), 16)
        v_pool = tl.multiple_of(tl.load(v_ptrs + layer).to(v_like.dtype, bitcast=True), 16)
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
        k_out = k_pool + slot * k_stride_s + h * HD
        tl.store(k_out + d, (k1 * c - k2 * s).to(k_like.dtype.element_ty), mask=live)
        tl.store(k_out + HALF + d, (k2 * c + k1 * s).to(k_like.dtype.element_ty), mask=live)
        vbase = base + NKV * HD
        v1 = tl.load(kv_ptr + vbase + h * HD + d, mask=live, other=0.0)
        v2 = tl.load(kv_ptr + vbase + h * HD + HALF + d, mask=live, other=0.0)
        v_out = v_pool + slot * v_stride_s + h * HD
        tl.store(v_out + d, v1.to(v_like.dtype.element_ty), mask=live)
        tl.store(v_out + HALF + d, v2.to(v_like.dtype.element_ty), mask=live)

    return context_kv_kernel
