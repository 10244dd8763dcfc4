"""The worker's context K/V write (`srt/context.ContextWriter`) on a pool laid out like SGLang's
MHATokenToKVPool: the stacked path (kernel `context_kv`) and the per-layer fallback both write exactly the
drafter's own per-layer K/V, and only at the given slots."""

from __future__ import annotations

import types

import pytest
import torch


class FakePool:
    """The parts of SGLang 0.5.23's MHATokenToKVPool the writer touches: per-layer K/V views of one
    [2, slots, heads, dim] allocation each, dtype / store_dtype, and set_kv_buffer."""

    def __init__(self, layers: int, slots: int, nkv: int, hd: int, quantized: bool = False) -> None:
        self.fused = [torch.full((2, slots, nkv, hd), float("nan")) for _ in range(layers)]
        self.k_buffer = [f[0] for f in self.fused]
        self.v_buffer = [f[1] for f in self.fused]
        self.dtype = self.store_dtype = torch.float32
        self.is_quantized_kv_cache = quantized
        self.set_calls = 0

    def set_kv_buffer(self, layer, loc_info, k, v) -> None:
        from sglang.srt.mem_cache.memory_pool import unwrap_write_loc

        loc, _, _ = unwrap_write_loc(loc_info)
        self.k_buffer[layer.layer_id][loc] = k
        self.v_buffer[layer.layer_id][loc] = v
        self.set_calls += 1


def _model(bias: bool):
    from sglang_dflash.config import DFlashConfig
    from sglang_dflash.srt.models.draft_model import DFlashDraftModel

    cfg = DFlashConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0,
                       max_position_embeddings=512, block_size=4, target_layer_ids=(0, 1), mask_token_id=5,
                       num_target_layers=4, vocab_size=50, attention_bias=bias)
    from sglang.srt.runtime_context import get_parallel

    with get_parallel().override(tp_rank=0, tp_size=1):  # outside a server: one rank, as SGLang would state it
        model = DFlashDraftModel(types.SimpleNamespace(to_dict=cfg.to_dict))
    torch.manual_seed(3)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model.requires_grad_(False)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("chunk_rows", [2048, 4])  # 4: the 9 rows are written in three chunks
def test_context_writer_writes_the_drafters_kv(bias, quantized, chunk_rows, monkeypatch):
    from sglang_dflash.srt.context import ContextWriter

    monkeypatch.setattr(ContextWriter, "CHUNK_ROWS", chunk_rows)
    model = _model(bias)
    c = model.cfg
    pool = FakePool(c.num_hidden_layers, 40, c.num_key_value_heads, c.head_dim, quantized=quantized)
    writer = ContextWriter(model, types.SimpleNamespace(token_to_kv_pool=pool, device="cpu"))
    assert writer.fast is not quantized  # a quantized pool must take the per-layer path
    n = 9
    target_hidden = torch.randn(n, 2 * c.hidden_size)
    positions = torch.randint(0, 500, (n,))
    slots = torch.randperm(40)[:n]
    writer(target_hidden, positions, slots)
    assert pool.set_calls == (c.num_hidden_layers if quantized else 0)
    want = model.context_kv(model.project(target_hidden), positions)
    for layer, (k, v) in enumerate(want):
        torch.testing.assert_close(pool.k_buffer[layer][slots], k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pool.v_buffer[layer][slots], v, rtol=1e-5, atol=1e-5)
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[slots] = False
    assert all(f[:, untouched].isnan().all() for f in pool.fused)


def test_stacked_projection_follows_reloaded_weights():
    """`stacked_kv` is a cache: loading new weights must drop it, or the context would use stale K/V."""
    model = _model(False)
    w_before = model.stacked_kv()[0].clone()
    new = {name: torch.randn_like(t) for name, t in model.drafter.state_dict().items()}
    model.load_weights(new.items())
    w_after = model.stacked_kv()[0]
    assert not torch.equal(w_before, w_after)
    torch.testing.assert_close(w_after[: w_after.shape[0] // (2 * model.cfg.num_hidden_layers)],
                               new["layers.0.self_attn.k_proj.weight"])


def test_pool_with_other_head_shape_is_not_addressed_by_the_kernel():
    """The kernel takes the row layout from the drafter's config: a pool shaped otherwise must not get it."""
    from sglang_dflash.srt.context import ContextWriter

    model = _model(False)
    c = model.cfg
    pool = FakePool(c.num_hidden_layers, 40, c.num_key_value_heads * 2, c.head_dim // 2)
    assert not ContextWriter(model, types.SimpleNamespace(token_to_kv_pool=pool, device="cpu")).fast
