"""DFlashConfig: the drafter's configuration, parsed once from a z-lab drafter directory.

A z-lab drafter's `config.json` is a Qwen3 config plus `block_size`, `num_target_layers` and
`dflash_config: {target_layer_ids, mask_token_id, block_size}`. Older checkpoints lack `dflash_config`;
then `target_layer_ids` is spread evenly over the target (`default_target_layer_ids`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def default_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> tuple[int, ...]:
    """The reference's even spread: one id -> [L // 2]; else round(1 + i * (L - 4) / (n - 1))."""
    if num_draft_layers == 1:
        return (num_target_layers // 2,)
    start, end = 1, num_target_layers - 3
    step = (end - start) / (num_draft_layers - 1)
    return tuple(int(round(start + i * step)) for i in range(num_draft_layers))


@dataclass(frozen=True)
class DFlashConfig:
    """Everything the drafter needs; validated in `__post_init__`, checked against a target by
    `validate_against_target`. Field names follow the HF Qwen3 config."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int  # drafter layers
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    block_size: int
    target_layer_ids: tuple[int, ...]
    mask_token_id: int
    num_target_layers: int
    attention_bias: bool = False
    vocab_size: int | None = None
    # RoPE scaling as transformers' `rope_parameters` without rope_theta (rope_type yarn / llama3 / linear and its
    # fields); None = plain RoPE at rope_theta
    rope_parameters: dict[str, Any] | None = None
    hidden_act: str = "silu"
    # per drafter layer "full_attention" or "sliding_attention" (None: every layer full); a sliding layer sees the
    # `sliding_window` most recent positions up to its own (HF's window, the token itself included)
    layer_types: tuple[str, ...] | None = None
    sliding_window: int | None = None
    # None: full layers non-causal (DFlash), sliding layers causal (SGLang 0.5.23's reading); True / False forces all
    is_causal: bool | None = None

    def __post_init__(self) -> None:
        positive = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "num_target_layers")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DFlash config: {name}={value!r}, expected a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"DFlash config: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if not isinstance(self.block_size, int) or self.block_size < 2:
            raise ValueError(f"DFlash config: block_size={self.block_size!r}, expected an integer >= 2")
        if not self.target_layer_ids:
            raise ValueError("DFlash config: target_layer_ids=(), expected at least one target layer id")
        for i in self.target_layer_ids:
            if not isinstance(i, int) or not 0 <= i < self.num_target_layers:
                raise ValueError(
                    f"DFlash config: target_layer_ids={list(self.target_layer_ids)} holds {i!r}, "
                    f"expected ids in [0, {self.num_target_layers}) (num_target_layers)"
                )
        if len(set(self.target_layer_ids)) != len(self.target_layer_ids):
            raise ValueError(f"DFlash config: target_layer_ids={list(self.target_layer_ids)} repeats a layer, "
                             "expected distinct ids")
        if not isinstance(self.mask_token_id, int) or self.mask_token_id < 0:
            raise ValueError(f"DFlash config: mask_token_id={self.mask_token_id!r}, expected an integer >= 0")
        if self.rope_parameters is not None:
            rope_type = self.rope_parameters.get("rope_type")
            if rope_type not in POSITION_ONLY_ROPE_TYPES:
                raise ValueError(f"DFlash config: rope_type={rope_type!r}, expected one of "
                                 f"{sorted(POSITION_ONLY_ROPE_TYPES)} (RoPE that depends on the position alone)")
            if self.rope_parameters.get("partial_rotary_factor", 1.0) != 1.0:
                raise ValueError(f"DFlash config: partial_rotary_factor={self.rope_parameters['partial_rotary_factor']}"
                                 ", expected 1.0 (RoPE over the whole head)")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= LAYER_TYPES:
                raise ValueError(f"DFlash config: layer_types={list(self.layer_types)}, expected one of "
                                 f"{sorted(LAYER_TYPES)} per drafter layer ({self.num_hidden_layers})")
            window = self.sliding_window
            if "sliding_attention" in self.layer_types and (not isinstance(window, int) or window < 1):
                raise ValueError(f"DFlash config: sliding_window={window!r}, expected a positive integer for the "
                                 "sliding_attention layers (transformers' Qwen3Config keeps sliding_window only "
                                 "with use_sliding_window: true)")

    def layer_attention(self, i: int) -> tuple[bool, int]:
        """Drafter layer i's attention: (causal, window_left), window_left = -1 for no window, else the positions
        before a query's own it sees (SGLang's window_left: `sliding_window` - 1)."""
        kind = "full_attention" if self.layer_types is None else self.layer_types[i]
        if kind == "sliding_attention":
            return (True if self.is_causal is None else self.is_causal), self.sliding_window - 1
        return bool(self.is_causal), -1

    @property
    def num_target_features(self) -> int:
        """K: the number of target layers whose hidden states feed the drafter."""
        return len(self.target_layer_ids)

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, block_size: int | None = None) -> "DFlashConfig":
        """Parse a z-lab drafter config dict. `block_size` overrides the checkpoint's (the drafter
        runs at any block size; it was trained at one)."""
        dflash = raw.get("dflash_config") or {}
        required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in raw]
        if missing:
            raise ValueError(f"DFlash config: missing fields {missing}; is this a DFlash drafter config?")
        num_layers = raw["num_hidden_layers"]
        num_target_layers = raw.get("num_target_layers")
        if num_target_layers is None:
            raise ValueError("DFlash config: missing field 'num_target_layers'")
        ids = dflash.get("target_layer_ids")
        if ids is None:
            ids = default_target_layer_ids(num_target_layers, num_layers)
        mask = dflash.get("mask_token_id", raw.get("mask_token_id"))
        if mask is None:
            raise ValueError(
                "DFlash config: no mask_token_id (expected dflash_config.mask_token_id or mask_token_id)"
            )
        bs = block_size if block_size is not None else dflash.get("block_size", raw.get("block_size"))
        if bs is None:
            raise ValueError("DFlash config: no block_size (expected block_size or dflash_config.block_size)")
        heads = raw["num_attention_heads"]
        layer_types = raw.get("layer_types")
        if layer_types is not None and list(layer_types) == ["full_attention"] * num_layers:
            layer_types = None  # the default, as z-lab configs spell it out
        return cls(
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads", heads),
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(_rope_theta(raw)),
            rope_parameters=rope_parameters(raw),
            hidden_act=raw.get("hidden_act") or "silu",
            layer_types=None if layer_types is None else tuple(layer_types),
            sliding_window=raw.get("sliding_window"),
            is_causal=raw.get("is_causal"),
            max_position_embeddings=raw.get("max_position_embeddings", 32768),
            block_size=bs,
            target_layer_ids=tuple(ids),
            mask_token_id=mask,
            num_target_layers=num_target_layers,
            attention_bias=bool(raw.get("attention_bias", False)),
            vocab_size=raw.get("vocab_size"),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path, *, block_size: int | None = None) -> "DFlashConfig":
        path = Path(path)
        cfg = path / "config.json"
        if not path.is_dir():
            raise ValueError(f"DFlash drafter: {str(path)!r} is not a directory (expected a z-lab drafter dir)")
        if not cfg.is_file():
            raise ValueError(f"DFlash drafter: {str(path)!r} has no config.json")
        try:
            raw = json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"DFlash drafter: {str(cfg)!r} is not valid JSON ({e})") from None
        return cls.from_dict(raw, block_size=block_size)

    def to_dict(self) -> dict[str, Any]:
        """The z-lab `config.json` layout (a Qwen3 config with DFlash fields)."""
        out: dict[str, Any] = {
            "architectures": ["DFlashDraftModel"],
            "model_type": "qwen3",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": self.attention_bias,
            "hidden_act": self.hidden_act,
            "layer_types": list(self.layer_types or ["full_attention"] * self.num_hidden_layers),
            "block_size": self.block_size,
            "num_target_layers": self.num_target_layers,
            "dflash_config": {
                "target_layer_ids": list(self.target_layer_ids),
                "mask_token_id": self.mask_token_id,
                "block_size": self.block_size,
            },
        }
        if self.vocab_size is not None:
            out["vocab_size"] = self.vocab_size
        if self.rope_parameters is not None:
            out["rope_parameters"] = {**self.rope_parameters, "rope_theta": self.rope_theta}
        if self.sliding_window is not None:  # transformers' Qwen3Config drops it without use_sliding_window
            out.update(sliding_window=self.sliding_window, use_sliding_window=True)
        if self.is_causal is not None:
            out["is_causal"] = self.is_causal
        return out

    def validate_against_target(self, target: Any) -> None:
        """Check this drafter fits a target config (an HF `PretrainedConfig` or a dict)."""
        get = target.get if isinstance(target, dict) else (lambda k, d=None: getattr(target, k, d))
        t_hidden = get("hidden_size")
        t_layers = get("num_hidden_layers")
        t_vocab = get("vocab_size")
        if t_hidden != self.hidden_size:
            raise ValueError(
                f"DFlash drafter: hidden_size={self.hidden_size}, expected the target's hidden_size={t_hidden}"
            )
        for i in self.target_layer_ids:
            if not 0 <= i < t_layers:
                raise ValueError(
                    f"DFlash drafter: target_layer_ids={list(self.target_layer_ids)} holds {i}, expected ids "
                    f"in [0, {t_layers}) (the target has {t_layers} layers)"
                )
        if not 0 <= self.mask_token_id < t_vocab:
            raise ValueError(
                f"DFlash drafter: mask_token_id={self.mask_token_id}, expected an id in [0, {t_vocab}) "
                f"(the target's embedding rows)"
            )


def capture_order(layer_ids: tuple[int, ...]) -> list[int] | None:
    """SGLang's target models hand over the drafter's layers in the order their forward runs them (ascending ids);
    the drafter's fc reads them in its config's order (the z-lab reference concatenates in that order). -> for each
    config position, the index of its layer among the captured ones; None when the two orders agree."""
    ranked = sorted(layer_ids)
    order = [ranked.index(i) for i in layer_ids]
    return None if order == list(range(len(order))) else order


def check_for_sglang(draft_hf_config: Any, target_hf_config: Any, block_size: int | None) -> DFlashConfig:
    """Start-up check of a drafter served by SGLang, before any drafter weight is read: the drafter fits
    the target's language model (`validate_against_target` on its text config), and every target layer it reads can
    be captured. `block_size` None: the drafter's own. Each error names the bad value."""
    from .families import as_dict, text_config

    cfg = DFlashConfig.from_dict(as_dict(draft_hf_config), block_size=block_size)
    target = text_config(target_hf_config)
    cfg.validate_against_target(target)
    n_layers = target["num_hidden_layers"]
    last = max(cfg.target_layer_ids)
    if last >= n_layers - 1:
        raise ValueError(
            f"DFlash drafter: target_layer_ids={list(cfg.target_layer_ids)} holds {last}, the target's last layer; "
            f"SGLang captures a layer's output as the next layer's input, so ids must be < {n_layers - 1}"
        )
    return cfg


def check_target_model(target_model: Any) -> None:
    """The SGLang target model class must capture hidden states at the drafter's layers."""
    if not hasattr(target_model, "set_dflash_layers_to_capture"):
        raise ValueError(
            f"DFlash: target model class {type(target_model).__name__} cannot capture hidden states "
            "(it has no set_dflash_layers_to_capture); use a target such as Qwen3 or Llama"
        )


# RoPE types whose rotation depends on the position alone (transformers' ROPE_INIT_FUNCTIONS names); "dynamic" and
# "longrope" also depend on the sequence length and are refused
POSITION_ONLY_ROPE_TYPES = frozenset({"linear", "yarn", "llama3"})
LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})


def rope_parameters(raw: dict[str, Any]) -> dict[str, Any] | None:
    """The RoPE scaling of an HF config, from transformers 5's `rope_parameters` or the older `rope_scaling` (`type`
    read as `rope_type`), without rope_theta; None for plain RoPE."""
    params = {**(raw.get("rope_scaling") or {}), **(raw.get("rope_parameters") or {})}
    if "type" in params:
        params.setdefault("rope_type", params.pop("type"))
    params.pop("rope_theta", None)
    if params.get("rope_type", "default") == "default":
        return None
    return params


def _rope_theta(raw: dict[str, Any]) -> float:
    if "rope_theta" in raw:
        return raw["rope_theta"]
    params = raw.get("rope_parameters") or {}
    return params.get("rope_theta", 10000.0)
