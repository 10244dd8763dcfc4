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
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import DFlashConfig


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
    """Neox-style rotary embedding (Qwen3's), cos/sin computed on the fly for given positions."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [bs, n, heads, hd], positions [bs, n] int64 -> x rotated, same shape and dtype."""
        freqs = positions[..., None].float() * self.inv_freq  # [bs, n, hd/2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]  # [bs, n, 1, hd]
        cos, sin = emb.cos(), emb.sin()
        x1, x2 = x.float().chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return (x.float() * cos + rotated * sin).to(x.dtype)


class DrafterAttention(nn.Module):
    def __init__(self, cfg: DFlashConfig, rotary: Rotary) -> None:
        super().__init__()
        H, hd = cfg.hidden_size, cfg.head_dim
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.q_proj = nn.Linear(H, self.nh * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(H, self.nkv * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(H, self.nkv * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.nh * hd, H, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.rotary = [rotary]  # shared, not a submodule of each layer

    def kv(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [bs, n, H], positions [bs, n] -> k, v [bs, n, nkv, hd] (k normed and rotated)."""
        bs, n, _ = x.shape
        k = self.k_norm(self.k_proj(x).view(bs, n, self.nkv, self.hd))
        v = self.v_proj(x).view(bs, n, self.nkv, self.hd)
        return self.rotary[0](k, positions), v

    def forward(
        self,
        x: torch.Tensor,  # [bs, Q, H] normed block hidden
        positions: torch.Tensor,  # [bs, Q] int64
        ctx_k: torch.Tensor,  # [bs, C, nkv, hd]
        ctx_v: torch.Tensor,  # [bs, C, nkv, hd]
        mask: torch.Tensor | None,  # [bs, Q, C + Q] bool (True = visible) or None = all visible
    ) -> torch.Tensor:
        bs, q_len, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(bs, q_len, self.nh, self.hd))
        q = self.rotary[0](q, positions)
        k_blk, v_blk = self.kv(x, positions)
        k = torch.cat([ctx_k, k_blk], dim=1).transpose(1, 2)  # [bs, nkv, C+Q, hd]
        v = torch.cat([ctx_v, v_blk], dim=1).transpose(1, 2)
        groups = self.nh // self.nkv
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        attn_mask = None if mask is None else mask[:, None, :, :]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=attn_mask, is_causal=False)
        return self.o_proj(out.transpose(1, 2).reshape(bs, q_len, self.nh * self.hd))


class DrafterMLP(nn.Module):
    def __init__(self, cfg: DFlashConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DrafterLayer(nn.Module):
    def __init__(self, cfg: DFlashConfig, rotary: Rotary) -> None:
        super().__init__()
        self.self_attn = DrafterAttention(cfg, rotary)
        self.mlp = DrafterMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, positions, ctx_k, ctx_v, mask):
        h = h + self.self_attn(self.input_layernorm(h), positions, ctx_k, ctx_v, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class DFlashDrafter(nn.Module):
    """z-lab `DFlashDraftModel`-compatible drafter (same parameter names)."""

    def __init__(self, cfg: DFlashConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)
        self.layers = nn.ModuleList(DrafterLayer(cfg, self.rotary) for _ in range(cfg.num_hidden_layers))
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
    ) -> torch.Tensor:
        """-> drafter hidden [bs, Q, H] after the final norm."""
        h = block_embeds
        for layer, (k, v) in zip(self.layers, ctx_kv):
            h = layer(h, positions, k.to(h.dtype), v.to(h.dtype), mask)
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
        with strict key checking."""
        cfg = DFlashConfig.from_pretrained(path, block_size=block_size)
        state = load_state_dict(Path(path))
        model = cls(cfg)
        expected = set(model.state_dict())
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(
                f"DFlash drafter {str(path)!r}: checkpoint does not match the config: "
                f"missing tensors {missing}, unexpected tensors {unexpected}"
            )
        for name, param in model.state_dict().items():
            if state[name].shape != param.shape:
                raise ValueError(
                    f"DFlash drafter {str(path)!r}: tensor {name} has shape {tuple(state[name].shape)}, "
                    f"expected {tuple(param.shape)}"
                )
        model.load_state_dict(state, strict=True)
        return model.to(device=device, dtype=dtype).eval()

    def save_pretrained(self, path: str | Path, *, dtype: torch.dtype | None = None) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: (v.to(dtype) if dtype else v).contiguous().cpu() for k, v in self.state_dict().items()}
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
