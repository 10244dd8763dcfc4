"""Every SGLang name sglang-dflash uses, in one table: where SGLang 0.5.23 keeps it and why we need it.

Import SGLang names from here, never from `sglang.*`:

    from .sglang_api import ForwardBatch          # a module that needs SGLang anyway: at the top
    def f():
        from .sglang_api import get_parallel      # a module that must import without SGLang: where it is used

Importing this module imports no SGLang module. A name is imported from its SGLang module when it is read (the
module-level `__getattr__` below, PEP 562, over the table `NAMES`), each time, exactly as the `from sglang...
import` it replaces: an importer keeps the import-time behaviour it chooses (drafter and config code import without
SGLang; nothing here initialises CUDA), and a name SGLang rebinds (HookRegistry patches) is read as it is now.
A name outside the table is an AttributeError naming the table, so a new SGLang dependency is added here, with its
location and reason, or not at all.

Not here: the places we ATTACH to SGLang (dotted strings SGLang's HookRegistry resolves) are `hooks.TARGETS`, each
with the reason it exists, and the version gate's targets are `plugin.MISMATCH_TARGETS`. tests/test_plugin.py
resolves all three lists against the installed SGLang; tests/test_independence.py checks that no module of ours
imports SGLang any other way and that no entry names SGLang's built-in DFLASH code.
"""

from __future__ import annotations

import functools
import logging
import pkgutil
from typing import NamedTuple

logger = logging.getLogger("sglang_dflash")


class Name(NamedTuple):
    location: str  # "module:attribute" in SGLang 0.5.23 (pkgutil.resolve_name's form)
    why: str  # what we use it for, and where


NAMES: dict[str, Name] = {
    # -- plugin machinery: how we attach (plugin.py, hooks.py) ---------------------------------------------------
    "HookRegistry": Name("sglang.srt.plugins.hook_registry:HookRegistry",
                         "attaches every hook in hooks.install; the version gate's refusal (plugin.refuse_dflash)"),
    "HookType": Name("sglang.srt.plugins.hook_registry:HookType", "REPLACE / AROUND / BEFORE: the kinds of hook"),
    "ModelRegistry": Name("sglang.srt.models.registry:ModelRegistry",
                          "architecture DFlashDraftModel loads our drafter class (hooks.install)"),
    "register_attention_backend": Name("sglang.srt.layers.attention.attention_registry:register_attention_backend",
                                       "the name torch_native builds our verify-capable backend (hooks.install)"),
    # -- argument resolution (hooks.py, worker.py) ----------------------------------------------------------------
    "declare_resolution": Name("sglang.srt.arg_groups.overrides:declare_resolution",
                               "hook 5 declares disable_overlap_schedule during argument resolution"),
    "resolving_view": Name("sglang.srt.arg_groups.model_override_base:resolving_view",
                           "hook 10 reads the server arguments while they resolve"),
    "get_config": Name("sglang.srt.utils.hf_transformers_utils:get_config",
                       "hook 10 reads the target's HF config as SGLang loads it (overrides, remote code)"),
    "mambaish_config": Name("sglang.srt.configs.hybrid_arch:mambaish_config",
                            "SGLang's own reading of recurrent-state targets, refused (worker.check_target_runner)"),
    # -- resolved configuration at run time (runtime_context) -----------------------------------------------------
    "get_context": Name("sglang.srt.runtime_context:get_context",
                        "overrides speculative_num_draft_tokens while a verify width is captured (graphs)"),
    "get_spec": Name("sglang.srt.runtime_context:get_spec",
                     "resolved speculative arguments: block size, draft attention backend (worker, graphs)"),
    "get_parallel": Name("sglang.srt.runtime_context:get_parallel",
                         "TP rank, size and groups (parallel.ShardedLinears, graphs, worker)"),
    "get_exec": Name("sglang.srt.runtime_context:get_exec",
                     "CUDA graph settings, two-batch overlap (worker.init_cuda_graphs, graphs)"),
    "get_disagg": Name("sglang.srt.runtime_context:get_disagg", "PD multiplexing, which graphs refuses"),
    "get_serving": Name("sglang.srt.runtime_context:get_serving",
                        "served_model_name, the label of the verify-width metric (worker)"),
    # -- the speculative-worker contract (worker.py, spec_inputs.py) ---------------------------------------------
    "BaseSpecWorker": Name("sglang.srt.speculative.base_spec_worker:BaseSpecWorker",
                           "our worker's base class: SGLang's V2 speculative-worker contract"),
    "TpModelWorker": Name("sglang.srt.managers.tp_worker:TpModelWorker",
                          "the target's worker, and the drafter's, which the worker builds"),
    "GenerationBatchResult": Name("sglang.srt.managers.utils:GenerationBatchResult",
                                  "what a step hands back to the scheduler (worker)"),
    "ScheduleBatch": Name("sglang.srt.managers.schedule_batch:ScheduleBatch",
                          "the scheduler's batch, in annotations (spec_inputs)"),
    "SpecInput": Name("sglang.srt.speculative.spec_info:SpecInput", "base class of our two spec inputs (spec_inputs)"),
    "SpecInputType": Name("sglang.srt.speculative.spec_info:SpecInputType",
                          "DFLASH_DRAFT / DFLASH_VERIFY: the tags SGLang dispatches on (spec_inputs)"),
    "model_draft_parallel_spec": Name("sglang.srt.speculative.draft_parallel:model_draft_parallel_spec",
                                      "the drafter's parallel layout, as SGLang resolves a draft model's (worker)"),
    "resolve_draft_parallel_layout": Name("sglang.srt.speculative.draft_parallel:resolve_draft_parallel_layout",
                                          "the same (worker)"),
    "draft_pp_context": Name("sglang.srt.speculative.spec_utils:draft_pp_context",
                             "the drafter is built and captured in its pipeline-parallel scope (worker)"),
    "draft_tp_context": Name("sglang.srt.speculative.spec_utils:draft_tp_context",
                             "and in its tensor-parallel scope (worker)"),
    "draft_model_build_scope": Name("sglang.srt.layers.moe.utils:draft_model_build_scope",
                                    "the MoE settings a draft model is built under (worker)"),
    # -- forwards (worker.py, spec_inputs.py, outputs.py, models/draft_model.py, graphs.py, prewarm.py) ------------
    "ForwardBatch": Name("sglang.srt.model_executor.forward_batch_info:ForwardBatch",
                         "the block forwards' inputs (worker; draft_model annotations)"),
    "ForwardMode": Name("sglang.srt.model_executor.forward_batch_info:ForwardMode",
                        "TARGET_VERIFY, the mode of both block forwards (worker)"),
    "CaptureHiddenMode": Name("sglang.srt.model_executor.forward_batch_info:CaptureHiddenMode",
                              "FULL capture of the target's hidden states, NULL for the drafter (worker, spec_inputs, "
                              "outputs)"),
    "get_server_return_hidden_states_mode": Name(
        "sglang.srt.model_executor.forward_batch_info:get_server_return_hidden_states_mode",
        "whether the server returns hidden states (worker; hook 8)"),
    "ModelRunner": Name("sglang.srt.model_executor.model_runner:ModelRunner", "annotations (graphs)"),
    "SamplingPrewarmResult": Name("sglang.srt.model_executor.model_runner:SamplingPrewarmResult",
                                  "the sampled step's memory peak, kept free by KV sizing (prewarm.prewarm_sampling)"),
    # -- CUDA graphs (graphs.py, worker.py) -----------------------------------------------------------------------
    "DecodeCudaGraphRunner": Name("sglang.srt.model_executor.runner.decode_cuda_graph_runner:DecodeCudaGraphRunner",
                                  "one graph runner per extra verify width (graphs.WidthGraphs)"),
    "CudaGraphBackend": Name("sglang.srt.model_executor.cuda_graph_config:Backend",
                             "Backend.DISABLED: CUDA graphs switched off (worker.init_cuda_graphs)"),
    "current_platform": Name("sglang.srt.platforms:current_platform",
                             "whether an out-of-tree platform can capture graphs (worker.init_cuda_graphs)"),
    "get_available_gpu_memory": Name("sglang.srt.utils:get_available_gpu_memory",
                                     "free memory on the tightest rank before a width is captured (graphs)"),
    # -- attention (attention.py, models/draft_model.py, reads_width_per_forward) ----------------------------------
    "TorchNativeAttnBackend": Name("sglang.srt.layers.attention.torch_native_backend:TorchNativeAttnBackend",
                                   "the stock CPU backend ours extends to TARGET_VERIFY (attention); reads the "
                                   "verify width per forward"),
    "TritonAttnBackend": Name("sglang.srt.layers.attention.triton_backend:TritonAttnBackend",
                              "reads the verify width per forward (reads_width_per_forward)"),
    "FlashInferAttnBackend": Name("sglang.srt.layers.attention.flashinfer_backend:FlashInferAttnBackend",
                                  "reads the verify width per forward (reads_width_per_forward)"),
    "RadixAttention": Name("sglang.srt.layers.radix_attention:RadixAttention",
                           "the drafter's attention layers, run by any SGLang backend (draft_model)"),
    "AttentionType": Name("sglang.srt.layers.radix_attention:AttentionType",
                          "ENCODER_ONLY (non-causal drafter layers) / DECODER (draft_model, attention)"),
    # -- KV cache (attention.py, context.py, spec_inputs.py) ------------------------------------------------------
    "KVWriteLoc": Name("sglang.srt.mem_cache.memory_pool:KVWriteLoc",
                       "where set_kv_buffer writes (attention; context's per-layer path)"),
    "IdSpaceKind": Name("sglang.srt.mem_cache.kv_loc_plan:IdSpaceKind",
                        "FULL slot ids in FlashInfer's verify kv indices (spec_inputs)"),
    "alloc_token_slots": Name("sglang.srt.mem_cache.allocation:alloc_token_slots",
                              "reserves the next block's KV slots at page size 1 (spec_inputs.reserve_block_slots)"),
    "alloc_paged_token_slots_extend": Name("sglang.srt.mem_cache.allocation:alloc_paged_token_slots_extend",
                                           "the same for paged KV (spec_inputs.reserve_block_slots)"),
    "get_last_loc": Name("sglang.srt.mem_cache.allocation:get_last_loc",
                         "each request's last slot, for paged allocation (spec_inputs.reserve_block_slots)"),
    "page_aligned_decode_alloc_lens": Name("sglang.srt.mem_cache.allocation_sizing:page_aligned_decode_alloc_lens",
                                           "page-aligned reserve lengths, as the scheduler's admission assumes "
                                           "(spec_inputs.reserve_block_slots)"),
    # -- layers, logits and sampling (parallel.py, hooks.py, draft_model.py, outputs.py, logit_rules.py) ----------
    "ColumnParallelLinear": Name("sglang.srt.layers.linear:ColumnParallelLinear",
                                 "the drafter's q/k/v and gate/up under TP (parallel.ShardedLinears)"),
    "RowParallelLinear": Name("sglang.srt.layers.linear:RowParallelLinear",
                              "the drafter's o and down under TP (parallel.ShardedLinears)"),
    "ReplicatedLinear": Name("sglang.srt.layers.linear:ReplicatedLinear",
                             "a rank's one KV head when there are fewer KV heads than ranks (parallel.ShardedLinears)"),
    "LogitsProcessor": Name("sglang.srt.layers.logits_processor:LogitsProcessor",
                            "the target's, told to keep the final hidden state (hooks.keep_final_hidden_states)"),
    "LogitsProcessorOutput": Name("sglang.srt.layers.logits_processor:LogitsProcessorOutput",
                                  "what the drafter's forward and a decode step return (draft_model, outputs)"),
    "SamplingMaskOutput": Name("sglang.srt.layers.logits_processor:SamplingMaskOutput",
                               "return_sampling_mask results (outputs.sampling_masks)"),
    "SamplingMaskStatus": Name("sglang.srt.layers.logits_processor:SamplingMaskStatus",
                               "their status (outputs.sampling_masks)"),
    "compute_spec_logprobs": Name("sglang.srt.layers.logprob_processor:compute_spec_logprobs",
                                  "logprobs of the committed tokens, as SGLang's speculative workers report them "
                                  "(outputs.spec_logprobs)"),
    "apply_custom_logit_processor": Name("sglang.srt.layers.sampler:apply_custom_logit_processor",
                                         "requests' custom logit processors on the block rows (logit_rules)"),
    # -- hybrid Gated DeltaNet targets (worker.py, cpu_gdn.py) -----------------------------------------------------
    "hybrid_gdn_config": Name("sglang.srt.configs.hybrid_arch:hybrid_gdn_config",
                              "SGLang's reading of a Gated DeltaNet target: the worker commits its state after verify"),
    "prepare_mamba_track_for_verify": Name("sglang.srt.speculative.spec_utils:prepare_mamba_track_for_verify",
                                           "radix track slots of a GDN target's verify forward (worker._verify)"),
    "commit_mamba_states_after_verify": Name("sglang.srt.speculative.spec_utils:commit_mamba_states_after_verify",
                                             "commits a GDN target's state to the accepted prefix after verify "
                                             "(worker.commit_states)"),
    "HybridLinearAttnBackend": Name("sglang.srt.layers.attention.hybrid_linear_attn_backend:HybridLinearAttnBackend",
                                    "a GDN target's backend: full attention + GDN (reads_width_per_forward, graphs)"),
    "GDNAttnBackend": Name("sglang.srt.layers.attention.linear.gdn_backend:GDNAttnBackend",
                           "base of our torch GDN backend on CPU (cpu_gdn.TorchGDNAttnBackend)"),
    # -- platforms (cpu_platform.py) ------------------------------------------------------------------------------
    "CpuSRTPlatform": Name("sglang.srt.platforms.cpu:CpuSRTPlatform", "base class of our CPU platform"),
    "PlatformEnum": Name("sglang.srt.platforms.interface:PlatformEnum", "OOT, what our platform says it is"),
}

# Not a Python name: the module server.py runs as `python -m` to start an SGLang HTTP server.
LAUNCH_SERVER_MODULE = "sglang.launch_server"


def __getattr__(name: str):
    """`sglang_api.X` / `from .sglang_api import X`: X imported from its SGLang module, as listed in NAMES."""
    return _resolve(name)


def _resolve(name: str):
    entry = NAMES.get(name)
    if entry is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}: SGLang names are read through "
                             "sglang_api.NAMES; add it there with its SGLang location and why")
    return pkgutil.resolve_name(entry.location)


# -- facts about SGLang classes ---------------------------------------------------------------------------------
def reads_width_per_forward(backend: object) -> bool:
    """Whether `backend` (an SGLang attention backend) reads a TARGET_VERIFY forward's width from its spec_info, so
    one backend serves every verify width eagerly. In SGLang 0.5.23 torch_native (ours included), triton and
    flashinfer do; FA3 fixes the width when built, so a width below the block needs a backend of its own
    (`graphs.WidthGraphs`). A hybrid linear-attention target's backend is read through its full-attention part: its
    GDN part takes the width from the forward's spec_info when it runs eager (hybrid_linear_attn_backend.py,
    `_forward_metadata`; our CPU one, `cpu_gdn`, likewise)."""
    if isinstance(backend, _resolve("HybridLinearAttnBackend")):
        backend = backend.full_attn_backend
    return isinstance(backend, _per_forward_width_classes())


@functools.cache
def _per_forward_width_classes() -> tuple[type, ...]:
    classes = [_resolve("TorchNativeAttnBackend")]  # imported by attention.py already
    for name in ("TritonAttnBackend", "FlashInferAttnBackend"):  # may not import on CPU (no triton, no FlashInfer)
        try:
            classes.append(_resolve(name))
        except ImportError as e:  # exact, not a fallback: a class this process cannot import has no instance here
            logger.info("sglang-dflash: %s does not import here (%s); no backend of it can run", name, e)
    return tuple(classes)
