"""Our DFLASH worker on SGLang 0.5.23's V2 speculative-worker contract (synchronous path).

Prefill:  target extend with hidden-state capture -> drafter context K/V for every prompt token,
          written before the scheduler can share the prefix through the radix cache.
Decode:   width (the step's verify width k, `adaptive.py`) -> draft (block forward of k tokens on the drafter
          runner; none at k = 1) -> verify (TARGET_VERIFY of k tokens on the target) -> accept -> commit.
          The step reads as those calls; their tensor work lives in `stages.py` (the acceptance rule itself
          in `dflash_kernels.greedy_accept` / `sample_accept`) and the drafter's context write in `context.py`.

KV slots: the drafter's pool has one slot per target slot, indexed by the same slot ids (SGLang sizes it
so for `--speculative-algorithm DFLASH`). A decode step uses slots [L, L+k) of each request (k <= B), reserved by
`DFlashDraftInput.prepare_for_decode`; the block's scratch K/V and the rejected tail are overwritten by the
next step before anything reads them, and SGLang frees the reservation with the request.
"""

from __future__ import annotations

import logging
import time

import torch
from sglang.srt.layers.logits_processor import LogitsProcessorOutput
from sglang.srt.managers.tp_worker import TpModelWorker
from sglang.srt.managers.utils import GenerationBatchResult
from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardBatch, ForwardMode
from sglang.srt.speculative.base_spec_worker import BaseSpecWorker

from .. import __version__, envs
from ..config import check_for_sglang, check_target_model
from ..families import check_target, recurrent_refusal
from . import logit_rules, stages
from .adaptive import WidthChooser, candidate_widths
from .context import ContextWriter
from .draft_health import DraftHealth
from .graphs import WidthGraphs, use_width
from .parallel import RankSync, refuse_dp_attention
from .spec_inputs import BlockForwardInput, DFlashDraftInput
from .timing import IDLE_GAP_S, StepTimer

logger = logging.getLogger("sglang_dflash")
# attention backends a block forward (the target's verify, the drafter's non-causal block) has been run on, end
# to end: torch_native on CPU, triton on CPU under Triton's interpreter (tests/test_sglang_triton_backend.py).
# Any other backend starts with a warning until a run says otherwise (fa3 and flashinfer are written to
# SGLang 0.5.23's contracts but no GPU has run them).
VERIFIED_ATTENTION_BACKENDS = ("torch_native", "triton")
# attention backend classes (SGLang 0.5.23) that read a TARGET_VERIFY forward's width from its spec_info, so one
# backend serves every verify width eagerly; others (FA3: fixed when built) serve a width below the block only
# through their own backend for it (`graphs.WidthGraphs`), and without one that width is not used
PER_FORWARD_WIDTH_BACKENDS = ("TorchNativeAttnBackend", "TritonAttnBackend", "FlashInferAttnBackend")


class DFlashWorker(BaseSpecWorker):
    def __init__(self, server_args, gpu_id: int, nccl_port: int, target_worker: TpModelWorker) -> None:
        super().__init__()
        from sglang.srt.layers.moe.utils import draft_model_build_scope
        from sglang.srt.runtime_context import get_parallel, get_spec
        from sglang.srt.speculative.draft_parallel import model_draft_parallel_spec, resolve_draft_parallel_layout
        from sglang.srt.speculative.spec_utils import draft_pp_context, draft_tp_context

        if server_args.enable_mixed_chunk:
            raise ValueError("sglang-dflash: --enable-mixed-chunk is not supported (prefill and decode of one batch "
                             "in one forward); start without it")
        refuse_dp_attention(server_args)
        self.server_args = server_args
        self._target_worker = target_worker
        self.device = target_worker.device
        target_runner = target_worker.model_runner
        spec = get_spec()  # the resolved speculative arguments (SGLang infers B from the drafter config)
        self.block_size = int(spec.speculative_num_draft_tokens)
        self.speculative_num_draft_tokens = self.block_size
        # the target's family (a backstop of hook 5's check) and the drafter's config against the target's text
        # config, before any drafter weight is read
        check_target_runner(target_runner.model_config, str(target_worker.device))
        check_for_sglang(target_runner.spec_aux_config.draft_model_config.hf_config,
                         target_runner.model_config.hf_text_config, self.block_size)
        self.draft_parallel_layout = resolve_draft_parallel_layout(
            model_draft_parallel_spec(target_runner.spec_aux_config.draft_model_config,
                                      spec_algorithm=target_runner.spec_algorithm),
            collapse_cp=True,
        )
        with draft_pp_context(), draft_tp_context(self.draft_parallel_layout), draft_model_build_scope():
            draft = TpModelWorker(
                server_args=server_args, gpu_id=gpu_id, nccl_port=nccl_port, is_draft_worker=True,
                context_length=target_runner.model_config.context_len,
                draft_attention_backend=spec.speculative_draft_attention_backend,
            )
        draft.draft_runner = draft.model_runner  # the name SGLang's metrics timer looks for
        if draft.model_runner.model_config.vocab_size is None:
            draft.model_runner.model_config.vocab_size = target_runner.model_config.vocab_size
        self._draft_worker = draft
        self.draft_runner = draft.model_runner
        self.draft_model = self.draft_runner.model  # srt.models.draft_model.DFlashDraftModel
        self.target_model = target_runner.model
        check_target_model(self.target_model)
        from sglang.srt.model_executor.forward_batch_info import get_server_return_hidden_states_mode

        self.hidden_states_mode = get_server_return_hidden_states_mode()  # NULL unless the server returns them
        if self.hidden_states_mode != CaptureHiddenMode.NULL:
            from .hooks import keep_final_hidden_states

            keep_final_hidden_states(self.target_model)
        self.draft_model.attach_target(self.target_model, target_runner.model_config.vocab_size)
        self.write_context = ContextWriter(self.draft_model, self.draft_runner)
        self.rank_sync = RankSync(get_parallel().tp_group)  # rank 0's drafts and acceptance on every TP rank
        self.buffers: stages.StepBuffers | None = None
        self.mask_token_id = self.draft_model.cfg.mask_token_id
        self.vocab_size = target_runner.model_config.vocab_size
        self.candidate_widths = candidate_widths(self.block_size, envs.verify_widths())
        self.width_chooser = WidthChooser(self.candidate_widths, envs.width_mode())
        # (start, bs, width) of the last two decode steps, for the step-cost model (`_choose_width`)
        self._recent_steps: list[tuple[float, int, int]] = []
        self.width_metric = (_width_histogram(self.width_chooser.widths)
                             if server_args.enable_metrics and self._is_rank0() else None)
        self.draft_graphs: WidthGraphs | None = None  # per-width CUDA graphs (init_cuda_graphs)
        self.verify_graphs: WidthGraphs | None = None
        self.timer = StepTimer(envs.timing_enabled(), self.device, extra=lambda: self.width_chooser.summary())
        self.draft_health = DraftHealth()
        self._overlap_seen = False
        self._first_forward_logged = False
        for role, name in (("target", server_args.attention_backend),
                           ("drafter", spec.speculative_draft_attention_backend)):
            if name not in VERIFIED_ATTENTION_BACKENDS:
                logger.warning("sglang-dflash: %s attention backend %r has not been run with this worker yet "
                               "(unverified; run on so far: %s)", role, name, ", ".join(VERIFIED_ATTENTION_BACKENDS))
        logger.info("sglang-dflash %s: DFLASH worker active (block size %d, drafter layers %d, target layers %s, "
                    "verify widths %s %s)", __version__, self.block_size, self.draft_model.cfg.num_hidden_layers,
                    list(self.draft_model.cfg.target_layer_ids), self.width_chooser.mode, self.width_chooser.widths)

    def _is_rank0(self) -> bool:
        from sglang.srt.runtime_context import get_parallel

        return get_parallel().tp_rank == 0

    # -- SGLang worker plumbing ------------------------------------------------------------------
    def weight_update_runners(self):
        return [("draft", self.draft_runner)]

    def init_cuda_graphs(self) -> None:
        """Capture the drafter's block forward (TARGET_VERIFY, B tokens per request) as SGLang's decode graph
        runner does for the target's verify: SGLang replays either by itself whenever a batch fits
        (`ModelRunner._forward_raw`), so the step code is the same with and without graphs. Then both runners'
        graphs for every verify width below B (`graphs.WidthGraphs`; selected per step by `use_width`)."""
        from sglang.srt.model_executor.cuda_graph_config import Backend
        from sglang.srt.platforms import current_platform
        from sglang.srt.runtime_context import get_exec
        from sglang.srt.speculative.spec_utils import draft_pp_context, draft_tp_context

        capture = get_exec().graph.cuda_graph_config.decode.backend != Backend.DISABLED and self.device != "cpu"
        if capture and current_platform.is_out_of_tree() and not current_platform.capabilities.graph_capture:
            capture = False
        if capture and str(self.device).startswith("cuda"):  # as SGLang's own DFLASH: no capture in < 1 GiB
            free_gib = torch.cuda.mem_get_info()[0] / (1 << 30)
            if free_gib < 1.0:
                capture = False
                logger.warning("sglang-dflash: %.2f GiB of GPU memory free after the target's setup; the drafter "
                               "runs without CUDA graphs", free_gib)
        B, widths = self.block_size, self.width_chooser.widths
        with draft_pp_context(), draft_tp_context(self.draft_parallel_layout):
            self._draft_worker.init_cuda_graphs(capture_decode_cuda_graph=capture)
            # the drafter's graphs per verify width (width 1 runs no drafter), then the target's (SGLang captured B)
            self.draft_graphs = WidthGraphs.capture(self.draft_runner, [w for w in widths if w > 1], B)
        self.verify_graphs = WidthGraphs.capture(self.target_worker.model_runner, widths, B)

    def _keep_servable_widths(self) -> None:
        """Drop the verify widths an attention backend cannot serve: below the block, a backend that fixes its
        verify width when built (FA3) serves only widths it got its own backend for (`WidthGraphs`). Run at the
        first forward: the runners' backends and graphs exist by then."""
        def servable(width: int, runner, graphs: WidthGraphs | None) -> bool:
            per_forward = any(c.__name__ in PER_FORWARD_WIDTH_BACKENDS for c in type(runner.attn_backend).__mro__)
            return width == self.block_size or per_forward or (graphs is not None and width in graphs.states)

        widths, target = self.candidate_widths, self.target_worker.model_runner
        kept = [w for w in widths if servable(w, target, self.verify_graphs)
                and (w == 1 or servable(w, self.draft_runner, self.draft_graphs))] or [self.block_size]
        if kept != self.width_chooser.widths:
            self.width_chooser = WidthChooser(kept, self.width_chooser.mode)
        if kept != widths:
            logger.warning("sglang-dflash: verify widths %s dropped: attention backends %s / %s fix the width when "
                           "built and have no backend of that width (CUDA graphs off or not captured); widths %s",
                           sorted(set(widths) - set(kept)), type(target.attn_backend).__name__,
                           type(self.draft_runner.attn_backend).__name__, kept)

    def prewarm_sampling(self):
        """Reserve a sampled step's memory peak, as SGLang's own DFLASH does: on a GPU, rehearse the step at the
        largest batch it can see (`stages.rehearse_sampled_step`, the full-vocabulary sort) and report the peak
        as headroom SGLang's KV sizing keeps free when it does not serve such temporaries from graph storage.
        Elsewhere (CPU) nothing is reserved, as SGLang's default."""
        from sglang.srt.model_executor.model_runner import SamplingPrewarmResult

        runner = self.target_worker.model_runner
        result = runner.prewarm_sampling()
        if not str(self.device).startswith("cuda"):
            return result
        B, vocab = self.block_size, runner.model_config.vocab_size
        bs = runner.max_decode_logits_rows() // B
        if runner.max_running_requests is not None:
            bs = min(bs, int(runner.max_running_requests))
        bs = max(1, bs)
        stages.rehearse_sampled_step(bs, B, vocab, self.device)  # once, so cached workspaces are off the peak
        torch.cuda.synchronize()  # sync: start-up rehearsal, not a step
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_stats()["allocated_bytes.all.current"]
        stages.rehearse_sampled_step(bs, B, vocab, self.device)
        torch.cuda.synchronize()  # sync: start-up rehearsal, not a step
        peak = torch.cuda.memory_stats()["allocated_bytes.all.peak"] - base
        inputs = (2 * B - 1) * bs * vocab * 4  # the float32 logits the rehearsal itself allocates
        result = SamplingPrewarmResult(sampling_input_bytes=inputs, sampling_headroom_bytes=peak + inputs)
        runner.sampling_prewarm_result = result
        logger.info("sglang-dflash: sampled-step rehearsal at batch %d: peak %.1f MiB kept free beside the KV pool",
                    bs, result.sampling_headroom_bytes / 2**20)
        return result

    @property
    def spec_v2_attn_backends(self) -> tuple:
        return (self.target_worker.model_runner.attn_backend, self.draft_runner.attn_backend)

    # -- the step ---------------------------------------------------------------------------------
    def forward_batch_generation(self, batch, on_publish=None, grammar_barrier=None, pp_proxy_tensors=None):
        if not self._first_forward_logged:  # what actually runs, once: attention backends and scheduler mode
            self._first_forward_logged = True
            self._keep_servable_widths()
            logger.info("sglang-dflash: attention backends: target %s, drafter %s",
                        type(self.target_worker.model_runner.attn_backend).__name__,
                        type(self.draft_runner.attn_backend).__name__)
        if on_publish is not None and not self._overlap_seen:  # SGLang passes it only from its overlap branch
            self._overlap_seen = True
            logger.info("sglang-dflash: the scheduler overlaps steps (overlap path: lengths published early)")
        if batch.forward_mode.is_extend():
            self._recent_steps = []  # a step period with a prefill in it says nothing about the decode's cost
            if grammar_barrier is not None:
                grammar_barrier()
            with self.timer.stage("prefill"):
                return self._prefill(batch, on_publish)
        if batch.forward_mode.is_decode():
            return self._decode(batch, on_publish, grammar_barrier)
        raise NotImplementedError(f"sglang-dflash: forward mode {batch.forward_mode!r} is not supported")

    def _prefill(self, batch, on_publish) -> GenerationBatchResult:
        if batch.forward_mode.is_mixed():
            raise NotImplementedError("sglang-dflash: --enable-mixed-chunk is not supported")
        res = self.target_worker.forward_batch_generation(batch, capture_hidden_mode=CaptureHiddenMode.FULL)
        if on_publish is not None:  # lengths are known now: let an overlapped scheduler plan the next batch
            on_publish(batch.seq_lens)
        target_hidden = res.logits_output.hidden_states  # [num_tokens, K*H]
        res.logits_output.hidden_states = stages.returned_hidden_states(batch, res.logits_output,
                                                                        self.hidden_states_mode)
        positions = stages.extend_positions(batch)
        self.write_context(target_hidden, positions, batch.out_cache_loc)
        if any(logit_rules.needs_penalty(r.sampling_params) for r in batch.reqs):
            logit_rules.start_counts(batch.reqs, res.next_token_ids, self.vocab_size)
        res.new_seq_lens = batch.seq_lens  # same object: the scheduler keeps its lengths
        res.next_draft_input = DFlashDraftInput(bonus_tokens=res.next_token_ids.long(), block_size=self.block_size)
        return res

    def _decode(self, batch, on_publish, grammar_barrier=None) -> GenerationBatchResult:
        B, timer = self.block_size, self.timer
        timer.begin_step()
        anchor = batch.spec_info.bonus_tokens  # [bs]: last step's bonus, position L
        seq_lens = batch.seq_lens  # [bs]: committed lengths L (the batch fields are rebound below)
        if seq_lens.is_cuda:  # read on this stream; under overlap the scheduler's stream produced it
            seq_lens.record_stream(torch.cuda.current_stream())
        if self.buffers is None:  # sized from SGLang's request table, which exists once serving starts
            self.buffers = stages.StepBuffers(batch.req_to_token_pool.req_to_token.shape[0], B, anchor.device)
        k = self._choose_width(batch.batch_size())
        block = stages.block_layout(batch, anchor, self.mask_token_id, k, self.buffers)  # [L, L+k) of each request
        stages.set_block_key_lengths(batch, k)  # host L+k for both block forwards; device seq_lens stay L
        # penalties, grammar, logit_bias, custom processors: None for a batch that asks for none of them
        rules = logit_rules.BlockRules.of(batch, k, self.vocab_size, anchor.device, grammar_barrier)
        with timer.stage("draft"):
            proposal, draft_graph = self._draft(batch, block, rules)
            self.draft_health.watch(batch.reqs, proposal.nonfinite)
        verify_ids = stages.verify_ids(block, proposal.drafts, self.buffers)  # [bs, k]
        with timer.stage("verify"):
            logits, target_hidden, verify_graph = self._verify(batch, block, verify_ids)
            if rules is not None:  # each row processed as the plain sampler would at that point of the output
                rules.verify(logits, verify_ids)
        with timer.stage("accept"):
            acc = self.rank_sync.accepted(stages.accept(verify_ids, logits, proposal.q, seq_lens, batch.sampling_info))
            if on_publish is not None:  # as soon as the lengths exist, before the commit's work
                on_publish(acc.new_seq_lens)
            self.width_chooser.observe(k, acc.accept_len)
        logits_output = LogitsProcessorOutput(next_token_logits=None, hidden_states=None)
        if self.hidden_states_mode != CaptureHiddenMode.NULL and any(r.return_hidden_states for r in batch.reqs):
            logits_output.hidden_states = self._final_hidden  # [bs*k, H]: row j <-> committed token j
        if batch.return_logprob:  # from the same processed verify rows the tokens were accepted under
            stages.spec_logprobs(batch, logits_output, logits, acc.tokens)
        if batch.sampling_info.sampling_mask_batch_indices is not None:  # return_sampling_mask
            logits_output.sampling_mask_output = stages.sampling_masks(batch.sampling_info, acc)
        with timer.stage("commit"):
            if rules is not None:
                rules.commit(acc.tokens, acc.accept_len)
            # drafter context for the block rows (rows past the commit length are overwritten by the
            # next block before anything reads them), then the committed run.
            self.write_context(target_hidden, block.positions.flatten(), block.slots.flatten())
            result = GenerationBatchResult(
                logits_output=logits_output,
                next_token_ids=acc.tokens.flatten(),
                accept_lens=acc.accept_len + 1,
                new_seq_lens=acc.new_seq_lens,
                next_draft_input=DFlashDraftInput(bonus_tokens=acc.bonus, block_size=B),
                speculative_num_draft_tokens=k,  # the row stride of next_token_ids
                can_run_cuda_graph=draft_graph and verify_graph,  # SGLang's decode log shows it
            )
        timer.end_step()
        return result

    def _choose_width(self, bs: int) -> int:
        """This step's verify width; the period that just ended (start to start) goes to the cost model first,
        when the batch did not change over it (no request left or joined, no prefill: `forward_batch_generation`
        clears the record). The period belongs to the previous step, except under the overlap scheduler on a GPU:
        there the scheduler launches a step before it waits for the one before, so the period is that one's
        device time. Under tensor parallelism rank 0's choice is every rank's (their clocks differ)."""
        now = time.perf_counter()
        recent = self._recent_steps
        if recent and now - recent[-1][0] < IDLE_GAP_S and recent[-1][1] == bs:
            lagged = self._overlap_seen and str(self.device).startswith("cuda")
            _, run_bs, run_k = recent[0] if lagged else recent[-1]
            if not lagged or (len(recent) == 2 and run_bs == bs):
                self.width_chooser.step_time(run_bs, run_k, now - recent[-1][0])
        k = self.rank_sync.width(self.width_chooser.choose(bs))
        self.width_chooser.ran(k)
        self._recent_steps = [*recent[-1:], (now, bs, k)]
        if self.width_metric is not None:
            self.width_metric.observe(k)
        return k

    def _draft(self, batch, block, rules):
        """-> the proposal (drafts [bs, k-1], their q or None when every request is greedy, non-finite flags)
        and whether the forward replayed a CUDA graph. At width 1 (a plain target decode) nothing is drafted."""
        k = block.ids.shape[1]
        if k == 1:
            return stages.no_drafts(block.ids.shape[0], self.vocab_size, batch.sampling_info, block.ids.device), True
        with use_width(self.draft_graphs, k):  # the width's own backend and CUDA graphs, when captured
            fb = self._block_forward_batch(batch, self.draft_runner, block.ids, block, CaptureHiddenMode.NULL)
            out = self.draft_runner.forward(fb)
        hidden = out.logits_output.hidden_states  # [bs*k, H]; a graph's output buffer: used before the next replay
        hidden = hidden.view(-1, k, hidden.shape[-1])[:, 1:]
        draft_logits = self.draft_model.draft_logits(hidden)
        if rules is not None:
            rules.draft(draft_logits)
        proposal = stages.propose(draft_logits, batch.sampling_info)
        if rules is not None:  # grammar requests redraw under their grammar, before the ranks agree
            rules.constrain(proposal.drafts, proposal.q, draft_logits)
        proposal = self.rank_sync.drafts(proposal)
        return proposal, out.can_run_graph

    def _verify(self, batch, block, verify_ids):
        """-> target logits [bs, k, V] float32, target_hidden [bs*k, K*H], whether a CUDA graph replayed.
        With a graph both outputs live in its buffers; this step consumes them before the next verify."""
        runner = self.target_worker.model_runner
        with use_width(self.verify_graphs, verify_ids.shape[1]):
            fb = self._block_forward_batch(batch, runner, verify_ids, block, CaptureHiddenMode.FULL)
            out = self.target_worker.forward_batch_generation(batch=None, forward_batch=fb, is_verify=True)
        logits = out.logits_output.next_token_logits
        self._final_hidden = out.logits_output.last_hidden_states  # set only when return_hidden_states is on
        return (logits.view(*verify_ids.shape, -1), out.logits_output.hidden_states,
                out.can_run_cuda_graph)

    def _block_forward_batch(self, batch, runner, ids, block, capture: CaptureHiddenMode) -> ForwardBatch:
        """A TARGET_VERIFY ForwardBatch of k tokens per request (the block's width) at its positions and slots.
        Field edits on `batch` are undone by the scheduler's isolation after the step."""
        batch.forward_mode = ForwardMode.TARGET_VERIFY
        batch.input_ids = ids.flatten()
        batch.out_cache_loc = block.slots.flatten()
        batch.spec_info = BlockForwardInput(draft_token_num=ids.shape[1], positions=block.positions.flatten(),
                                            capture_hidden_mode=capture)
        return ForwardBatch.init_new(batch, runner, capture_hidden_mode=capture, return_hidden_states_before_norm=False)


def check_target_runner(model_config, device: str) -> None:
    """Refuse a target the worker cannot serve (`families.refusal`), SGLang's own reading of recurrent layers
    included (its `mambaish_config`: every family whose layers keep a state SGLang tracks per request)."""
    from sglang.srt.configs.hybrid_arch import mambaish_config

    if mambaish_config(model_config) is not None:
        raise ValueError(recurrent_refusal(model_config.hf_text_config.model_type, "SGLang serves it with a "
                                           "recurrent-state pool (mambaish_config)"))
    check_target(model_config.hf_config, device)


def _width_histogram(widths: list[int]):
    """Prometheus histogram `sglang_dflash:verify_width` (steps per verify width) beside SGLang's own metrics,
    for a server run with --enable-metrics (SGLang has set up prometheus_client's multiprocess directory by
    then)."""
    from prometheus_client import Histogram
    from sglang.srt.runtime_context import get_serving

    histogram = Histogram(name="sglang_dflash:verify_width", documentation="Verify width (tokens per request "
                          "the target checks) of each DFLASH decode step; 1 is a plain target decode.",
                          labelnames=["model_name"], buckets=[float(w) for w in widths])
    return histogram.labels(model_name=get_serving().served_model_name)  # SGLang's own label value
