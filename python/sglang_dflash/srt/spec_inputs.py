"""The two SpecInputs our worker hands SGLang's scheduler and forward passes.

`DFlashDraftInput` rides on `ScheduleBatch.spec_info` between steps: the bonus token of each request
(the next block's anchor). The scheduler calls its `prepare_for_decode` before every decode step (the
dflash-family dispatch in `spec_utils.spec_prepare_for_decode`), which reserves the KV slots the next
block will use, and its `filter_batch` / `merge_batch` when requests finish or join.

`BlockForwardInput` describes one TARGET_VERIFY forward of k tokens per request (the step's verify width,
1..B), used for both the drafter's block forward and the target's verify forward; attention backends read
`draft_token_num`, SGLang's graph runners `num_tokens_per_req`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .sglang_api import CaptureHiddenMode, SpecInput, SpecInputType

if TYPE_CHECKING:
    from .sglang_api import ScheduleBatch


@dataclass
class DFlashDraftInput(SpecInput):
    bonus_tokens: torch.Tensor  # [bs] int64: the last committed token of each request, not yet in KV
    block_size: int
    future_indices: torch.Tensor | None = None  # overlap relay slot; unused on the synchronous path
    # Relay fields SGLang's FutureMap reads from any draft input; DFlash carries no hidden state.
    topk_p: torch.Tensor | None = field(default=None, repr=False)
    topk_index: torch.Tensor | None = field(default=None, repr=False)
    hidden_states: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        super().__init__(SpecInputType.DFLASH_DRAFT)
        bs = self.bonus_tokens.shape[0]
        empty = self.bonus_tokens.new_empty((bs, 0), dtype=torch.float32)
        self.topk_p, self.topk_index, self.hidden_states = empty, empty.long(), empty

    def prepare_for_decode(self, batch: ScheduleBatch) -> None:
        reserve_block_slots(batch, reserve=2 * self.block_size)

    # Under overlap scheduling the bonus tokens of the step in flight are relayed through SGLang's FutureMap:
    # `future_indices` (one FutureMap row per request) must then follow every filter and merge, since the
    # next forward gathers `bonus_tokens` from those rows (`FutureMap._resolve_spec_extras`).
    # `bonus_tokens` of a relayed input is then only a placeholder of the right size: the real values may
    # still be in flight on the forward stream, so they are not read here.
    def filter_batch(self, new_indices: torch.Tensor, new_indices_cpu=None) -> None:
        if self.future_indices is not None:
            self.future_indices = self.future_indices[new_indices]
            self.bonus_tokens = torch.empty_like(self.future_indices, dtype=torch.int64)
        else:
            self.bonus_tokens = self.bonus_tokens[new_indices]
        self.__post_init__()

    def merge_batch(self, other: DFlashDraftInput | None) -> None:
        if other is None:
            return
        if (self.future_indices is None) != (other.future_indices is None):
            raise RuntimeError("sglang-dflash: merging a relayed (overlap) draft input with a direct one")
        if self.future_indices is not None:
            self.future_indices = torch.cat([self.future_indices, other.future_indices])
            self.bonus_tokens = torch.empty_like(self.future_indices, dtype=torch.int64)
        else:
            self.bonus_tokens = torch.cat([self.bonus_tokens, other.bonus_tokens])
        self.__post_init__()


@dataclass
class BlockForwardInput(SpecInput):
    """A TARGET_VERIFY forward over `draft_token_num` tokens per request at `positions`."""

    draft_token_num: int
    positions: torch.Tensor  # [bs * k] int64
    capture_hidden_mode: CaptureHiddenMode = CaptureHiddenMode.NULL
    topk: int = 1

    def __post_init__(self) -> None:
        super().__init__(SpecInputType.DFLASH_VERIFY)
        self.num_tokens_per_req = self.draft_token_num
        self.num_tokens_for_logprob_per_req = self.draft_token_num

    def generate_attn_arg_prefill(self, *, req_pool_indices: torch.Tensor, paged_kernel_lens: torch.Tensor,
                                  paged_kernel_lens_sum: int, translator, plan, kv_start_idx=None,
                                  kv_indices_buf: torch.Tensor | None = None, kind=None, **_: object):
        """FlashInfer's paged-prefill arguments for this forward (SGLang 0.5.23 `flashinfer_backend.py` asks a
        DFLASH verify input for them; FA3, triton and torch_native do not). `paged_kernel_lens` are the device
        committed lengths L [bs]; every request reads L + B keys (context, then the block, whose K/V this
        forward writes first) and asks B queries. No custom mask: FlashInfer's causal flag per layer already
        gives the target's causal verify and the drafter's non-causal (ENCODER_ONLY) block.
        -> kv_indices [sum(L) + bs*B] int32, kv_indptr [bs+1] int32, qo_indptr [bs+1] int32, None."""
        from .sglang_api import IdSpaceKind

        bs, B, dev = req_pool_indices.numel(), self.draft_token_num, req_pool_indices.device
        qo_indptr = torch.arange(0, (bs + 1) * B, B, dtype=torch.int32, device=dev)
        kv_lens = paged_kernel_lens + B
        kv_indptr = torch.zeros(bs + 1, dtype=torch.int32, device=dev)
        kv_indptr[1:] = torch.cumsum(kv_lens, dim=0)
        kv_indices = kv_indices_buf if kv_indices_buf is not None else torch.empty(
            paged_kernel_lens_sum + bs * B, dtype=torch.int32, device=dev)
        translator.pack_read_stream(plan, req_pool_indices=req_pool_indices, seq_lens=kv_lens, indptr=kv_indptr,
                                    out=kv_indices, kv_start_idx=kv_start_idx,
                                    kind=IdSpaceKind.FULL if kind is None else kind)
        return kv_indices, kv_indptr, qo_indptr, None


def reserve_block_slots(batch: ScheduleBatch, *, reserve: int) -> None:
    """Make sure every request owns KV slots for positions [committed, committed + reserve).

    Slots are written into `req_to_token` and counted in `req.kv.kv_allocated_len`, so SGLang frees them
    with the request (`release_kv_cache` frees everything up to `kv_allocated_len`). The scheduler's
    admission check assumes the same 2*B reserve (`get_alloc_reserve_per_decode`).
    """
    from .sglang_api import (
        alloc_paged_token_slots_extend,
        alloc_token_slots,
        get_last_loc,
        page_aligned_decode_alloc_lens,
    )

    bs = batch.batch_size()
    if bs == 0:
        return
    allocator = batch.tree_cache.token_to_kv_pool_allocator
    page_size = allocator.page_size
    cur, nxt, need = page_aligned_decode_alloc_lens(batch.reqs, reserve=reserve, page_size=page_size)
    # The 2*B reserve can reach past a request's req_to_token row near the context length: SGLang 0.5.23 gives
    # rows context_len + 4 + B columns at page size 1. A step only writes [L, L + B) with L < context_len,
    # and under overlap the committed length lags L by less than B, so the row's end is always enough.
    width = batch.req_to_token_pool.req_to_token.shape[1]
    cap = width - width % page_size
    if any(b > cap for b in nxt):
        nxt = [max(a, min(b, cap)) for a, b in zip(cur, nxt)]
        need = sum(b - a for a, b in zip(cur, nxt))
    if need > 0:
        req_to_token = batch.req_to_token_pool.req_to_token
        dev = batch.req_pool_indices.device
        if page_size == 1:
            slots = alloc_token_slots(batch.tree_cache, need)
        else:
            cur_cpu, nxt_cpu = torch.tensor(cur, dtype=torch.int64), torch.tensor(nxt, dtype=torch.int64)
            cur_t, nxt_t = _to(cur_cpu, dev), _to(nxt_cpu, dev)
            last_loc = get_last_loc(req_to_token, batch.req_pool_indices, cur_t)
            slots = alloc_paged_token_slots_extend(batch.tree_cache, cur_t, cur_cpu, nxt_t, nxt_cpu, last_loc, need,
                                                   req_pool_indices=batch.req_pool_indices, batch=batch)
        # where the new slots go: (row, column) pairs built on the host from what the requests already
        # know, then one scatter (no device read, so no host sync)
        rows, cols = block_slot_cells([r.kv.req_pool_idx for r in batch.reqs], cur, nxt)
        req_to_token[_to(rows, dev), _to(cols, dev)] = slots.to(req_to_token.dtype)
    for req, b in zip(batch.reqs, nxt):
        req.kv.kv_allocated_len = max(req.kv.kv_allocated_len, b)
        req.decode_batch_idx += 1
    committed = torch.tensor([r.kv.kv_committed_len for r in batch.reqs], dtype=torch.int64)
    batch.seq_lens_cpu = committed
    batch.seq_lens_sum = int(committed.sum())  # host: built from the requests' host lengths


def block_slot_cells(rows: list[int], cur: list[int], nxt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The req_to_token cells (row_i, cur_i .. nxt_i - 1) of every request, concatenated, on the host."""
    counts = torch.tensor([b - a for a, b in zip(cur, nxt)], dtype=torch.int64)
    start = torch.cumsum(counts, 0) - counts  # where each request's run begins in the flat list
    step = torch.arange(int(counts.sum())) - start.repeat_interleave(counts)  # host: counts is built on the host
    cols = torch.tensor(cur, dtype=torch.int64).repeat_interleave(counts) + step
    return torch.tensor(rows, dtype=torch.int64).repeat_interleave(counts), cols


def _to(t: torch.Tensor, device) -> torch.Tensor:
    """Host -> device without making the host wait for the device: a pinned staging copy (from PyTorch's
    caching host allocator) and a non-blocking upload, on CUDA; a plain copy elsewhere."""
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
