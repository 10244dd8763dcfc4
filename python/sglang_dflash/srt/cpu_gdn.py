"""Hybrid Gated DeltaNet targets (Qwen3-Next, Qwen3.5 / 3.6) on CPU: plain-torch versions of the pieces SGLang 0.5.23
runs only as Triton / CUDA kernels. Written against SGLang 0.5.23; installed by `hooks.install_cpu_gdn` on the CPU
platform only (a GPU keeps SGLang's kernels untouched).

- `TorchGDNAttnBackend` replaces SGLang's GDN linear-attention backend (`gdn_backend.GDNAttnBackend`, whose conv,
  gating and delta-rule kernels are Triton / fla). Same pool, same metadata, same contract as SGLang's:
  prefill and decode advance the request's conv window and recurrent state; TARGET_VERIFY leaves both untouched and
  writes the state after every verified token into the pool's speculative scratch (row = batch position, step = token
  index), from which `update_mamba_state_after_mtp_verify` commits the accepted step after acceptance.
- `scatter_states_after_verify` is that commit in torch (SGLang's version refuses non-CUDA tensors).
- `rms_norm_gated`, `split_qkvzba`, `gate_sigmoid_mul_add` and `cpu_device_module` stand in for the model code's
  Triton gated norm, Triton projection split, Triton shared-expert gate and its
  `torch.get_device_module().current_device()` (CUDA on a CUDA build of torch without a driver).

Every token goes through one function (`_delta_rule_step`), in prefill, decode and verify alike, so a verified
token's state and output are bit-equal to decoding it alone: speculation stays lossless by construction.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .sglang_api import GDNAttnBackend


# ---------------------------------------------------------------------------------------------- the recurrence
def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def _conv_step(window: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias, activation) -> tuple:
    """One token through the causal depthwise conv. window [C, W-1] (oldest first), x [C], weight [C, W]."""
    full = torch.cat([window, x[:, None]], dim=1)
    out = (full * weight).sum(-1)
    if bias is not None:
        out = out + bias
    if activation in ("silu", "swish"):
        out = F.silu(out)
    return full[:, 1:], out


def _delta_rule_step(state, q, k, v, a, b, layer) -> tuple:
    """One token of the gated delta rule for one request. state [HV, V, K] (float32), q / k [HK, K], v [HV, V],
    a / b [HV]. Returns the new state and the output [HV, V]."""
    group = layer.num_v_heads // layer.num_k_heads
    q = _l2norm(q.float()).repeat_interleave(group, 0) * layer.head_k_dim ** -0.5
    k = _l2norm(k.float()).repeat_interleave(group, 0)
    g = -layer.A_log.float().exp() * F.softplus(a.float() + layer.dt_bias.float(), beta=1.0, threshold=20.0)
    beta = torch.sigmoid(b.float())
    state = state * g.exp()[:, None, None]
    delta = (v.float() - (state * k[:, None, :]).sum(-1)) * beta[:, None]
    state = state + delta[:, :, None] * k[:, None, :]
    return state, (state * q[:, None, :]).sum(-1)


def _run_tokens(layer, x, a, b, window, state, dtypes, on_step=None):
    """Tokens x [T, C] of one request from (window, state); on_step(j, window, state) sees each step's result.
    After every token the window and the state are rounded to the pool's dtypes `(conv, ssm)` (SGLang keeps the
    conv window in bfloat16 by default): a token then sees its predecessors exactly as stored, whether they were
    decoded one by one, verified in one block or prefilled again after a retraction."""
    outs = []
    for j in range(x.shape[0]):
        window, h = _conv_step(window, x[j].float(), layer.conv_weights.float(),
                               None if layer.bias is None else layer.bias.float(), layer.activation)
        window = window.to(dtypes[0]).float()
        q, k, v = torch.split(h, [layer.q_dim, layer.k_dim, layer.v_dim])
        state, o = _delta_rule_step(state, q.view(layer.num_q_heads, layer.head_q_dim),
                                    k.view(layer.num_k_heads, layer.head_k_dim),
                                    v.view(layer.num_v_heads, layer.head_v_dim), a[j], b[j], layer)
        state = state.to(dtypes[1]).float()
        outs.append(o)
        if on_step is not None:
            on_step(j, window, state)
    return torch.stack(outs), window, state


class TorchGDNAttnBackend(GDNAttnBackend):
    """SGLang's GDN backend with its kernels in plain torch (CPU). Decode is prefill of one token per request."""

    def forward_decode(self, layer, forward_batch, mixed_qkv, a, b, **kwargs):
        return self._forward(layer, forward_batch, mixed_qkv, a, b, verify=False, decode=True)

    def forward_extend(self, layer, forward_batch, mixed_qkv, a, b, **kwargs):
        verify = forward_batch.forward_mode.is_target_verify()
        if not verify and self.forward_metadata.has_mamba_track_mask:
            raise NotImplementedError("sglang-dflash CPU GDN: Mamba radix-cache tracking (extra_buffer) is not "
                                      "implemented; serve with --mamba-radix-cache-strategy no_buffer")
        return self._forward(layer, forward_batch, mixed_qkv, a, b, verify=verify, decode=False)

    def _forward(self, layer, forward_batch, mixed_qkv, a, b, *, verify: bool, decode: bool):
        cache = self.req_to_token_pool.mamba2_layer_cache(layer.layer_id)
        conv, ssm = cache.conv[0], cache.temporal
        slots = self.forward_metadata.mamba_cache_indices.tolist()  # host: CPU backend
        starts = self.forward_metadata.query_start_loc.tolist()  # host: CPU backend
        if verify:
            k = forward_batch.spec_info.draft_token_num
            starts = list(range(0, mixed_qkv.shape[0] + 1, k))
            scratch_ssm, scratch_conv = cache.intermediate_ssm, cache.intermediate_conv_window[0]
        fresh = None
        if not verify and not decode:
            fresh = (forward_batch.extend_prefix_lens == 0).tolist()  # host: CPU backend
        out = mixed_qkv.new_zeros(mixed_qkv.shape[0], layer.num_v_heads, layer.head_v_dim)
        for i in range(len(starts) - 1):
            slot, lo, hi = slots[i], starts[i], starts[i + 1]
            if slot < 0 or hi == lo:
                continue
            if fresh is not None and fresh[i]:
                window = torch.zeros_like(conv[slot], dtype=torch.float32)
                state = torch.zeros_like(ssm[slot], dtype=torch.float32)
            else:
                window, state = conv[slot].float(), ssm[slot].float()
            on_step = None
            if verify:
                def on_step(j, w, s, row=i):
                    scratch_conv[row, j] = w.to(scratch_conv.dtype)
                    scratch_ssm[row, j] = s.to(scratch_ssm.dtype)
            o, window, state = _run_tokens(layer, mixed_qkv[lo:hi], a[lo:hi], b[lo:hi], window, state,
                                           (conv.dtype, ssm.dtype), on_step)
            out[lo:hi] = o.to(out.dtype)
            if not verify:
                conv[slot] = window.to(conv.dtype)
                ssm[slot] = state.to(ssm.dtype)
        return out.unsqueeze(0)


# ---------------------------------------------------------------------------------------------- the commit
def _scatter(dst, src, dst_indices, steps, src_rows) -> None:
    """dst[:, dst_indices[i]] = src[:, src_rows[i], steps[i]] for every i with a step >= 0 and a slot >= 0."""
    if dst is None or src is None or steps is None or steps.numel() == 0:
        return
    steps, dst_indices = steps.long(), dst_indices.long()
    rows = torch.arange(steps.shape[0]) if src_rows is None else src_rows.long()
    keep = (steps >= 0) & (dst_indices >= 0)
    dst[:, dst_indices[keep]] = src[:, rows[keep], steps[keep]].to(dst.dtype)


def scatter_states_after_verify(mamba_caches, state_indices_tensor, last_correct_step_indices, mamba_track_indices,
                                mamba_steps_to_track, src_indices_raw=None) -> None:
    """SGLang's `scatter_mamba_states_after_mtp_verify` in torch: the state after step `last_correct_step_indices[i]`
    of scratch row i becomes request i's persistent state (and its radix track slot's, where one is crossed)."""
    pairs = [(mamba_caches.temporal, mamba_caches.intermediate_ssm)]
    pairs += list(zip(mamba_caches.conv, mamba_caches.intermediate_conv_window))
    for dst, src in pairs:
        _scatter(dst, src, state_indices_tensor, last_correct_step_indices, src_indices_raw)
        if mamba_track_indices is not None:
            _scatter(dst, src, mamba_track_indices, mamba_steps_to_track, src_indices_raw)


# ---------------------------------------------------------------------------------------------- model code
def rms_norm_gated(norm, x: torch.Tensor, z: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The gated RMSNorm of SGLang's GDN layers (`FusedRMSNormGated` and fla's gated `RMSNorm`, norm before the
    gate, one group): rmsnorm(x) * weight * act(z)."""
    if getattr(norm, "group_size", None) is not None or not getattr(norm, "norm_before_gate", True):
        raise NotImplementedError("sglang-dflash CPU GDN: grouped or gate-first gated RMSNorm is not implemented")
    activation = getattr(norm, "activation", "silu")
    xf = x.float()
    out = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + norm.eps) * norm.weight.float()
    gate = torch.sigmoid(z.float()) if activation == "sigmoid" else F.silu(z.float())
    return (out * gate).to(x.dtype)


def split_qkvzba(mixed_qkvz, mixed_ba, num_heads_qk, num_heads_v, head_qk, head_v):
    """`fused_qkvzba_split_reshape_cat` in torch: the per-key-head-group packed projections of a Qwen3-Next GDN layer
    into (cat(q, k, v) [T, ...], z [T, HV, V], b [T, HV], a [T, HV])."""
    t, group = mixed_qkvz.shape[0], num_heads_v // num_heads_qk
    qkvz = mixed_qkvz.view(t, num_heads_qk, 2 * head_qk + 2 * group * head_v)
    q, k, v, z = torch.split(qkvz, [head_qk, head_qk, group * head_v, group * head_v], dim=2)
    b, a = torch.split(mixed_ba.view(t, num_heads_qk, 2 * group), [group, group], dim=2)
    mixed_qkv = torch.cat([q.reshape(t, -1), k.reshape(t, -1), v.reshape(t, -1)], dim=-1)
    return (mixed_qkv, z.reshape(t, num_heads_v, head_v).contiguous(), b.reshape(t, num_heads_v).contiguous(),
            a.reshape(t, num_heads_v).contiguous())


def gate_sigmoid_mul_add(hidden_states, gate_weight, shared_output, final_hidden_states) -> None:
    """`fused_gate_sigmoid_mul_add` in torch: the Qwen2-MoE family's gated shared expert (Qwen3-Next's MoE layers),
    final += sigmoid(hidden . gate) * shared, per token."""
    gate = torch.sigmoid(hidden_states.float() @ gate_weight.float())[:, None]
    final_hidden_states.copy_(final_hidden_states.float() + gate * shared_output.float())


@contextlib.contextmanager
def cpu_device_module():
    """`torch.get_device_module()` answers `torch.cpu` while a GDN layer is built: SGLang 0.5.23 builds its gated norm
    on `torch.get_device_module().current_device()`, which on a CUDA build of torch without a driver raises."""
    original = torch.get_device_module

    def device_module(device=None):
        return torch.cpu if device is None else original(device)

    torch.get_device_module = device_module
    try:
        yield
    finally:
        torch.get_device_module = original
