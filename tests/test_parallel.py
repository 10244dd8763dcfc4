"""The tensor-parallel pieces outside a server (`srt/parallel.py`, `srt/models/draft_model.checkpoint_config`):
how heads split, which drafters are refused, the vocab gather's order and padding cut, and RankSync's packing
(with a stand-in group whose broadcast delivers another rank's values). The served TP path is
tests/test_sglang_tp.py."""

from __future__ import annotations

import types

import pytest
import torch


def test_split_heads_like_sglang():
    from sglang_dflash.srt.parallel import split_heads

    assert [split_heads(8, r, 2) for r in range(2)] == [(0, 4), (4, 4)]
    assert [split_heads(4, r, 4) for r in range(4)] == [(0, 1), (1, 1), (2, 1), (3, 1)]
    # fewer heads than ranks (KV heads): each rank one head, shared by consecutive ranks
    assert [split_heads(2, r, 4) for r in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    assert [split_heads(1, r, 2) for r in range(2)] == [(0, 1), (0, 1)]
    with pytest.raises(ValueError, match="3 heads cannot be split over 2"):
        split_heads(3, 0, 2)


def _cfg(**kw):
    from sglang_dflash.config import DFlashConfig

    base = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=64,
                block_size=4, target_layer_ids=(0,), mask_token_id=1, num_target_layers=2)
    return DFlashConfig(**{**base, **kw})


def test_check_tensor_parallel_names_what_does_not_split():
    from sglang_dflash.srt.parallel import check_tensor_parallel

    check_tensor_parallel(_cfg(), 2)
    check_tensor_parallel(_cfg(num_key_value_heads=1), 2)  # one KV head, replicated on both ranks
    with pytest.raises(ValueError, match="num_attention_heads=4 does not divide by 8"):
        check_tensor_parallel(_cfg(), 8)
    with pytest.raises(ValueError, match="num_key_value_heads=2 neither divides by 3"):
        check_tensor_parallel(_cfg(num_attention_heads=6), 3)
    with pytest.raises(ValueError, match="intermediate_size=90 does not divide by 4"):
        check_tensor_parallel(_cfg(intermediate_size=90), 4)


def test_dp_attention_refused_with_the_reason():
    from sglang_dflash.srt.parallel import refuse_dp_attention

    refuse_dp_attention(types.SimpleNamespace(enable_dp_attention=False))
    with pytest.raises(ValueError, match="--enable-dp-attention is not supported: attention-DP ranks serve"):
        refuse_dp_attention(types.SimpleNamespace(enable_dp_attention=True))


def test_checkpoint_config_undoes_sglangs_cpu_padding():
    from sglang_dflash.srt.models.draft_model import checkpoint_config

    raw = {"intermediate_size": 128, "original_intermediate_size": 96, "num_attention_heads": 4,
           "original_num_attention_heads": 4, "num_key_value_heads": 2, "original_total_num_kv_heads": 2}
    assert checkpoint_config(raw)["intermediate_size"] == 96
    assert checkpoint_config({"intermediate_size": 96})["intermediate_size"] == 96


class _Gathered:
    """A stand-in TP group of 2 for rank 0: all_gather appends rank 1's shard."""

    world_size = 2

    def __init__(self, other: torch.Tensor) -> None:
        self.other = other

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return torch.cat([t, self.other], dim=dim)


def test_vocab_logits_gathers_shards_in_rank_order_and_cuts_padding():
    from sglang_dflash.srt.parallel import vocab_logits

    V, padded, H = 40, 64, 8  # SGLang pads the vocabulary to 64 rows: rank 1 holds rows 32..63 (8 real)
    weight = torch.randn(padded, H)
    weight[V:] = 0
    hidden = torch.randn(3, 5, H)
    want = torch.nn.functional.linear(hidden, weight[:V])
    other = torch.nn.functional.linear(hidden, weight[32:])
    shard = types.SimpleNamespace(num_added_elements=0)
    head = types.SimpleNamespace(weight=weight[:32], tp_group=_Gathered(other), tp_size=2, shard_indices=shard)
    got = vocab_logits(hidden, head, V)
    assert got.shape == (3, 5, V) and got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    # one rank: no gather, padding cut all the same
    torch.testing.assert_close(vocab_logits(hidden, types.SimpleNamespace(weight=weight), V), want)


class _FromRank0:
    """A stand-in TP group: broadcast overwrites the tensor with what rank 0 holds."""

    world_size = 2

    def __init__(self, rank0: torch.Tensor) -> None:
        self.rank0, self.calls = rank0, 0

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        assert src == 0 and t.is_contiguous()
        t.copy_(self.rank0)
        self.calls += 1
        return t


def test_rank_sync_takes_rank0s_acceptance_and_drafts():
    from sglang_dflash.srt.parallel import RankSync
    from sglang_dflash.srt.stages import Accepted, Proposal

    bs, B = 3, 4
    mine = Accepted(torch.zeros(bs, dtype=torch.int64), torch.zeros(bs, dtype=torch.int64),
                    torch.zeros(bs, B, dtype=torch.int64), torch.zeros(bs, dtype=torch.int64))
    accept_len, bonus = torch.tensor([0, 2, 3]), torch.tensor([7, 8, 9])
    tokens, new_lens = torch.arange(bs * B).view(bs, B), torch.tensor([11, 22, 33])
    group = _FromRank0(torch.cat([accept_len[:, None], bonus[:, None], new_lens[:, None], tokens], dim=1))
    got = RankSync(group).accepted(mine)
    assert torch.equal(got.accept_len, accept_len) and torch.equal(got.bonus, bonus)
    assert torch.equal(got.tokens, tokens) and torch.equal(got.new_seq_lens, new_lens)
    assert all(t.is_contiguous() for t in got if t is not None)  # p: None for a greedy step

    drafts = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    proposal = Proposal(torch.zeros(bs, B - 1, dtype=torch.int64), None, torch.zeros(bs, dtype=torch.bool))
    sync = RankSync(_FromRank0(drafts))
    assert torch.equal(sync.drafts(proposal).drafts, drafts)
    # one rank: nothing is sent, the objects pass through
    assert RankSync(None).accepted(mine) is mine
    assert RankSync(types.SimpleNamespace(world_size=1)).drafts(proposal) is proposal


def _width_rank(rank: int, port: int, out) -> None:
    import torch.distributed as dist
    from sglang_dflash.srt.parallel import RankSync

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    group = types.SimpleNamespace(world_size=2, ranks=[0, 1], cpu_group=dist.group.WORLD)
    try:
        out[rank] = [RankSync(group).width(k) for k in ((16, 1, 4) if rank == 0 else (2, 8, 1))]
    finally:
        dist.destroy_process_group()


def test_rank_sync_width_is_rank0s_over_gloo():
    """Each rank times its own steps, so each may choose another verify width: every rank runs rank 0's
    (a real two-process gloo group, as SGLang's CPU group under --tp-size 2)."""
    import torch.multiprocessing as mp
    from sglang_dflash.server import free_port
    from sglang_dflash.srt.parallel import RankSync

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_width_rank, args=(free_port(), out), nprocs=2)
        assert out[0] == out[1] == [16, 1, 4]
    assert RankSync(None).width(8) == 8
