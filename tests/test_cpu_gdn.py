"""The CPU Gated DeltaNet pieces (`srt/cpu_gdn.py`) on their own: a verified block's per-token states equal decoding
the tokens one by one, bit for bit, with the pool's default bfloat16 conv window; the commit scatter; the torch
stand-ins for the model code's Triton kernels against what those kernels compute."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from sglang_dflash.srt import cpu_gdn

HK, HV, K, V, W = 2, 4, 8, 8, 4  # key heads, value heads, key / value head dims, conv width


def _layer(seed=0):
    g = torch.Generator().manual_seed(seed)
    conv_dim = 2 * HK * K + HV * V
    return SimpleNamespace(
        num_q_heads=HK, num_k_heads=HK, num_v_heads=HV, head_q_dim=K, head_k_dim=K, head_v_dim=V,
        q_dim=HK * K, k_dim=HK * K, v_dim=HV * V, conv_weights=torch.randn(conv_dim, W, generator=g) * 0.5,
        bias=None, activation="silu", A_log=torch.randn(HV, generator=g) * 0.3, dt_bias=torch.randn(HV, generator=g))


def _inputs(t, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t, 2 * HK * K + HV * V, generator=g), torch.randn(t, HV, generator=g),
            torch.randn(t, HV, generator=g))


@pytest.mark.parametrize("conv_dtype", [torch.bfloat16, torch.float32])
def test_a_verified_block_equals_decoding_token_by_token(conv_dtype):
    """What makes DFLASH lossless on a GDN target: the state after verify step j (committed when j drafts are
    kept) and every step's output are exactly those of decoding the same tokens one at a time from the stored
    state, rounded as the pool stores it."""
    layer, dtypes = _layer(), (conv_dtype, torch.float32)
    x, a, b = _inputs(9)
    window = torch.randn(2 * HK * K + HV * V, W - 1).to(conv_dtype).float()
    state = torch.zeros(HV, V, K)
    _, window, state = cpu_gdn._run_tokens(layer, x[:4], a[:4], b[:4], window, state, dtypes)  # a prefill
    steps = []
    block_out, *_ = cpu_gdn._run_tokens(layer, x[4:], a[4:], b[4:], window, state, dtypes,
                                        on_step=lambda j, w, s: steps.append((w.clone(), s.clone())))
    for j in range(5):
        out, window, state = cpu_gdn._run_tokens(layer, x[4 + j : 5 + j], a[4 + j : 5 + j], b[4 + j : 5 + j],
                                                 window.to(conv_dtype).float(), state, dtypes)
        assert torch.equal(out[0], block_out[j]) and torch.equal(window, steps[j][0])
        assert torch.equal(state, steps[j][1])


def test_the_delta_rule_is_transformers():
    """One token of our recurrence against transformers' reference recurrent gated delta rule (the kernel its
    Qwen3-Next uses without flash-linear-attention), gating as SGLang's kernels compute it."""
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_recurrent_gated_delta_rule

    layer = _layer()
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(3, HK, K, generator=g), torch.randn(3, HK, K, generator=g), torch.randn(3, HV, V, generator=g)
    a, b = torch.randn(3, HV, generator=g), torch.randn(3, HV, generator=g)
    state, outs = torch.zeros(HV, V, K), []
    for t in range(3):
        state, o = cpu_gdn._delta_rule_step(state, q[t], k[t], v[t], a[t], b[t], layer)
        outs.append(o)
    gate = -layer.A_log.exp() * torch.nn.functional.softplus(a + layer.dt_bias)
    rep = HV // HK
    want, last = torch_recurrent_gated_delta_rule(
        q.repeat_interleave(rep, 1)[None], k.repeat_interleave(rep, 1)[None], v[None], gate[None],
        torch.sigmoid(b)[None], initial_state=None, output_final_state=True, use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(torch.stack(outs), want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state, last[0].transpose(-1, -2), rtol=1e-5, atol=1e-6)  # ours [V, K], theirs [K, V]


def test_commit_scatter():
    """Row i's state after step steps[i] lands in slot slots[i]; step -1 (no track crossing) and slot -1 (a freed
    row) write nothing."""
    caches = SimpleNamespace(temporal=torch.zeros(2, 5, 3), intermediate_ssm=torch.randn(2, 3, 4, 3),
                             conv=[torch.zeros(2, 5, 2)], intermediate_conv_window=[torch.randn(2, 3, 4, 2)])
    slots, steps = torch.tensor([4, 1, -1]), torch.tensor([2, -1, 0])
    cpu_gdn.scatter_states_after_verify(caches, slots, steps, None, None)
    assert torch.equal(caches.temporal[:, 4], caches.intermediate_ssm[:, 0, 2])
    assert torch.equal(caches.conv[0][:, 4], caches.intermediate_conv_window[0][:, 0, 2])
    assert caches.temporal[:, [0, 1, 2, 3]].abs().sum() == 0 and caches.conv[0][:, :4].abs().sum() == 0


def test_split_and_norm_match_the_model_code():
    """`split_qkvzba` equals Qwen3-Next's own torch reordering of its packed projections (what the Triton kernel
    computes), and the gated norm is rmsnorm(x) * weight * silu(z)."""
    from transformers import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

    cfg = Qwen3NextConfig(hidden_size=32, linear_num_key_heads=HK, linear_num_value_heads=HV, linear_key_head_dim=K,
                          linear_value_head_dim=V, num_hidden_layers=1, layer_types=["linear_attention"])
    ref = Qwen3NextGatedDeltaNet(cfg, layer_idx=0)
    qkvz, ba = torch.randn(5, 2 * HK * K + 2 * HV * V), torch.randn(5, 2 * HV)
    q, k, v, z, b, a = ref.fix_query_key_value_ordering(qkvz[None], ba[None])
    mixed, z2, b2, a2 = cpu_gdn.split_qkvzba(qkvz, ba, HK, HV, K, V)
    assert torch.equal(mixed, torch.cat([q[0].flatten(1), k[0].flatten(1), v[0].flatten(1)], -1))
    assert torch.equal(z2, z[0]) and torch.equal(b2, b[0]) and torch.equal(a2, a[0])
    norm = SimpleNamespace(eps=1e-6, weight=torch.rand(V) + 0.5, activation="silu")
    x, gate = torch.randn(7, V), torch.randn(7, V)
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight * torch.nn.functional.silu(gate)
    torch.testing.assert_close(cpu_gdn.rms_norm_gated(norm, x, gate), want)
