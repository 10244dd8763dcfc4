"""The drafter against a naive computation written here independently, and checkpoint loading."""

import math

import pytest
import torch
from conftest import make_drafter, make_target
from sglang_dflash.drafter import DFlashDrafter, Rotary


def naive_rms(x, w, eps=1e-6):
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def naive_rope(x, pos, theta=10000.0):
    """x [n, hd] for one head at positions pos [n]: rotate pairs (i, i + hd/2) by pos * theta^(-2i/hd)."""
    n, hd = x.shape
    out = torch.empty_like(x)
    for t in range(n):
        for i in range(hd // 2):
            ang = float(pos[t]) * theta ** (-2 * i / hd)
            a, b = x[t, i], x[t, i + hd // 2]
            out[t, i] = a * math.cos(ang) - b * math.sin(ang)
            out[t, i + hd // 2] = b * math.cos(ang) + a * math.sin(ang)
    return out


def naive_drafter(d, feats, ctx_pos, block_emb, blk_pos):
    """One request, no batching. feats [C, K*H], block_emb [Q, H] -> hidden [Q, H]."""
    sd = {k: v.double() for k, v in d.state_dict().items()}
    cfg = d.cfg
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    ctx = naive_rms(feats.double() @ sd["fc.weight"].T, sd["hidden_norm.weight"])
    h = block_emb.double()
    for li in range(cfg.num_hidden_layers):
        p = f"layers.{li}."
        x = naive_rms(h, sd[p + "input_layernorm.weight"])
        attn_out = torch.zeros(h.shape[0], nh * hd, dtype=torch.float64)
        for head in range(nh):
            kvh = head // (nh // nkv)
            wq = sd[p + "self_attn.q_proj.weight"][head * hd:(head + 1) * hd]
            wk = sd[p + "self_attn.k_proj.weight"][kvh * hd:(kvh + 1) * hd]
            wv = sd[p + "self_attn.v_proj.weight"][kvh * hd:(kvh + 1) * hd]
            q = naive_rope(naive_rms(x @ wq.T, sd[p + "self_attn.q_norm.weight"]), blk_pos)
            k_ctx = naive_rope(naive_rms(ctx @ wk.T, sd[p + "self_attn.k_norm.weight"]), ctx_pos)
            k_blk = naive_rope(naive_rms(x @ wk.T, sd[p + "self_attn.k_norm.weight"]), blk_pos)
            k = torch.cat([k_ctx, k_blk])
            v = torch.cat([ctx @ wv.T, x @ wv.T])
            w = torch.softmax(q @ k.T / math.sqrt(hd), dim=-1)  # no causal mask
            attn_out[:, head * hd:(head + 1) * hd] = w @ v
        h = h + attn_out @ sd[p + "self_attn.o_proj.weight"].T
        x = naive_rms(h, sd[p + "post_attention_layernorm.weight"])
        gate = x @ sd[p + "mlp.gate_proj.weight"].T
        up = x @ sd[p + "mlp.up_proj.weight"].T
        h = h + (gate * torch.sigmoid(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
    return naive_rms(h, sd["norm.weight"])


@pytest.mark.parametrize("heads,kv_heads,layers,ctx_len,B", [(4, 2, 2, 7, 4), (4, 4, 1, 3, 2), (4, 1, 3, 11, 8)])
def test_forward_matches_naive(heads, kv_heads, layers, ctx_len, B):
    target = make_target(heads=heads, kv_heads=kv_heads)
    d = make_drafter(target, layers=layers, block_size=B)
    torch.manual_seed(0)
    KH = d.cfg.num_target_features * d.cfg.hidden_size
    feats = torch.randn(2, ctx_len, KH)
    ctx_pos = torch.arange(ctx_len)[None].repeat(2, 1)
    emb = torch.randn(2, B, d.cfg.hidden_size)
    blk_pos = torch.arange(ctx_len, ctx_len + B)[None].repeat(2, 1)
    with torch.no_grad():
        got = d(emb, blk_pos, d.context_kv(d.project(feats), ctx_pos))
    for b in range(2):
        want = naive_drafter(d, feats[b], ctx_pos[b], emb[b], blk_pos[b])
        torch.testing.assert_close(got[b].double(), want, rtol=1e-4, atol=1e-4)


def test_mask_hides_keys():
    """A key hidden by the mask must not change the output; a visible one must."""
    target = make_target()
    d = make_drafter(target, block_size=4)
    torch.manual_seed(0)
    feats = torch.randn(1, 6, d.cfg.num_target_features * d.cfg.hidden_size)
    pos = torch.arange(6)[None]
    emb = torch.randn(1, 4, d.cfg.hidden_size)
    bpos = torch.arange(6, 10)[None]
    mask = torch.ones(1, 4, 10, dtype=torch.bool)
    mask[:, :, 5] = False  # hide context token 5
    with torch.no_grad():
        a = d(emb, bpos, d.context_kv(d.project(feats), pos), mask)
        feats2 = feats.clone()
        feats2[0, 5] += 3.0
        b = d(emb, bpos, d.context_kv(d.project(feats2), pos), mask)
        c = d(emb, bpos, d.context_kv(d.project(feats2), pos))
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-3


def test_save_load_roundtrip_and_bf16(tmp_path):
    target = make_target()
    d = make_drafter(target)
    d.save_pretrained(tmp_path)
    loaded = DFlashDrafter.from_pretrained(tmp_path)
    assert loaded.cfg == d.cfg
    for (k, v), (k2, v2) in zip(d.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    bf = DFlashDrafter.from_pretrained(tmp_path, dtype=torch.bfloat16)
    feats = torch.randn(1, 5, d.cfg.num_target_features * d.cfg.hidden_size)
    pos, emb, bpos = torch.arange(5)[None], torch.randn(1, 4, d.cfg.hidden_size), torch.arange(5, 9)[None]
    with torch.no_grad():
        ref = d(emb, bpos, d.context_kv(d.project(feats), pos))
        low = bf(emb.bfloat16(), bpos, bf.context_kv(bf.project(feats.bfloat16()), pos))
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, rtol=0.1, atol=0.1)


def test_zlab_names_and_model_prefix(tmp_path):
    """z-lab weight names load; an exported `model.` prefix is tolerated."""
    from safetensors.torch import save_file

    d = make_drafter(make_target(), layers=1)
    names = set(d.state_dict())
    assert names == {
        "fc.weight", "hidden_norm.weight", "norm.weight",
        *(f"layers.0.self_attn.{p}_proj.weight" for p in "qkvo"),
        "layers.0.self_attn.q_norm.weight", "layers.0.self_attn.k_norm.weight",
        *(f"layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
        "layers.0.input_layernorm.weight", "layers.0.post_attention_layernorm.weight",
    }
    d.save_pretrained(tmp_path)
    save_file({"model." + k: v.contiguous() for k, v in d.state_dict().items()}, tmp_path / "model.safetensors")
    DFlashDrafter.from_pretrained(tmp_path)


def test_strict_keys(tmp_path):
    from safetensors.torch import save_file

    d = make_drafter(make_target(), layers=2)
    d.save_pretrained(tmp_path)
    state = dict(d.state_dict())
    state.pop("layers.1.mlp.up_proj.weight")
    state["layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as e:
        DFlashDrafter.from_pretrained(tmp_path)
    assert "layers.1.mlp.up_proj.weight" in str(e.value) and "layers.0.self_attn.extra.weight" in str(e.value)


def test_shape_mismatch_and_corrupt(tmp_path):
    from safetensors.torch import save_file

    d = make_drafter(make_target())
    d.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in d.state_dict().items()}
    state["fc.weight"] = torch.zeros(3, 3)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="fc.weight has shape"):
        DFlashDrafter.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read"):
        DFlashDrafter.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        DFlashDrafter.from_pretrained(tmp_path)


def test_loads_the_z_lab_qwen3_4b_config_with_an_extra_tensor(tmp_path, caplog):
    """z-lab/Qwen3-4B-DFlash-b16's exact shapes, random weights, plus a tensor the drafter does not use (z-lab
    exports may carry e.g. `mask_embedding`): it loads, the extra is named in a warning; a missing one fails."""
    import json
    import logging

    from safetensors.torch import save_file
    from sglang_dflash.config import DFlashConfig

    cfg = DFlashConfig(hidden_size=2560, intermediate_size=9728, num_hidden_layers=5, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6,
                       max_position_embeddings=40960, block_size=16, target_layer_ids=(1, 9, 17, 25, 33),
                       mask_token_id=151669, num_target_layers=36, vocab_size=151936)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in DFlashDrafter(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state = {k: torch.empty(shape, dtype=torch.bfloat16).normal_(generator=g) for k, shape in shapes.items()}
    state["mask_embedding"] = torch.randn(2560).to(torch.bfloat16)
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    with caplog.at_level(logging.WARNING, logger="sglang_dflash"):
        d = DFlashDrafter.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert "mask_embedding" in caplog.text and "ignoring 1 tensors" in caplog.text
    assert sum(p.numel() for p in d.parameters()) == sum(t.numel() for k, t in state.items() if k != "mask_embedding")
    assert torch.equal(d.layers[4].mlp.down_proj.weight, state["layers.4.mlp.down_proj.weight"])
    assert torch.allclose(d.rotary.inv_freq, 1.0 / (1e6 ** (torch.arange(0, 128, 2).float() / 128)))
    del state["layers.2.self_attn.k_norm.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors \['layers.2.self_attn.k_norm.weight'\]"):
        DFlashDrafter.from_pretrained(tmp_path, dtype=torch.bfloat16)


ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
    # Kimi-K2.5 / DeepSeek style: mscale fields (attention factor 1 when they are equal)
    "yarn_mscale": {"rope_type": "yarn", "factor": 64.0, "original_max_position_embeddings": 8, "mscale": 1.0,
                    "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1},
    # gpt-oss style: truncate off
    "yarn_no_truncate": {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 16,
                         "truncate": False, "beta_fast": 32.0, "beta_slow": 1.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
}


@pytest.mark.parametrize("name", list(ROPES))
def test_rope_matches_transformers(name):
    """The drafter's RoPE (any scaling a z-lab config may carry) against transformers' own: its rope init, its
    Qwen3 rotary embedding and apply_rotary_pos_emb, on positions past the original context."""
    from sglang_dflash.config import DFlashConfig
    from test_config import ZLAB_4B
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding, apply_rotary_pos_emb

    raw = {**ZLAB_4B, "max_position_embeddings": 512}
    if ROPES[name] is not None:
        raw["rope_parameters"] = {**ROPES[name], "rope_theta": 1e6}
    cfg = DFlashConfig.from_dict(raw)
    assert (cfg.rope_parameters is None) == (name == "default")
    ours = Rotary(cfg)
    hf = Qwen3Config(hidden_size=2560, num_attention_heads=32, head_dim=128, max_position_embeddings=512,
                     rope_parameters={**(ROPES[name] or {"rope_type": "default"}), "rope_theta": 1e6})
    x = torch.randn(2, 7, 3, 128)  # [bs, n, heads, hd]
    pos = torch.tensor([[0, 1, 5, 100, 300, 511, 77], [3, 4, 9, 64, 65, 200, 400]])
    cos, sin = Qwen3RotaryEmbedding(hf)(x, pos)
    want, _ = apply_rotary_pos_emb(x.transpose(1, 2), x.transpose(1, 2), cos, sin)
    torch.testing.assert_close(ours(x, pos), want.transpose(1, 2), atol=1e-5, rtol=1e-5)
    assert ours.attention_factor != 1.0 or name not in ("yarn", "yarn_no_truncate")


def test_rope_types_that_depend_on_length_refused():
    from sglang_dflash.config import DFlashConfig
    from test_config import ZLAB_4B

    for rope_type in ("dynamic", "longrope"):
        with pytest.raises(ValueError, match=f"rope_type='{rope_type}'"):
            DFlashConfig.from_dict({**ZLAB_4B, "rope_scaling": {"type": rope_type, "factor": 2.0}})


def test_sliding_window_and_causal_layers():
    """A sliding-window layer sees the `sliding_window` latest positions up to its query's own (causal by default);
    keys outside it do not move the output, keys inside do; a window wider than everything, non-causal, is the
    full layer."""
    import dataclasses

    target = make_target()
    full = make_drafter(target, layers=2, block_size=4)
    cfg = dataclasses.replace(full.cfg, layer_types=("sliding_attention", "full_attention"), sliding_window=6)
    assert cfg.layer_attention(0) == (True, 5) and cfg.layer_attention(1) == (False, -1)
    slid = DFlashDrafter(cfg).eval()
    slid.load_state_dict(full.state_dict())
    C = 12
    feats = torch.randn(1, C, full.cfg.num_target_features * 32)
    pos, bpos = torch.arange(C)[None], torch.arange(C, C + 4)[None]
    emb = torch.randn(1, 4, 32)

    def run(d, f):
        with torch.no_grad():
            return d(emb, bpos, d.context_kv(d.project(f), pos))

    base = run(slid, feats)
    far, near = feats.clone(), feats.clone()
    far[0, 0] += 3.0  # position 0: outside every block query's window in layer 0 (but seen by the full layer 1)
    near[0, C - 1] += 3.0
    assert (run(slid, near) - base).abs().max() > 1e-3
    # layer 1 (full) still sees position 0, so compare a one-layer sliding drafter for the "outside" claim
    one = dataclasses.replace(cfg, num_hidden_layers=1, layer_types=("sliding_attention",))
    d1 = DFlashDrafter(one).eval()
    d1.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("layers.1.")})
    torch.testing.assert_close(run(d1, far), run(d1, feats))
    assert (run(d1, near) - run(d1, feats)).abs().max() > 1e-3
    wide = dataclasses.replace(cfg, sliding_window=10**6, is_causal=False)
    same = DFlashDrafter(wide).eval()
    same.load_state_dict(full.state_dict())
    torch.testing.assert_close(run(same, feats), run(full, feats))


@pytest.mark.parametrize("changes,words", [
    ({"layer_types": ["sliding_attention"] * 5}, ["sliding_window=None", "use_sliding_window"]),
    ({"layer_types": ["full_attention"] * 4}, ["layer_types", "(5)"]),
    ({"layer_types": ["linear_attention"] * 5}, ["layer_types", "'linear_attention'"]),
    ({"hidden_act": "nope"}, ["hidden_act='nope'"]),
])
def test_drafter_layer_config_errors(changes, words):
    from sglang_dflash.config import DFlashConfig
    from test_config import ZLAB_4B

    with pytest.raises(ValueError) as e:
        DFlashDrafter(DFlashConfig.from_dict({**ZLAB_4B, **changes}))
    missing = [w for w in words if w not in str(e.value)]
    assert not missing, str(e.value)
