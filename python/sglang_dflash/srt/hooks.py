"""Every place sglang-dflash attaches to SGLang, in one module. Written against SGLang 0.5.23.

Called from the `sglang.srt.plugins` entry point (`sglang_dflash.plugin.register`) in every SGLang
process, before SGLang parses its arguments. Each hook says why it exists:

1. Worker (HookRegistry class REPLACE of `sglang.srt.speculative.dflash_worker_v2.DFlashWorkerV2`):
   `--speculative-algorithm DFLASH` then builds OUR worker, while SGLang's generic wiring keyed on the
   DFLASH name stays on: target hidden-state capture at the drafter's layers, draft KV pool sizing (one
   draft slot per target slot), and the `spec_info.prepare_for_decode` dispatch. We name the upstream class
   only as a string target; nothing of it is imported, subclassed or called by us.
2. Drafter model (ModelRegistry, overwrite): architecture `DFlashDraftModel` loads our class.
3. Attention ("torch_native" in SGLang's attention-backend registry): the stock CPU backend cannot run
   TARGET_VERIFY forwards; ours can, so the same worker code path runs on CPU.
4. Request check (REPLACE `sglang.srt.managers.scheduler.validate_dflash_request`, the function the
   scheduler calls for every DFLASH request): out-of-vocabulary prompt ids are aborted with a message
   (HTTP 400) instead of crashing the scheduler (`requests.validate_request`).
7. Input check (AROUND `TokenizerManager._validate_one_request`, where SGLang 0.5.23 checks a request's
   lengths before it is sent to the scheduler; DFLASH servers only): inputs that would crash a forward
   and every request in flight with it are served exactly where they can be (stop ids outside the
   vocabulary dropped, a top_k past int32 switched off) and refused with HTTP 400 naming the bad value
   otherwise (out-of-vocabulary prompt ids, ...) (`requests.admit_input`). Stock SGLang checks none of them.
5. Scheduler mode (AROUND `sglang.srt.arg_groups.speculative_hook._handle_dflash`, SGLang's DFLASH argument
   resolution): SGLang 0.5.23 overlaps speculative steps by default on GPU; our default is the synchronous
   scheduler, and `SGLANG_ENABLE_DFLASH_SPEC_V2=1` (or `SGLANG_ENABLE_SPEC_V2=1`) keeps the overlap path on
   (see `sglang_dflash.envs`).
6. KV-copy warm-up (AROUND `MHATokenToKVPool._init_kv_copy_and_warmup`): any speculative algorithm makes
   SGLang warm up a Triton KV-copy kernel, which has no driver on a CPU-only machine; DFLASH never moves KV,
   so on CPU the warm-up is skipped (the copy config stays None, as it is for pools built without it).
8. Final hidden states (`LogitsProcessor.keep_last_hidden_states` of the TARGET, set by `keep_final_hidden_states`
   from the worker, only on servers started with --enable-return-hidden-states / --return-hidden-states-mode):
   the worker captures the target's hidden states at the drafter's layers, and SGLang's logits processor then
   hands back those layers instead of the final hidden state; with this flag on (SGLang sets it itself for
   its aux-hidden-state capture feature) it also returns the final one, which is what return_hidden_states
   reports without speculation.
9. Sampling-mask request check (AROUND `sglang.srt.managers.scheduler.validate_spec_sampling_mask_request`, which
   the scheduler calls for requests with return_sampling_mask under speculation): SGLang's own DFLASH refuses
   min_p and, without its CUDA sampling-verify kernel (any CPU), every non-greedy request, because its
   verify distribution cannot honour them; ours is the sampler's exact one (`outputs.sampling_masks`), so
   DFLASH requests pass (other algorithms keep SGLang's check).
10. Start-up refusals (BEFORE `sglang.srt.arg_groups.model_hook.handle_model_specific_adjustments`, the first
    argument-resolution step that reads the target's config, in the launching process; DFLASH servers only): a
    target family the worker cannot serve (`families.refusal`: recurrent layers; MLA and attention sinks off a GPU),
    a drafter that does not fit the target (from the configs alone), `--speculative-draft-window-size` and
    `--enable-mixed-chunk` are refused with a message naming the reason, before SGLang's own
    model-specific checks (on CPU they would stop a hybrid target first, with a message about Mamba cache
    buffers) and before any scheduler starts. The worker repeats the family check on SGLang's model config. Off a
    GPU a Gated DeltaNet target also gets the synchronous scheduler declared here (SGLang picks its Mamba radix
    cache strategy from the overlap setting before hook 5 runs; extra_buffer needs a GPU).
11. Hybrid Gated DeltaNet targets on CPU (our CPU platform only, `install_cpu_gdn`): SGLang 0.5.23 runs a GDN layer
    only through Triton / CUDA kernels (its CPU engine needs a CPU build of sgl-kernel, whose verify path does not
    exist). REPLACE of the GDN backend class (`gdn_backend.GDNAttnBackend` -> `cpu_gdn.TorchGDNAttnBackend`, same
    pool and metadata, kernels in torch), of the post-verify state scatter (`scatter_mamba_states_after_mtp_verify`,
    which refuses CPU tensors), of the gated RMSNorms' forwards, of the Qwen3-Next projection split and of the Qwen2-MoE
    shared-expert gate (Triton); AROUND Qwen3-Next's GDN layer construction, which asks
    `torch.get_device_module().current_device()` (CUDA on a CUDA build of torch without a driver).

Every target is listed in `TARGETS` (tests/test_plugin.py resolves each in the installed SGLang); the SGLang names
the hooks use are read from `sglang_api`, which says where each lives in SGLang 0.5.23 and why.
"""

from __future__ import annotations

import logging

from ..families import GDN_MODEL_TYPES

logger = logging.getLogger("sglang_dflash")

WORKER_TARGET = "sglang.srt.speculative.dflash_worker_v2.DFlashWorkerV2"
REQUEST_CHECK_TARGET = "sglang.srt.managers.scheduler.validate_dflash_request"
ARGS_TARGET = "sglang.srt.arg_groups.speculative_hook._handle_dflash"
KV_WARMUP_TARGET = "sglang.srt.mem_cache.memory_pool.MHATokenToKVPool._init_kv_copy_and_warmup"
SAMPLING_MASK_CHECK_TARGET = "sglang.srt.managers.scheduler.validate_spec_sampling_mask_request"
MODEL_ARGS_TARGET = "sglang.srt.arg_groups.model_hook.handle_model_specific_adjustments"
INPUT_CHECK_TARGET = "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request"
# hook 11, CPU only: a hybrid Gated DeltaNet target's Triton / CUDA-only pieces, in torch (`cpu_gdn`)
GDN_BACKEND_TARGET = "sglang.srt.layers.attention.linear.gdn_backend.GDNAttnBackend"
GDN_COMMIT_TARGET = "sglang.kernels.ops.mamba.mamba_state_scatter_triton.scatter_mamba_states_after_mtp_verify"
GDN_FUSED_NORM_TARGET = "sglang.kernels.ops.attention.fla.fused_norm_gate.FusedRMSNormGated.forward"
GDN_GATED_NORM_TARGET = "sglang.kernels.ops.attention.fla.layernorm_gated.RMSNorm.forward"
GDN_SPLIT_TARGET = "sglang.kernels.ops.attention.triton_gdn_fused_proj.fused_qkvzba_split_reshape_cat"
GDN_LAYER_TARGET = "sglang.srt.models.qwen3_next.Qwen3GatedDeltaNet.__init__"
SHARED_EXPERT_GATE_TARGET = "sglang.kernels.ops.elementwise.elementwise.fused_gate_sigmoid_mul_add"
CPU_GDN_TARGETS = (GDN_BACKEND_TARGET, GDN_COMMIT_TARGET, GDN_FUSED_NORM_TARGET, GDN_GATED_NORM_TARGET,
                   GDN_SPLIT_TARGET, GDN_LAYER_TARGET, SHARED_EXPERT_GATE_TARGET)
TARGETS = (WORKER_TARGET, REQUEST_CHECK_TARGET, ARGS_TARGET, KV_WARMUP_TARGET, SAMPLING_MASK_CHECK_TARGET,
           MODEL_ARGS_TARGET, INPUT_CHECK_TARGET, *CPU_GDN_TARGETS)


def _admit_input_then(original, manager, obj, input_ids, *args, **kwargs):
    if manager.server_args.speculative_algorithm == "DFLASH":
        from .requests import admit_input

        cfg = manager.model_config
        admit_input(obj, input_ids, cfg.vocab_size, cfg.hidden_size)
    return original(manager, obj, input_ids, *args, **kwargs)


def _sampling_masks_served(original, req, spec_algorithm, *args, **kwargs):
    if spec_algorithm.is_dflash():
        return None
    return original(req, spec_algorithm, *args, **kwargs)


def keep_final_hidden_states(target_model) -> int:
    """Hook 8: -> how many logits processors now keep the final hidden state beside the captured layers."""
    from .sglang_api import LogitsProcessor

    found = [m for m in target_model.modules() if isinstance(m, LogitsProcessor)]
    for m in found:
        m.keep_last_hidden_states = True
    return len(found)


def _skip_kv_copy_warmup_on_cpu(original, pool, *args, **kwargs):
    if str(pool.device).startswith("cpu"):
        pool._kv_copy_config = None
        return None
    return original(pool, *args, **kwargs)


def _synchronous_unless_overlap_requested(original, server_args, *args, **kwargs):
    from ..envs import overlap_requested
    from .sglang_api import declare_resolution

    result = original(server_args, *args, **kwargs)
    if not overlap_requested():
        declare_resolution(server_args, "sglang_dflash", disable_overlap_schedule=True)
    return result


def _check_start_args_first(server_args, *args, **kwargs):
    from .sglang_api import resolving_view

    cfg = resolving_view(server_args)
    if cfg.speculative_algorithm == "DFLASH":
        text = check_start_args(cfg)
        if text.get("model_type") in GDN_MODEL_TYPES and not str(cfg.device).startswith("cuda"):
            # SGLang's Mamba radix cache then resolves to no_buffer (its extra_buffer needs a GPU); our default
            # synchronous scheduler is declared later in resolution (hook 5), too late for that choice
            from .sglang_api import declare_resolution

            declare_resolution(server_args, "sglang_dflash", disable_overlap_schedule=True)
    return None


def check_start_args(cfg) -> dict:
    """Hook 10's refusals, before any process starts: flags the worker would otherwise ignore or cannot serve, a
    target family it cannot serve (`families.refusal`), and a drafter that does not fit the target
    (`config.check_for_sglang`: layer ids, hidden size, mask id, block size), each read from the configs as SGLang
    loads them. The worker repeats the last two on SGLang's own model configs. -> the target's text config."""
    import json

    from ..config import check_for_sglang
    from ..envs import overlap_requested
    from ..families import check_target, text_config
    from .sglang_api import get_config

    if cfg.speculative_draft_window_size is not None:
        raise ValueError(f"sglang-dflash: --speculative-draft-window-size={cfg.speculative_draft_window_size} is not "
                         "supported (the drafter attends to the whole committed context); start without it")
    if cfg.enable_mixed_chunk:
        raise ValueError("sglang-dflash: --enable-mixed-chunk is not supported (prefill and decode of one batch in one "
                         "forward); start without it")
    overrides = json.loads(cfg.json_model_override_args or "{}")
    target = get_config(cfg.model_path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision,
                        model_override_args=overrides)
    check_target(target, str(cfg.device))
    text = text_config(target)
    if text.get("model_type") in GDN_MODEL_TYPES and overlap_requested() and not str(cfg.device).startswith("cuda"):
        raise ValueError(f"sglang-dflash: a Gated DeltaNet target ({text['model_type']!r}) under the overlap scheduler "
                         "needs SGLang's extra_buffer Mamba radix cache, which SGLang 0.5.23 runs only on GPUs; on "
                         f"device {cfg.device!r} start without SGLANG_ENABLE_DFLASH_SPEC_V2 / SGLANG_ENABLE_SPEC_V2")
    if cfg.speculative_draft_model_path is not None:  # else SGLang's own DFLASH check names the missing flag
        draft = get_config(cfg.speculative_draft_model_path, trust_remote_code=cfg.trust_remote_code,
                           revision=cfg.speculative_draft_model_revision)
        block_size = cfg.speculative_num_draft_tokens
        check_for_sglang(draft, target, None if block_size is None else int(block_size))
    return text


def _create_torch_native_backend(runner):
    from .attention import VerifyCapableTorchNativeBackend

    return VerifyCapableTorchNativeBackend(runner)


def install() -> None:
    from .requests import validate_request
    from .sglang_api import HookRegistry, HookType, ModelRegistry, register_attention_backend
    from .worker import DFlashWorker

    HookRegistry.register(WORKER_TARGET, DFlashWorker, HookType.REPLACE)
    HookRegistry.register(REQUEST_CHECK_TARGET, validate_request, HookType.REPLACE)
    HookRegistry.register(ARGS_TARGET, _synchronous_unless_overlap_requested, HookType.AROUND)
    HookRegistry.register(MODEL_ARGS_TARGET, _check_start_args_first, HookType.BEFORE)
    HookRegistry.register(KV_WARMUP_TARGET, _skip_kv_copy_warmup_on_cpu, HookType.AROUND)
    HookRegistry.register(INPUT_CHECK_TARGET, _admit_input_then, HookType.AROUND)
    HookRegistry.register(SAMPLING_MASK_CHECK_TARGET, _sampling_masks_served, HookType.AROUND)
    ModelRegistry.register("sglang_dflash.srt.models", overwrite=True, strict=True)
    register_attention_backend("torch_native")(_create_torch_native_backend)
    if cpu_platform_active():
        install_cpu_gdn()


def cpu_platform_active() -> bool:
    from .platform import activate

    return activate() is not None


def _build_gdn_layer_on_cpu(original, *args, **kwargs):
    from .cpu_gdn import cpu_device_module

    with cpu_device_module():
        return original(*args, **kwargs)


def install_cpu_gdn() -> None:
    """Hook 11 (our CPU platform only): hybrid Gated DeltaNet targets run on CPU with the torch pieces of `cpu_gdn`:
    SGLang's GDN backend class and its post-verify state commit replaced, the GDN layer's gated norms and projection
    split in torch, and its construction shielded from `torch.get_device_module()` answering CUDA."""
    from . import cpu_gdn
    from .sglang_api import HookRegistry, HookType

    HookRegistry.register(GDN_BACKEND_TARGET, cpu_gdn.TorchGDNAttnBackend, HookType.REPLACE)
    HookRegistry.register(GDN_COMMIT_TARGET, cpu_gdn.scatter_states_after_verify, HookType.REPLACE)
    for target in (GDN_FUSED_NORM_TARGET, GDN_GATED_NORM_TARGET):
        HookRegistry.register(target, cpu_gdn.rms_norm_gated, HookType.REPLACE)
    HookRegistry.register(GDN_SPLIT_TARGET, cpu_gdn.split_qkvzba, HookType.REPLACE)
    HookRegistry.register(GDN_LAYER_TARGET, _build_gdn_layer_on_cpu, HookType.AROUND)
    HookRegistry.register(SHARED_EXPERT_GATE_TARGET, cpu_gdn.gate_sigmoid_mul_add, HookType.REPLACE)
