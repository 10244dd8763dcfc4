"""Shared fixtures: tiny random Qwen3 targets and DFlash drafters, built in memory or on disk."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("TEST_TORCH_THREADS", "2")))


def make_target(vocab=64, hidden=32, layers=3, heads=4, kv_heads=2, head_dim=8, seed=0, tie=True):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie,
        eos_token_id=None, bos_token_id=None, pad_token_id=None,
    )
    model = Qwen3ForCausalLM(cfg).float().eval()
    # sharpen the random model a little so greedy decoding is not a coin toss on ties
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(20)
    return model


def make_drafter(target, *, layers=2, block_size=4, layer_ids=None, mask_token_id=None, kv_heads=None, seed=1):
    from sglang_dflash.config import DFlashConfig
    from sglang_dflash.drafter import DFlashDrafter
    from sglang_dflash.train import init_weights

    tc = target.config
    torch.manual_seed(seed)
    cfg = DFlashConfig(
        hidden_size=tc.hidden_size, intermediate_size=tc.hidden_size * 3, num_hidden_layers=layers,
        num_attention_heads=tc.num_attention_heads, num_key_value_heads=kv_heads or tc.num_key_value_heads,
        head_dim=tc.head_dim, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=tc.max_position_embeddings,
        block_size=block_size,
        target_layer_ids=tuple(layer_ids) if layer_ids else tuple(range(min(2, tc.num_hidden_layers))),
        mask_token_id=tc.vocab_size - 1 if mask_token_id is None else mask_token_id,
        num_target_layers=tc.num_hidden_layers, vocab_size=tc.vocab_size,
    )
    d = DFlashDrafter(cfg)
    init_weights(d, std=0.2)
    for m in d.modules():  # random norms, so a test also sees a wrong norm weight
        if hasattr(m, "eps") and hasattr(m, "weight"):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    return d.eval()


def train_drafter(target, drafter, prompts: list[list[int]], outputs: list[list[int]], steps: int) -> None:
    """A few full-batch AdamW steps of the drafter's training loss (train.py) on the target's own continuations
    of `prompts`, every response position an anchor."""
    from sglang_dflash.target import target_features
    from sglang_dflash.train import block_batch, block_logits, default_gamma, weighted_loss
    from sglang_dflash.train_data import Sequence

    cfg = drafter.cfg
    seqs = []
    with torch.no_grad():
        for p, o in zip(prompts, outputs):
            ids = torch.tensor([p + o])
            hidden = target(ids, output_hidden_states=True).hidden_states
            seqs.append(Sequence(ids[0], target_features(hidden, cfg.target_layer_ids)[0], len(p)))
    batch = block_batch(seqs, [torch.arange(s.prompt_len, len(s.tokens) - 1) for s in seqs], cfg.block_size,
                        cfg.mask_token_id, "cpu")
    embed, lm_head = target.get_input_embeddings(), target.get_output_embeddings()
    target.requires_grad_(False)
    opt = torch.optim.AdamW(drafter.parameters(), lr=3e-3)
    drafter.train()
    for _ in range(steps):
        loss = weighted_loss(block_logits(drafter, embed, lm_head, batch), batch["labels"], cfg.block_size,
                             default_gamma(cfg.block_size))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    drafter.eval()


@pytest.fixture(scope="session")
def tiny_pair():
    from sglang_dflash.assets import tiny_pair as _tiny_pair

    return _tiny_pair()


@pytest.fixture(scope="session")
def tiny_pair_models(tiny_pair):
    from sglang_dflash.reference import load_pair

    return load_pair(*tiny_pair)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: minutes; scripts/test.sh leaves it out (-m 'not slow'); run: -m slow")
