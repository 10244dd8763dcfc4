"""Target families: which targets the DFLASH worker serves, and a refusal naming the reason for the rest.

The worker's rollback of a rejected draft is free only when a target's decode state is its attention KV cache:
the rejected tokens' slots are simply overwritten later. A target with RECURRENT layers advances a per-request
state over every token of the verify block, accepted or not. For Gated DeltaNet linear attention (Qwen3-Next,
Qwen3-Coder-Next, Qwen3.5 / Qwen3.6) the worker commits the state after the accepted prefix after every verify
(`srt.worker.commit_states`); on CPU the GDN kernels are our torch ones (`srt.cpu_gdn`), written for Qwen3-Next's
layer only, so the other GDN families are refused there. Other recurrent layers (Mamba, KDA, lightning attention)
are not committed: serving them would give WRONG output, so they are refused before anything starts.

Multi-head latent attention (MLA: DeepSeek-V3, Kimi-K2 / K2.5) and attention sinks (gpt-oss) have no CPU attention
backend in SGLang 0.5.23, so they are refused on CPU; on a GPU they are served through SGLang's own attention backends,
unverified so far (docs/gpu.md).

Everything here reads an HF config (a `PretrainedConfig` or its dict); nothing imports SGLang.
"""

from __future__ import annotations

from typing import Any

# layer kinds an HF `layer_types` list may name whose state is only the attention KV cache
ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "attention", "chunked_attention"})
# model types whose layers keep a recurrent state (SGLang 0.5.23's `mambaish_config` families), for configs that
# do not list `layer_types`
RECURRENT_MODEL_TYPES = frozenset({
    "qwen3_next", "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text", "kimi_linear", "nemotron_h",
    "falcon_h1", "lfm2", "lfm2_moe", "mamba", "mamba2", "falcon_mamba", "zamba", "zamba2", "jet_nemotron",
    "bailing_hybrid", "minicpm_hybrid",
})
# Gated DeltaNet hybrids: served (the worker commits their state after verify); on CPU only those whose GDN layer
# code runs with our torch pieces (srt/cpu_gdn.py: Qwen3-Next's layer)
GDN_MODEL_TYPES = frozenset({"qwen3_next", "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text"})
CPU_GDN_MODEL_TYPES = frozenset({"qwen3_next"})
# model types whose attention has per-head sinks (an extra logit in every softmax denominator)
SINK_MODEL_TYPES = frozenset({"gpt_oss"})
# config fields only recurrent layers have
RECURRENT_FIELDS = ("linear_num_value_heads", "linear_conv_kernel_dim", "mamba_d_state", "ssm_state_size",
                    "linear_attn_config", "mamba2_cache_params")


def as_dict(config: Any) -> dict[str, Any]:
    """An HF config or a dict -> a plain dict (nested configs as dicts)."""
    if isinstance(config, dict):
        return config
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(f"expected an HF PretrainedConfig or a dict, got {type(config).__name__}")


def text_config(config: Any) -> dict[str, Any]:
    """The language model's config of a target: the config itself, or its `text_config` (Qwen3.5 / Qwen3.6,
    Kimi-K2.5 and other multimodal composites keep the decoder's fields there, as transformers'
    `get_text_config()` does)."""
    raw = as_dict(config)
    for key in ("text_config", "language_config", "llm_config"):
        inner = raw.get(key)
        if isinstance(inner, dict) and "hidden_size" in inner:
            return inner
        if inner is not None and hasattr(inner, "to_dict"):
            return inner.to_dict()
    return raw


def recurrent_layers(text: dict[str, Any]) -> str | None:
    """What makes a target's layers recurrent (a phrase for the refusal), or None when every layer is attention."""
    kinds = sorted({t for t in text.get("layer_types") or () if t not in ATTENTION_LAYER_TYPES})
    if kinds:
        return f"layer_types {kinds}"
    fields = [f for f in RECURRENT_FIELDS if text.get(f) is not None]
    if fields:
        return f"recurrent-state fields {fields}"
    if text.get("model_type") in RECURRENT_MODEL_TYPES:
        return f"model_type {text['model_type']!r}"
    return None


def recurrent_refusal(model_type: str, why: str) -> str:
    return (f"sglang-dflash: target model_type {model_type!r} has recurrent (linear-attention / state-space) layers "
            f"({why}); the verify forward advances their state over every draft token and this worker rolls it back "
            "to the accepted prefix only for Gated DeltaNet layers, so it would serve wrong output. Serve this "
            "target without speculation (or with SGLang's own DFLASH: SGLANG_PLUGINS=<other plugins> leaves ours "
            "out)")


def refusal(target_config: Any, device: str) -> str | None:
    """Why the worker cannot serve this target on `device` (a sentence naming the reason), or None."""
    text = text_config(target_config)
    name = text.get("model_type") or as_dict(target_config).get("model_type") or "?"
    recurrent = recurrent_layers(text)
    if recurrent is not None and text.get("model_type") in GDN_MODEL_TYPES:
        if text["model_type"] not in CPU_GDN_MODEL_TYPES and not str(device).startswith("cuda"):
            return (f"sglang-dflash: target model_type {name!r} has Gated DeltaNet layers whose SGLang 0.5.23 layer "
                    f"code runs only Triton / CUDA kernels; on device {device!r} only {sorted(CPU_GDN_MODEL_TYPES)} "
                    "targets are served (srt/cpu_gdn.py); serve it on a GPU")
    elif recurrent is not None:
        return recurrent_refusal(name, recurrent)
    if text.get("model_type") in SINK_MODEL_TYPES and not str(device).startswith("cuda"):
        return (f"sglang-dflash: target model_type {name!r} uses attention sinks, which SGLang 0.5.23's torch_native "
                f"attention backend does not implement, so no attention backend serves it on device {device!r}; "
                "serve it on a GPU")
    if text.get("kv_lora_rank") is not None and not str(device).startswith("cuda"):
        return (f"sglang-dflash: target model_type {name!r} uses multi-head latent attention (kv_lora_rank="
                f"{text['kv_lora_rank']}), which no SGLang 0.5.23 attention backend runs on device {device!r}; "
                "serve it on a GPU")
    return None


def check_target(target_config: Any, device: str) -> None:
    """Raise ValueError with `refusal`'s reason when the worker cannot serve this target."""
    reason = refusal(target_config, device)
    if reason is not None:
        raise ValueError(reason)
