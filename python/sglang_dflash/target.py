"""The target model outside SGLang (reference loop, training): loading it and reading its features.

    target_features   HF `output_hidden_states` -> target_hidden [bs, n, K*H], the drafter's input
"""

from __future__ import annotations

from pathlib import Path

import torch


def target_features(hidden_states: tuple[torch.Tensor, ...], layer_ids: tuple[int, ...]) -> torch.Tensor:
    """HF `output_hidden_states` -> [bs, n, K*H]: the OUTPUT of each target layer in `layer_ids`
    (`hidden_states[0]` is the embedding, so layer i's output is `hidden_states[i + 1]`)."""
    return torch.cat([hidden_states[i + 1] for i in layer_ids], dim=-1)


def load_target(path: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """An HF causal LM directory -> the model in eval mode."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"target: {str(path)!r} is not a model directory (no config.json)")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def default_stop_ids(target) -> frozenset[int]:
    """The target's EOS ids, from its config and its generation config."""
    ids: set[int] = set()
    for cfg in (target.config, getattr(target, "generation_config", None)):
        eos = getattr(cfg, "eos_token_id", None)
        if eos is None:
            continue
        ids.update([eos] if isinstance(eos, int) else eos)
    return frozenset(ids)
