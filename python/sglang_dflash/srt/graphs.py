"""CUDA graphs per verify width: a step of width k (k tokens per request, k < B) replays a graph too.

SGLang 0.5.23 captures one width per ModelRunner: its decode graph runner (`DecodeCudaGraphRunner`,
`captured_req_width` = B for DFLASH) refuses any forward whose `spec_info.num_tokens_per_req` differs
(`can_run_graph`), so a narrower block forward runs eager. `WidthGraphs` adds, for each extra width w, what
SGLang's own adaptive EAGLE builds per step count (`EAGLEWorkerV2.build_adaptive_runtime_state` /
`apply_runtime_state`): an attention backend built for w and a `DecodeCudaGraphRunner(model_runner,
attn_backend=..., speculative_num_draft_tokens=w)`; `select(w)` makes them the runner's
`attn_backend` / `decode_cuda_graph_runner` for the forwards inside it, and restores the previous ones after.
`ModelRunner._forward_raw` then replays the width's graph by itself when the batch fits, or runs eager
(with the width's backend) when it does not. The same class serves the target's runner and the drafter's.

Why a backend per width: backends size their graph state for (max_bs, max_bs * w) in `init_cuda_graph_state`
and the captured graphs keep pointers into it, so a second runner may not re-size the shared backend; and some
backends fix the verify width when built (FA3 reads `speculative_num_draft_tokens` in `__init__`), so the new
backend is built while that setting reads w. Graphs go into SGLang's process-wide graph pool, as every other
runner's (forwards are sequential, so they share its scratch); static input buffers of a new size get their own
storage (`share_input_buffer` never repoints a captured one).

Memory, per runner and extra width w: the new backend's graph state (triton and flashinfer: buffers of max_bs * w *
context_len entries for KV indices, and flashinfer's custom mask, i.e. the B ones scaled by w/B; the flashinfer
workspace is shared, as target and drafter already share it) + the runner's static input buffers and graph outputs
for max_bs * w tokens + pool growth for its activations. Widths {1, 2, 4, 8} beside B = 16 cost about (1+2+4+8)/16,
i.e. about as much again as SGLang's B-width graphs of that runner (logged per width at startup), taken from the
memory KV sizing left free: lower --mem-fraction-static if the extra widths do not fit. A width is skipped
(warning; it runs eager) when the free memory on the tightest rank is below its estimate + 1 GiB.

Failure: a width whose capture fails is logged and runs eager, with its own backend when that was built; a width
skipped for memory, or whose backend could not be built, runs eager on the runner's own backend, which is right
for torch_native, triton and flashinfer (they read the width from the forward's spec_info) but not for FA3 (its
verify width is the one it was built with). That holds on one rank; with several ranks the captures run
collectives in lockstep, so one rank skipping a width alone would pair mismatched collectives: there the failure
is raised, as SGLang raises its own capture failure.

Not supported (returns None, warning): LoRA (its graph batch info is one per runner, re-sized by a capture),
PD multiplexing and two-batch overlap (their backends are composites `build_attention_backends` assembles).
The SGLang 0.5.23 internals used (runner attributes, `_get_attention_backend`, the spec config override, the
KV index translator, graph memory figures) are commented where used, in the functions at the end of this file;
nothing else in the package swaps a runner's backend or graph runner.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .sglang_api import ModelRunner

logger = logging.getLogger("sglang_dflash")
MARGIN_GIB = 1.0  # free memory a width capture must leave, as SGLang's own DFLASH asks before the drafter's graphs


@dataclass(frozen=True)
class WidthState:
    """What the forwards of one width run with."""

    attn_backend: Any  # an AttentionBackend built for this width
    graph_runner: Any | None  # its DecodeCudaGraphRunner; None: capture failed, the width runs eager


class WidthGraphs:
    """Per-width decode graph runners (and attention backends) of one ModelRunner, beside SGLang's B-width one."""

    def __init__(self, model_runner: ModelRunner, full_width: int, states: dict[int, WidthState]) -> None:
        if full_width in states:
            raise ValueError(f"sglang-dflash: width {full_width} is the runner's own (SGLang's graphs), not an extra")
        self.model_runner = model_runner
        self.full_width = full_width
        self.states = states
        self._active = False

    @property
    def graphed_widths(self) -> tuple[int, ...]:
        """Widths that replay a CUDA graph when the batch fits (B included)."""
        return tuple(sorted({self.full_width, *(w for w, s in self.states.items() if s.graph_runner is not None)}))

    @classmethod
    def capture(cls, model_runner: ModelRunner, widths: list[int], full_width: int) -> WidthGraphs | None:
        """Capture every width in `widths` other than `full_width` (the one SGLang captured already), largest first
        so the smaller ones reuse the pool. None when the runner captured no decode graphs (CPU, disabled)."""
        full = model_runner.decode_cuda_graph_runner
        if full is None:
            return None
        from .sglang_api import DecodeCudaGraphRunner

        if not isinstance(full, DecodeCudaGraphRunner):  # the EagerRunner (graphs disabled) or a CPU graph runner
            return None
        bad = [w for w in widths if not 1 <= w <= full_width]
        if bad:
            raise ValueError(f"sglang-dflash: verify widths {bad} outside [1, {full_width}]")
        if full.captured_req_width != full_width:
            raise ValueError(f"sglang-dflash: the runner's graphs are {full.captured_req_width} tokens per request, "
                             f"not the block size {full_width}")
        reason = _unsupported(model_runner)
        if reason is not None:
            logger.warning("sglang-dflash: no CUDA graphs for verify widths below %d (%s); they run eager",
                           full_width, reason)
            return None
        states = {}
        for w in sorted(set(widths) - {full_width}, reverse=True):
            state = _capture_width(model_runner, type(full), w, full_width)
            if state is not None:
                states[w] = state
        return cls(model_runner, full_width, states)

    @contextmanager
    def select(self, width: int) -> Iterator[None]:
        """Forwards inside replay the graph captured for `width` (eager with its backend when the batch does not
        fit it). The full width, and a width never built, run as without this class."""
        state = self.states.get(width)
        if state is None:
            yield
            return
        assert not self._active, "sglang-dflash: WidthGraphs.select entered twice"
        mr = self.model_runner
        saved = (mr.attn_backend, mr.decode_cuda_graph_runner)
        mr.attn_backend = state.attn_backend  # ForwardBatch.init_new, the eager runner and _forward_raw read it
        if state.graph_runner is not None:  # else the B-width runner refuses the width: eager
            mr.decode_cuda_graph_runner = state.graph_runner
        self._active = True
        try:
            yield
        finally:
            mr.attn_backend, mr.decode_cuda_graph_runner = saved
            self._active = False


def use_width(graphs: WidthGraphs | None, width: int) -> AbstractContextManager:
    """`graphs.select(width)`, or nothing when the runner has no per-width graphs."""
    return nullcontext() if graphs is None else graphs.select(width)


# -- SGLang 0.5.23 internals: each below names what it relies on ----------------------------------------------
def _capture_width(model_runner: ModelRunner, runner_cls: type, width: int, full_width: int) -> WidthState | None:
    phase = "draft_decode" if model_runner.is_draft_worker else "target_verify"  # capture_decode_graph's names
    full_gib = model_runner.graph_memory_usage.get(phase, 0.0)  # what SGLang measured for the B-width capture
    need = full_gib * width / full_width + MARGIN_GIB
    free = _free_gib(model_runner, every_rank=True)  # the least over the ranks
    role = "drafter" if model_runner.is_draft_worker else "target"
    # each rank measured its own B-width graphs (`need` may differ a little): rank 0 decides for all, since one rank
    # skipping a width the others capture would leave the captures' collectives unmatched
    if not _rank0_says(free >= need):
        logger.warning("sglang-dflash: %s width %d runs eager: %.2f GiB free, its CUDA graphs need about %.2f",
                       role, width, free, need)
        return None
    tic, before = time.perf_counter(), _free_gib(model_runner, every_rank=False)
    saved = (model_runner.attn_backend, model_runner.init_new_workspace)
    backend = graph_runner = capture_error = None
    try:
        with _spec_draft_tokens(width):  # backends built now read w as the verify width (FA3 fixes it in __init__)
            # ModelRunner.init_attention_backends' steps for its own backend, less the composites refused above;
            # an error here (SGLang's API changed) is raised: it is not a capture failure to serve around
            backend = model_runner._get_attention_backend(init_new_workspace=False)  # flashinfer: shared workspace
            backend.prefill_attention_backend_str = saved[0].prefill_attention_backend_str
            backend.decode_attention_backend_str = saved[0].decode_attention_backend_str
            model_runner.kv_index_translator.bind_and_verify_backends([backend])
            model_runner.attn_backend = backend  # capture-time reads (the DFLASH verify-mask policy) see this width's
            try:
                graph_runner = runner_cls(model_runner, attn_backend=backend, speculative_num_draft_tokens=width)
            except Exception as e:  # SGLang 0.5.23 re-raises a failed capture as a plain Exception; OOM: RuntimeError
                capture_error = e
    finally:
        model_runner.attn_backend, model_runner.init_new_workspace = saved
    if capture_error is not None:
        if _num_ranks() > 1:
            raise RuntimeError(f"sglang-dflash: capturing the {role}'s CUDA graphs for verify width {width} failed "
                               "on this rank; with several ranks every rank must capture the same widths") \
                from capture_error
        logger.warning("sglang-dflash: %s width %d runs eager: its CUDA graph capture failed (%s: %s)", role, width,
                       type(capture_error).__name__, (str(capture_error).splitlines() or [""])[0])
    if graph_runner is not None:
        used = before - _free_gib(model_runner, every_rank=False)
        logger.info("sglang-dflash: %s CUDA graphs for verify width %d: bs %s, %.1f s, %.2f GiB", role, width,
                    graph_runner.capture_bs, time.perf_counter() - tic, used)
    return WidthState(attn_backend=backend, graph_runner=graph_runner)


@contextmanager
def _spec_draft_tokens(width: int) -> Iterator[None]:
    """`get_spec().speculative_num_draft_tokens` reads `width` inside; as EAGLEWorkerV2._override_worker_state."""
    from .sglang_api import get_context, get_spec

    prior = get_spec().speculative_num_draft_tokens
    get_context().override("sglang_dflash.graphs: capture a verify width", speculative_num_draft_tokens=width)
    try:
        yield
    finally:
        get_context().override("sglang_dflash.graphs: restore", speculative_num_draft_tokens=prior)


def _unsupported(model_runner: ModelRunner) -> str | None:
    from .sglang_api import HybridLinearAttnBackend, get_disagg, get_exec

    if model_runner.lora_manager is not None:
        return "LoRA: its graph batch info is sized by each capture"
    if get_disagg().enable_pdmux:
        return "PD multiplexing"
    if get_exec().overlap.enable_two_batch_overlap and not model_runner.is_draft_worker:
        return "two-batch overlap"
    if isinstance(model_runner.attn_backend, HybridLinearAttnBackend):
        return "a hybrid linear-attention target: per-width graphs of its GDN state have not been run"
    return None


def _free_gib(model_runner: ModelRunner, *, every_rank: bool) -> float:
    """Free device memory in GiB: this rank's, or the least over all ranks (a collective: every rank calls it)."""
    from .sglang_api import get_available_gpu_memory, get_parallel

    distributed = every_rank and _num_ranks() > 1
    return get_available_gpu_memory(model_runner.device, model_runner.gpu_id, distributed=distributed,
                                    cpu_group=get_parallel().world_group.cpu_group if distributed else None)


def _rank0_says(yes: bool) -> bool:
    """Rank 0's `yes` on every rank (a one-element broadcast over the world's CPU group; `yes` itself on one rank)."""
    if _num_ranks() == 1:
        return yes
    import torch
    import torch.distributed as dist

    from .sglang_api import get_parallel

    world = get_parallel().world_group
    flag = torch.tensor([int(yes)], dtype=torch.int64)  # host: a Python bool
    dist.broadcast(flag, src=world.ranks[0], group=world.cpu_group)
    return bool(flag[0])  # host: a host tensor, broadcast over the CPU (gloo) group at start-up


def _num_ranks() -> int:
    from .sglang_api import get_parallel

    return get_parallel().launch_world_size
