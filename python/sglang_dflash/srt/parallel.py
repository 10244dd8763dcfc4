"""Tensor parallelism (`--tp-size N`): the drafter sharded like the target, and one decision per step on every rank.

    drafter layers  q/k/v, gate/up: column-parallel (each rank its heads / MLP channels);
                    o, down: row-parallel (partial outputs summed over the TP group), as SGLang's own models.
                    fc, hidden_norm, the norms and RoPE: replicated (every rank the whole, identical compute).
    context K/V     each rank writes its own KV heads into its own drafter pool (`context.ContextWriter`).
    embedding       the target's vocab-parallel `embed_tokens` (its forward sums the ranks' rows).
    draft logits    the target's vocab-parallel lm_head: each rank its rows, all-gathered to the whole vocabulary.
    decisions       rank 0's verify width, draft tokens and acceptance are broadcast (`RankSync`), so no rank drafts,
                    verifies or commits differently, whatever the ranks' clocks, random streams or float rounding do.

Shapes: `n` rows, `V` vocabulary, `bs` requests, `B` block size, `hd` head dim.
DP attention (`--enable-dp-attention`) is refused at start: see `refuse_dp_attention`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import DFlashConfig
from ..drafter import Linears


def split_heads(num_heads: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """-> (first head, number of heads) rank `tp_rank` computes, as SGLang's QKVParallelLinear splits them: an
    even split when the heads divide by the ranks; with fewer heads than ranks (KV heads only) each rank keeps
    one head, shared by tp_size / num_heads consecutive ranks."""
    if num_heads % tp_size == 0:
        n = num_heads // tp_size
        return tp_rank * n, n
    if tp_size % num_heads == 0:
        return tp_rank // (tp_size // num_heads), 1
    raise ValueError(f"{num_heads} heads cannot be split over {tp_size} tensor-parallel ranks")


def check_tensor_parallel(cfg: DFlashConfig, tp_size: int) -> None:
    """The drafter's shapes must split over `tp_size` ranks (ValueError naming the field otherwise)."""
    problems = []
    if cfg.num_attention_heads % tp_size:
        problems.append(f"num_attention_heads={cfg.num_attention_heads} does not divide by {tp_size}")
    kv = cfg.num_key_value_heads
    if kv % tp_size and tp_size % kv:
        problems.append(f"num_key_value_heads={kv} neither divides by {tp_size} nor divides it")
    if cfg.intermediate_size % tp_size:
        problems.append(f"intermediate_size={cfg.intermediate_size} does not divide by {tp_size}")
    if problems:
        raise ValueError(f"sglang-dflash: the drafter cannot be sharded over --tp-size {tp_size}: "
                         + "; ".join(problems))


def refuse_dp_attention(server_args) -> None:
    """DP attention is refused: each attention-DP rank then serves its own requests, so a step needs idle
    forwards of the drafter and the verify on ranks without requests (kept in step with the others for the MLP
    collectives) and the drafter's lm_head on the attention-TP group (`--enable-dp-lm-head`); the worker has
    neither, and nothing here can test them (CPU, 2 cores)."""
    if server_args.enable_dp_attention:
        raise ValueError("sglang-dflash: --enable-dp-attention is not supported: attention-DP ranks serve "
                         "different requests, so each step would need idle drafter and verify forwards on ranks "
                         "without requests and a drafter lm_head on the attention-TP group (--enable-dp-lm-head); "
                         "this worker has neither yet. Serve with plain --tp-size N (no DP attention)")


class ShardedLinears(Linears):
    """The drafter's projections as SGLang's tensor-parallel layers over the current TP group (SGLang's
    `ColumnParallelLinear` / `RowParallelLinear`; with fewer KV heads than ranks, a `ReplicatedLinear` of the
    rank's one KV head). Each parameter keeps z-lab's name and a `weight_loader` that takes the rank's share out
    of the full checkpoint tensor. Forward returns the output tensor only (SGLang's layers return a pair)."""

    def __init__(self) -> None:
        from .sglang_api import get_parallel

        parallel = get_parallel()  # the draft worker's scope: SGLang's TP group (rank 0 of 1 outside a server)
        self.tp_rank, self.tp_size = parallel.tp_rank, parallel.tp_size

    def heads(self, in_features: int, num_heads: int, head_dim: int, bias: bool) -> tuple[nn.Module, int]:
        from .sglang_api import ColumnParallelLinear, ReplicatedLinear

        first, n = split_heads(num_heads, self.tp_rank, self.tp_size)
        if num_heads % self.tp_size == 0:  # SGLang's loader keeps rows [rank * n * hd, (rank + 1) * n * hd)
            return _output_only(ColumnParallelLinear)(in_features, num_heads * head_dim, bias=bias), n
        layer = _output_only(ReplicatedLinear)(in_features, head_dim, bias=bias)
        rows = slice(first * head_dim, (first + 1) * head_dim)
        for param in layer.parameters():  # the rank's one head out of the full tensor
            param.weight_loader = lambda p, w, rows=rows: p.data.copy_(w[rows])
        return layer, n

    def column(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        from .sglang_api import ColumnParallelLinear

        return _output_only(ColumnParallelLinear)(in_features, out_features, bias=bias)

    def row(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        from .sglang_api import RowParallelLinear

        return _output_only(RowParallelLinear)(in_features, out_features, bias=bias, input_is_parallel=True,
                                               reduce_results=True)


_OUTPUT_ONLY: dict[type, type] = {}


def _output_only(cls: type) -> type:
    """`cls` (an SGLang linear returning (output, bias)) returning the output alone, as nn.Linear does."""
    if cls not in _OUTPUT_ONLY:
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return cls.forward(self, x)[0]

        _OUTPUT_ONLY[cls] = type(cls.__name__, (cls,), {"forward": forward, "__module__": __name__})
    return _OUTPUT_ONLY[cls]


def load_shard(param: torch.Tensor, tensor: torch.Tensor) -> None:
    """Copy a full checkpoint tensor into `param`: through the parameter's `weight_loader` (its rank's share)
    when it has one, else whole (replicated parameters)."""
    loader = getattr(param, "weight_loader", None)  # set by SGLang's parallel layers and ShardedLinears.heads
    if loader is None:
        param.data.copy_(tensor)
    else:
        loader(param, tensor.to(param.dtype))


def vocab_logits(hidden: torch.Tensor, lm_head: nn.Module, vocab: int) -> torch.Tensor:
    """hidden [..., H] -> logits [..., V] float32 through a (possibly vocab-parallel) lm_head: each rank computes
    its rows of the vocabulary, the TP group all-gathers them in rank order (SGLang's shards are contiguous and
    ascending), and the padding rows SGLang adds past the vocabulary are cut off, as its LogitsProcessor does."""
    weight = lm_head.weight
    logits = torch.nn.functional.linear(hidden.to(weight.dtype), weight)  # [..., rows of this rank]
    group = getattr(lm_head, "tp_group", None)  # SGLang's VocabParallelEmbedding / ParallelLMHead
    if group is not None and getattr(lm_head, "tp_size", 1) > 1:
        indices = lm_head.shard_indices
        if indices.num_added_elements:
            raise ValueError("sglang-dflash: a target lm_head with added (LoRA) vocabulary is not supported "
                             "under tensor parallelism")
        logits = group.all_gather(logits.contiguous(), dim=-1)  # [..., padded vocabulary]
    return logits[..., :vocab].float()


class RankSync:
    """Rank 0's step decisions on every rank of the TP group (a no-op on one rank).

    Every rank runs the same step on identical inputs, but their random streams (multinomial, the acceptance
    uniforms) and float rounding are not guaranteed to agree; a rank that drafted or committed differently would
    feed the target's collectives different tokens. So the draft tokens and the acceptance result are broadcast
    from rank 0, as SGLang's own DFLASH does by default (SGLANG_SPEC_TP_SYNC). Two small int64 broadcasts per
    step, no host sync; and the step's verify width, one host integer."""

    def __init__(self, group) -> None:
        self.group = group if group is not None and group.world_size > 1 else None

    def width(self, k: int) -> int:
        """The step's verify width: rank 0's (each rank times its own steps, so their choices could differ).
        A one-element host tensor over the group's CPU (gloo) group: no device work, no device sync."""
        if self.group is None:
            return k
        import torch.distributed as dist

        value = torch.tensor([k], dtype=torch.int64)
        dist.broadcast(value, src=self.group.ranks[0], group=self.group.cpu_group)
        return int(value[0])  # host: a host tensor, broadcast over the CPU (gloo) group

    def drafts(self, proposal):
        """proposal.drafts [bs, B-1] int64 -> rank 0's."""
        if self.group is None:
            return proposal
        drafts = proposal.drafts.contiguous()
        self.group.broadcast(drafts, src=0)
        return proposal._replace(drafts=drafts)

    def accepted(self, acc):
        """accept_len, bonus, new_seq_lens [bs] and tokens [bs, B] (int64) -> rank 0's."""
        if self.group is None:
            return acc
        packed = torch.cat([acc.accept_len[:, None], acc.bonus[:, None], acc.new_seq_lens[:, None], acc.tokens],
                           dim=1).long()  # [bs, 3 + B]
        self.group.broadcast(packed, src=0)
        return acc._replace(accept_len=packed[:, 0].contiguous(), bonus=packed[:, 1].contiguous(),
                            new_seq_lens=packed[:, 2].contiguous(), tokens=packed[:, 3:].contiguous())
