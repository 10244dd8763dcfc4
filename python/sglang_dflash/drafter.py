"""The DFlash drafter in plain PyTorch, loading and saving z-lab checkpoints.

Shapes: `bs` batch, `B` block size, `C` context tokens, `H` hidden, `K` target layers,
`nh`/`nkv` query/KV heads, `hd` head dim.

    context   = hidden_norm(fc(target_hidden))                      # [bs, C, K*H] -> [bs, C, H]
    per layer:  K/V = [k_norm(k_proj(context)) ; k_norm(k_proj(x))], [v_proj(context) ; v_proj(x)]
                Q   = q_norm(q_proj(x)),   x = input_layernorm(block hidden)
                RoPE at every token's absolute position; attention is NOT causal.
    output    = norm(h)  -> the target's lm_head gives draft logits; block position i predicts token i.

The context K/V of a layer depends only on the context, never on the block, so inference computes it
once per committed token (`context_kv`) and keeps it in a cache; the block's K/V is scratch.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import DFlashConfig

logger = logging.getLogger("sglang_dflash")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Rotary(nn.Module):
    """Neox-style rotary embedding (Qwen3's), cos/sin computed on the fly for given positions. RoPE scaling (yarn,
    llama3, linear: `cfg.rope_parameters`) comes from transformers' own `ROPE_INIT_FUNCTIONS`: the frequencies and
    the attention factor that scales cos and sin, as the z-lab reference (transformers' Qwen3 rotary) computes them."""

    def __init__(self, cfg: DFlashConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("inv_freq", torch.empty(cfg.head_dim // 2, dtype=torch.float32), persistent=False)
        self.attention_factor = 1.0
        self.reset()

    def reset(self) -> None:
        """(Re)compute inv_freq [hd/2], always float32 whatever the model's dtype (also after the module was
        built on the meta device or cast)."""
        with torch.device("cpu"):  # also when the module is built under a meta-device context
            inv_freq, self.attention_factor = rope_frequencies(self.cfg)
        self.inv_freq = inv_freq.to(self.inv_freq.device)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [bs, n, heads, hd], positions [bs, n] int64 -> x rotated, same shape and dtype."""
        freqs = positions[..., None].float() * self.inv_freq  # [bs, n, hd/2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]  # [bs, n, 1, hd]
        cos, sin = emb.cos() * self.attention_factor, emb.sin() * self.attention_factor
        x1, x2 = x.float().chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return (x.float() * cos + rotated * sin).to(x.dtype)


def rope_frequencies(cfg: DFlashConfig) -> tuple[torch.Tensor, float]:
    """-> (inv_freq [hd/2] float32 on the CPU, attention factor): plain RoPE at rope_theta, or transformers' init
    function for `cfg.rope_parameters` run on an equivalent Qwen3 config."""
    hd = cfg.head_dim
    if cfg.rope_parameters is None:
        return 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)), 1.0
    from transformers import Qwen3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {**cfg.rope_parameters, "rope_theta": cfg.rope_theta}
    hf = Qwen3Config(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads, head_dim=hd,
                     max_position_embeddings=cfg.max_position_embeddings, rope_parameters=params)
    inv_freq, factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf, "cpu")
    return inv_freq.float(), float(factor)  # host: a Python number from transformers' RoPE init


def visible_keys(key_positions: torch.Tensor, positions: torch.Tensor, causal: bool, window_left: int) -> torch.Tensor:
    """Which keys each block query sees in a layer: key_positions [bs, T], positions [bs, n] -> [bs, n, T] bool.
    Causal: keys at or before the query's position; a window: keys at most `window_left` positions before it."""
    diff = positions[:, :, None] - key_positions[:, None, :]  # query position - key position
    seen = torch.ones_like(diff, dtype=torch.bool)
    if causal:
        seen &= diff >= 0
    if window_left >= 0:
        seen &= diff <= window_left
    return seen


Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""The attention seam: (q [bs, n, nh, hd], block k, v [bs, n, nkv, hd]) -> [bs, n, nh*hd], attending
NON-causally over the layer's context K/V and the block's own. The reference passes `sdpa_over_context`;
SGLang's drafter passes its RadixAttention (context K/V in the KV pool)."""


def sdpa_over_context(ctx_k: torch.Tensor, ctx_v: torch.Tensor, mask: torch.Tensor | None) -> Attend:
    """Plain SDPA over [context ; block]: ctx_k/ctx_v [bs, C, nkv, hd]; mask [bs, n, C + n] bool
    (True = visible) or None (everything visible)."""

    def attend(q: torch.Tensor, k_blk: torch.Tensor, v_blk: torch.Tensor) -> torch.Tensor:
        bs, n, nh, hd = q.shape
        k = torch.cat([ctx_k.to(k_blk.dtype), k_blk], dim=1).transpose(1, 2)  # [bs, nkv, C+n, hd]
        v = torch.cat([ctx_v.to(v_blk.dtype), v_blk], dim=1).transpose(1, 2)
        groups = nh // k.shape[1]
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        attn_mask = None if mask is None else mask[:, None, :, :]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=attn_mask, is_causal=False)
        return out.transpose(1, 2).reshape(bs, n, nh * hd)

    return attend


class Linears:
    """How a drafter builds its projections: plain `nn.Linear` on one device (this class). SGLang's drafter
    passes tensor-parallel ones (`srt/parallel.ShardedLinears`): `heads` keeps this rank's heads of a
    projection (column-parallel), `column` this rank's share of the output features, `row` takes this
    rank's share of the input features and sums the ranks' partial outputs. Parameter names stay z-lab's."""

    def heads(self, in_features: int, num_heads: int, head_dim: int, bias: bool) -> tuple[nn.Module, int]:
        """-> a projection [..., in] -> [..., local heads * head_dim], and the number of local heads."""
        return nn.Linear(in_features, num_heads * head_dim, bias=bias), num_heads

    def column(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def row(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)


class DrafterAttention(nn.Module):
    def __init__(self, cfg: DFlashConfig, rotary: Rotary, linears: Linears) -> None:
        super().__init__()
        H, hd, bias = cfg.hidden_size, cfg.head_dim, cfg.attention_bias
        self.hd = hd
        # nh / nkv: the heads this module computes (all of them unless `linears` shards them)
        self.q_proj, self.nh = linears.heads(H, cfg.num_attention_heads, hd, bias)
        self.k_proj, self.nkv = linears.heads(H, cfg.num_key_value_heads, hd, bias)
        self.v_proj, _ = linears.heads(H, cfg.num_key_value_heads, hd, bias)
        self.o_proj = linears.row(cfg.num_attention_heads * hd, H, bias)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.rotary = [rotary]  # shared, not a submodule of each layer

    def kv(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [bs, n, H], positions [bs, n] -> k, v [bs, n, nkv, hd] (k normed and rotated)."""
        bs, n, _ = x.shape
        k = self.k_norm(self.k_proj(x).view(bs, n, self.nkv, self.hd))
        v = self.v_proj(x).view(bs, n, self.nkv, self.hd)
        return self.rotary[0](k, positions), v

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        """x [bs, n, H] normed block hidden, positions [bs, n] int64 -> [bs, n, H]."""
        bs, n, _ = x.shape
        q = self.rotary[0](self.q_norm(self.q_proj(x).view(bs, n, self.nh, self.hd)), positions)
        k, v = self.kv(x, positions)
        return self.o_proj(attend(q, k, v))


class DrafterMLP(nn.Module):
    def __init__(self, cfg: DFlashConfig, linears: Linears) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        if cfg.hidden_act not in ACT2FN:
            raise ValueError(f"DFlash config: hidden_act={cfg.hidden_act!r}, expected one of transformers' "
                             f"activations ({', '.join(sorted(ACT2FN))})")
        self.act = ACT2FN[cfg.hidden_act]
        self.gate_proj = linears.column(cfg.hidden_size, cfg.intermediate_size, False)
        self.up_proj = linears.column(cfg.hidden_size, cfg.intermediate_size, False)
        self.down_proj = linears.row(cfg.intermediate_size, cfg.hidden_size, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DrafterLayer(nn.Module):
    def __init__(self, cfg: DFlashConfig, rotary: Rotary, linears: Linears) -> None:
        super().__init__()
        self.self_attn = DrafterAttention(cfg, rotary, linears)
        self.mlp = DrafterMLP(cfg, linears)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        """h [bs, n, H] block hidden, positions [bs, n] -> h after this layer [bs, n, H]."""
        h = h + self.self_attn(self.input_layernorm(h), positions, attend)
        return h + self.mlp(self.post_attention_layernorm(h))


class DFlashDrafter(nn.Module):
    """z-lab `DFlashDraftModel`-compatible drafter (same parameter names). `linears` builds the layers'
    projections: plain `nn.Linear` by default; SGLang's drafter shards them over its tensor-parallel ranks
    (`fc`, the norms and RoPE are replicated)."""

    def __init__(self, cfg: DFlashConfig, linears: Linears | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        linears = linears or Linears()
        self.rotary = Rotary(cfg)
        self.layers = nn.ModuleList(DrafterLayer(cfg, self.rotary, linears) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.fc = nn.Linear(cfg.num_target_features * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def project(self, target_hidden: torch.Tensor) -> torch.Tensor:
        """target_hidden [..., K*H] (concatenated target layer outputs) -> context [..., H]."""
        return self.hidden_norm(self.fc(target_hidden))

    def context_kv(
        self, context: torch.Tensor, positions: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """context [bs, C, H], positions [bs, C] -> per layer (k, v) [bs, C, nkv, hd]."""
        return [layer.self_attn.kv(context, positions) for layer in self.layers]

    def forward(
        self,
        block_embeds: torch.Tensor,  # [bs, Q, H] target embeddings of the block ids
        positions: torch.Tensor,  # [bs, Q] int64 absolute positions of the block
        ctx_kv: list[tuple[torch.Tensor, torch.Tensor]],  # per layer [bs, C, nkv, hd] each
        mask: torch.Tensor | None = None,  # [bs, Q, C + Q] bool, None = everything visible
        ctx_positions: torch.Tensor | None = None,  # [bs, C] int64; None = 0..C-1
    ) -> torch.Tensor:
        """-> drafter hidden [bs, Q, H] after the final norm. A causal or sliding-window layer
        (`cfg.layer_attention`) also hides the keys its positions rule out."""
        h = block_embeds
        keys = None
        for i, (layer, (k, v)) in enumerate(zip(self.layers, ctx_kv)):
            layer_mask = mask
            causal, window_left = self.cfg.layer_attention(i)
            if causal or window_left >= 0:
                if keys is None:
                    C = k.shape[1]
                    ctx = torch.arange(C, device=positions.device).expand(positions.shape[0], C) \
                        if ctx_positions is None else ctx_positions
                    keys = torch.cat([ctx, positions], dim=1)  # [bs, C + Q]
                seen = visible_keys(keys, positions, causal, window_left)
                layer_mask = seen if mask is None else mask & seen
            h = layer(h, positions, sdpa_over_context(k, v, layer_mask))
        return self.norm(h)

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        block_size: int | None = None,
    ) -> "DFlashDrafter":
        """Load a z-lab drafter directory (config.json + *.safetensors or pytorch_model.bin),
        through `load_weights_into` (all tensors present; extras skipped with a warning)."""
        cfg = DFlashConfig.from_pretrained(path, block_size=block_size)
        with torch.device("meta"):  # no random init of weights that are overwritten at once
            model = cls(cfg)
        model = model.to_empty(device=device).to(dtype)
        model.rotary.reset()
        load_weights_into(model.state_dict(), load_state_dict(Path(path)).items(), str(path))
        return model.eval()

    def save_pretrained(self, path: str | Path, *, dtype: torch.dtype | None = None) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cast = (lambda t: t.to(dtype)) if dtype else (lambda t: t)  # noqa: E731
        state = {k: cast(v).contiguous().cpu() for k, v in self.state_dict().items()}  # sync: saving, not a step
        save_file(state, path / "model.safetensors", metadata={"format": "pt"})
        raw = self.cfg.to_dict()
        raw["dtype"] = str(dtype or next(self.parameters()).dtype).removeprefix("torch.")
        (path / "config.json").write_text(json.dumps(raw, indent=2) + "\n")


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory; a `model.` prefix (some exports add it) is removed."""
    files = sorted(path.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    if files:
        from safetensors.torch import load_file

        for f in files:
            try:
                state.update(load_file(f))
            except Exception as e:  # safetensors raises its own error types for corrupt files
                raise ValueError(f"DFlash drafter: cannot read {str(f)!r}: {e}") from None
    elif (path / "pytorch_model.bin").is_file():
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"DFlash drafter: {str(path)!r} has no *.safetensors or pytorch_model.bin weights")
    return {k.removeprefix("model."): v for k, v in state.items()}


def load_weights_into(own: dict[str, torch.Tensor], weights: Iterable[tuple[str, torch.Tensor]], where: str,
                      copy: Callable[[str, torch.Tensor], None] | None = None) -> None:
    """Copy checkpoint tensors into a drafter's state (`DFlashDrafter.state_dict()`): every tensor present with
    its shape (else ValueError); tensors the drafter does not use are skipped with a warning naming them (z-lab
    checkpoints may carry extras). A `model.` prefix is removed. `weights` may read files lazily
    (SGLang's loader does): a read error names the checkpoint. The one weight check of both drafters.
    `copy(name, tensor)` replaces the plain copy into `own[name]`: a tensor-parallel drafter passes `own` with
    the full (checkpoint) shapes and a copy that keeps its rank's share (`srt/models/draft_model.py`)."""
    seen: set[str] = set()
    unexpected: list[str] = []
    it = iter(weights)
    while True:
        try:
            name, tensor = next(it)
        except StopIteration:
            break
        except Exception as e:  # safetensors / torch raise their own types for corrupt files
            raise ValueError(f"DFlash drafter: cannot read the weights in {where!r} ({type(e).__name__}: {e})") from e
        name = name.removeprefix("model.")
        if name not in own:
            unexpected.append(name)
            continue
        if own[name].shape != tensor.shape:
            raise ValueError(f"DFlash drafter {where!r}: tensor {name} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(own[name].shape)}")
        with torch.no_grad():
            if copy is None:
                own[name].copy_(tensor)
            else:
                copy(name, tensor)
        seen.add(name)
    missing = sorted(set(own) - seen)
    if missing:
        raise ValueError(f"DFlash drafter {where!r}: checkpoint does not match the config: missing tensors "
                         f"{missing}" + (f" (it holds other tensors: {sorted(unexpected)})" if unexpected else ""))
    if unexpected:  # z-lab exports may carry extras the drafter does not use (SGLang's own loader skips them)
        logger.warning("DFlash drafter %r: ignoring %d tensors the drafter does not use: %s", where, len(unexpected),
                       sorted(unexpected)[:10])
