"""Our DFLASH worker on SGLang 0.5.23's V2 speculative-worker contract (synchronous path).

Prefill:  target extend with hidden-state capture -> drafter context K/V for every prompt token,
          written before the scheduler can share the prefix through the radix cache.
Decode:   plan (the step's verify width k, `adaptive.py`; the block; the logit rules) -> draft (block forward
          of k tokens on the drafter runner; none at k = 1) -> verify (TARGET_VERIFY of k tokens on the target)
          -> accept -> outputs -> commit. `_decode` reads as those calls, passing one record (`step.Step`) along;
          their tensor work lives in `stages.py` (the acceptance rule itself in `dflash_kernels.greedy_accept` /
          `sample_accept`), `logit_rules.py`, `outputs.py`, and the drafter's context write in `context.py`.
          One clock (`timing.StepClock`) times the steps for the width chooser and the timing report.

KV slots: the drafter's pool has one slot per target slot, indexed by the same slot ids (SGLang sizes it
so for `--speculative-algorithm DFLASH`). A decode step uses slots [L, L+k) of each request (k <= B), reserved by
`DFlashDraftInput.prepare_for_decode`; the block's scratch K/V and the rejected tail are overwritten by the
next step before anything reads them, and SGLang frees the reservation with the request.
"""

from __future__ import annotations

import logging

import torch

from .. import __version__, envs
from ..config import check_for_sglang, check_target_model
from ..families import check_target, recurrent_refusal
from . import outputs, prewarm, stages
from .adaptive import WidthChooser, candidate_widths
from .context import ContextWriter
from .draft_health import DraftHealth
from .graphs import WidthGraphs, use_width
from .logit_rules import BlockRules
from .parallel import RankSync, refuse_dp_attention
from .penalties import PenaltyCounts
from .sglang_api import (
    BaseSpecWorker,
    CaptureHiddenMode,
    ForwardBatch,
    ForwardMode,
    GenerationBatchResult,
    TpModelWorker,
    commit_mamba_states_after_verify,
    prepare_mamba_track_for_verify,
    reads_width_per_forward,
)
from .spec_inputs import BlockForwardInput, DFlashDraftInput
from .step import Step
from .timing import StepClock

logger = logging.getLogger("sglang_dflash")
# attention backends a block forward (the target's verify, the drafter's non-causal block) has been run on, end
# to end: torch_native on CPU, triton on CPU under Triton's interpreter (tests/test_sglang_triton_backend.py).
# Any other backend starts with a warning until a run says otherwise (fa3 and flashinfer are written to
# SGLang 0.5.23's contracts but no GPU has run them).
VERIFIED_ATTENTION_BACKENDS = ("torch_native", "triton")


class DFlashWorker(BaseSpecWorker):
    def __init__(self, server_args, gpu_id: int, nccl_port: int, target_worker: TpModelWorker) -> None:
        super().__init__()
        from .sglang_api import (
            draft_model_build_scope,
            draft_pp_context,
            draft_tp_context,
            get_parallel,
            get_spec,
            model_draft_parallel_spec,
            resolve_draft_parallel_layout,
        )

        if server_args.enable_mixed_chunk:
            raise ValueError("sglang-dflash: --enable-mixed-chunk is not supported (prefill and decode of one batch "
                             "in one forward); start without it")
        refuse_dp_attention(server_args)
        self.server_args = server_args
        self._target_worker = target_worker
        self.device = target_worker.device
        target_runner = target_worker.model_runner
        spec = get_spec()  # the resolved speculative arguments (SGLang infers B from the drafter config)
        self.block_size = int(spec.speculative_num_draft_tokens)  # host: a server argument
        self.speculative_num_draft_tokens = self.block_size
        # the target's family (a backstop of hook 5's check) and the drafter's config against the target's text
        # config, before any drafter weight is read
        check_target_runner(target_runner.model_config, str(target_worker.device))
        # a Gated DeltaNet target: its recurrent state is committed to the accepted prefix after every verify
        from .sglang_api import hybrid_gdn_config

        self.commits_states = hybrid_gdn_config(target_runner.model_config) is not None
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
        from .sglang_api import get_server_return_hidden_states_mode

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
        self.width_metric = (_width_histogram(self.width_chooser.widths)
                             if server_args.enable_metrics and self._is_rank0() else None)
        self.draft_graphs: WidthGraphs | None = None  # per-width CUDA graphs (init_cuda_graphs)
        self.verify_graphs: WidthGraphs | None = None
        # one clock for the step periods: the width chooser's cost model, and the timing report when on
        self.clock = StepClock(self.device, cost=lambda bs, k, seconds: self.width_chooser.step_time(bs, k, seconds),
                               timing=envs.timing_enabled(), extra=lambda: self.width_chooser.summary())
        self.penalty_counts = PenaltyCounts(self.vocab_size)  # committed-output counts of penalised requests
        self.draft_health = DraftHealth()
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
        from .sglang_api import get_parallel

        return get_parallel().tp_rank == 0

    # -- SGLang worker plumbing ------------------------------------------------------------------
    def weight_update_runners(self):
        return [("draft", self.draft_runner)]

    def init_cuda_graphs(self) -> None:
        """Capture the drafter's block forward (TARGET_VERIFY, B tokens per request) as SGLang's decode graph
        runner does for the target's verify: SGLang replays either by itself whenever a batch fits
        (`ModelRunner._forward_raw`), so the step code is the same with and without graphs. Then both runners'
        graphs for every verify width below B (`graphs.WidthGraphs`; selected per step by `use_width`)."""
        from .sglang_api import CudaGraphBackend as Backend
        from .sglang_api import current_platform, draft_pp_context, draft_tp_context, get_exec

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
            per_forward = reads_width_per_forward(runner.attn_backend)
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
        """Reserve a sampled step's memory peak, as SGLang's own DFLASH does (`prewarm.prewarm_sampling`: on a GPU
        a rehearsal of the step at the largest batch it can see; elsewhere nothing more)."""
        return prewarm.prewarm_sampling(self.target_worker.model_runner, self.block_size, self.device)

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
        if on_publish is not None and not self.clock.overlapped:  # SGLang passes it only from its overlap branch
            self.clock.overlapped = True
            logger.info("sglang-dflash: the scheduler overlaps steps (overlap path: lengths published early)")
        if batch.forward_mode.is_extend():
            if grammar_barrier is not None:  # overlap scheduling: the last step's tokens enter the grammars first
                grammar_barrier()
            with self.clock.prefill():
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
        res.logits_output.hidden_states = outputs.returned_hidden_states(batch, res.logits_output,
                                                                         self.hidden_states_mode)
        positions = stages.extend_positions(batch)
        self.write_context(target_hidden, positions, batch.out_cache_loc)
        self.penalty_counts.start(batch.reqs, res.next_token_ids)  # penalised requests: their output so far
        res.new_seq_lens = batch.seq_lens  # same object: the scheduler keeps its lengths
        res.next_draft_input = DFlashDraftInput(bonus_tokens=res.next_token_ids.long(), block_size=self.block_size)
        return res

    def _decode(self, batch, on_publish, grammar_barrier) -> GenerationBatchResult:
        """One decode step: each stage reads the step record and fills in its part (`step.Step`)."""
        clock = self.clock
        clock.start_step(batch.batch_size())  # the period just ended: the width's cost model, the timing report
        if grammar_barrier is not None:  # overlap scheduling: the last step's tokens enter the grammars first
            grammar_barrier()
        step = self._plan(batch)  # width k, block [L, L+k) of each request, logit rules
        with clock.stage("draft"):
            self._draft(batch, step)  # proposal: drafts d_1 .. d_(k-1) and their q
        with clock.stage("verify"):
            self._verify(batch, step)  # verify ids, target logits (rules applied), target hidden states
        with clock.stage("accept"):
            self._accept(batch, step, on_publish)  # accepted: accept_len, bonus, tokens, new lengths
        returned = outputs.decode_outputs(batch, step, self.hidden_states_mode)  # hidden states, logprobs, masks
        with clock.stage("commit"):
            result = self._commit(batch, step, returned)  # penalty counts, drafter context, the scheduler's result
        clock.end_step(step.k)
        return result

    def _plan(self, batch) -> Step:
        """The step's verify width k, its block (ids, positions, KV slots [L, L+k) of each request, in the step
        buffers) and the batch's logit rules (None when no request asks for any)."""
        anchor = batch.spec_info.bonus_tokens  # [bs]: last step's bonus, position L
        seq_lens = batch.seq_lens  # [bs]: committed lengths L (the block forwards rebind the batch fields)
        if seq_lens.is_cuda:  # read on this stream; under overlap the scheduler's stream produced it
            seq_lens.record_stream(torch.cuda.current_stream())
        if self.buffers is None:  # sized from SGLang's request table, which exists once serving starts
            self.buffers = stages.StepBuffers(batch.req_to_token_pool.req_to_token.shape[0], self.block_size,
                                              anchor.device)
        k = self._choose_width(batch.batch_size())
        block = stages.block_layout(batch, anchor, self.mask_token_id, k, self.buffers)
        stages.set_block_key_lengths(batch, k)  # host L+k for both block forwards; device seq_lens stay L
        # penalties, grammar, logit_bias, custom processors
        rules = BlockRules.of(batch, k, self.vocab_size, anchor.device, self.penalty_counts)
        return Step(k=k, seq_lens=seq_lens, block=block, rules=rules)

    def _choose_width(self, bs: int) -> int:
        """This step's verify width, from the chooser's cost and acceptance models (the clock fed it the period
        that just ended). Under tensor parallelism rank 0's choice is every rank's (their clocks differ)."""
        k = self.rank_sync.width(self.width_chooser.choose(bs))
        self.width_chooser.ran(k)
        if self.width_metric is not None:
            self.width_metric.observe(k)
        return k

    def _draft(self, batch, step: Step) -> None:
        """step.proposal: the drafts [bs, k-1], their q (None when every request is greedy) and non-finite
        flags; step.draft_graph: whether the forward replayed a CUDA graph. At width 1 (a plain target decode)
        nothing is drafted."""
        k, rules = step.k, step.rules
        if k == 1:
            step.proposal = stages.no_drafts(step.bs, self.vocab_size, batch.sampling_info, step.block.ids.device)
        else:
            with use_width(self.draft_graphs, k):  # the width's own backend and CUDA graphs, when captured
                fb = self._block_forward_batch(batch, self.draft_runner, step.block.ids, step.block,
                                               CaptureHiddenMode.NULL)
                out = self.draft_runner.forward(fb)
            hidden = out.logits_output.hidden_states  # [bs*k, H]: a graph's buffer, read before its next replay
            hidden = hidden.view(-1, k, hidden.shape[-1])[:, 1:]  # [bs, k-1, H]: the mask rows
            draft_logits = self.draft_model.draft_logits(hidden)  # [bs, k-1, V]
            if rules is not None:
                rules.draft(draft_logits)
            proposal = stages.propose(draft_logits, batch.sampling_info)
            if rules is not None:  # grammar requests redraw under their grammar, before the ranks agree
                rules.constrain(proposal.drafts, proposal.q, draft_logits)
            step.proposal, step.draft_graph = self.rank_sync.drafts(proposal), out.can_run_graph
        self.draft_health.watch(batch.reqs, step.proposal.nonfinite)

    def _verify(self, batch, step: Step) -> None:
        """step.verify_ids [bs, k]; step.logits [bs, k, V] float32 with the logit rules applied (each row
        processed as the plain sampler would at that point of the output); step.target_hidden [bs*k, K*H];
        step.final_hidden [bs*k, H] (only with return_hidden_states on); step.verify_graph. With a graph the
        outputs live in its buffers; this step consumes them before the next verify."""
        step.verify_ids = stages.verify_ids(step.block, step.proposal.drafts, self.buffers)
        runner = self.target_worker.model_runner
        with use_width(self.verify_graphs, step.k):
            fb = self._block_forward_batch(batch, runner, step.verify_ids, step.block, CaptureHiddenMode.FULL)
            out = self.target_worker.forward_batch_generation(batch=None, forward_batch=fb, is_verify=True)
        step.logits = out.logits_output.next_token_logits.view(*step.verify_ids.shape, -1)
        step.target_hidden = out.logits_output.hidden_states
        step.final_hidden = out.logits_output.last_hidden_states
        step.verify_graph = out.can_run_cuda_graph
        if step.rules is not None:
            step.rules.verify(step.logits, step.verify_ids)

    def _accept(self, batch, step: Step, on_publish) -> None:
        """step.accepted (rank 0's on every TP rank); the new lengths published to an overlapped scheduler as
        soon as they exist, before the commit's work; the acceptance to the width chooser."""
        accepted = stages.accept(step.verify_ids, step.logits, step.proposal.q, step.seq_lens, batch.sampling_info)
        step.accepted = self.rank_sync.accepted(accepted)
        if self.commits_states:  # before anything else runs the target, as SGLang's own workers do
            commit_states(self.target_worker, batch, step)
        if on_publish is not None:
            on_publish(step.accepted.new_seq_lens)
        self.width_chooser.observe(step.k, step.accepted.accept_len)

    def _commit(self, batch, step: Step, returned) -> GenerationBatchResult:
        """The one place a step's side effects land: penalty counts advanced by the committed tokens, the block
        rows' target hidden states written as drafter context (rows past the commit length are overwritten by
        the next block before anything reads them), and the scheduler's result."""
        acc = step.accepted
        if step.rules is not None:
            step.rules.commit(acc.tokens, acc.accept_len)
        self.write_context(step.target_hidden, step.block.positions.flatten(), step.block.slots.flatten())
        return GenerationBatchResult(
            logits_output=returned,
            next_token_ids=acc.tokens.flatten(),
            accept_lens=acc.accept_len + 1,
            new_seq_lens=acc.new_seq_lens,
            next_draft_input=DFlashDraftInput(bonus_tokens=acc.bonus, block_size=self.block_size),
            speculative_num_draft_tokens=step.k,  # the row stride of next_token_ids
            can_run_cuda_graph=step.draft_graph and step.verify_graph,  # SGLang's decode log shows it
        )

    def _block_forward_batch(self, batch, runner, ids, block, capture: CaptureHiddenMode) -> ForwardBatch:
        """A TARGET_VERIFY ForwardBatch of k tokens per request (the block's width) at its positions and slots.
        Field edits on `batch` are undone by the scheduler's isolation after the step."""
        batch.forward_mode = ForwardMode.TARGET_VERIFY
        if self.commits_states and runner is self.target_worker.model_runner:
            prepare_mamba_track_for_verify(batch)  # radix track slots (extra_buffer only; else nothing)
        batch.input_ids = ids.flatten()
        batch.out_cache_loc = block.slots.flatten()
        batch.spec_info = BlockForwardInput(draft_token_num=ids.shape[1], positions=block.positions.flatten(),
                                            capture_hidden_mode=capture)
        return ForwardBatch.init_new(batch, runner, capture_hidden_mode=capture, return_hidden_states_before_norm=False)


def commit_states(target_worker, batch, step: Step) -> None:
    """A Gated DeltaNet target's verify forward leaves each request's recurrent state (and conv window) where it
    was and keeps the state after every block token in the pool's scratch; the state after the accepted prefix
    (anchor + accepted drafts, the tokens whose KV the cache keeps) becomes the request's state, and the radix
    cache's track slot takes the one at its interval crossing. SGLang's own commit does exactly this for a chain
    of k tokens per request (`commit_mamba_states_after_verify`); on CPU its scatter runs in torch (hook 11)."""
    bs, k = step.verify_ids.shape
    rows = torch.arange(bs, device=step.verify_ids.device)[:, None] * k
    chain = rows + torch.arange(k, device=step.verify_ids.device)[None, :]  # [bs, k]: flat index of each token
    commit_mamba_states_after_verify(target_worker, batch, step.accepted.accept_len.long() + 1, chain, k)


def check_target_runner(model_config, device: str) -> None:
    """Refuse a target the worker cannot serve (`families.refusal`), SGLang's own reading of recurrent layers
    included (its `mambaish_config`: every family whose layers keep a state SGLang tracks per request; of those,
    only Gated DeltaNet (`hybrid_gdn_config`) is served)."""
    from .sglang_api import hybrid_gdn_config, mambaish_config

    if mambaish_config(model_config) is not None and hybrid_gdn_config(model_config) is None:
        raise ValueError(recurrent_refusal(model_config.hf_text_config.model_type, "SGLang serves it with a "
                                           "recurrent-state pool (mambaish_config) that is not Gated DeltaNet"))
    check_target(model_config.hf_config, device)


def _width_histogram(widths: list[int]):
    """Prometheus histogram `sglang_dflash:verify_width` (steps per verify width) beside SGLang's own metrics,
    for a server run with --enable-metrics (SGLang has set up prometheus_client's multiprocess directory by
    then)."""
    from prometheus_client import Histogram

    from .sglang_api import get_serving

    histogram = Histogram(name="sglang_dflash:verify_width", documentation="Verify width (tokens per request "
                          "the target checks) of each DFLASH decode step; 1 is a plain target decode.",
                          labelnames=["model_name"], buckets=[float(w) for w in widths])  # host: Python ints
    return histogram.labels(model_name=get_serving().served_model_name)  # SGLang's own label value
