"""A CPU platform for SGLang, named by `platform.activate()` (the `sglang.srt.platforms` entry point) on SGLang 0.5.23
machines without a GPU.

SGLang 0.5.23 on a CPU-only machine without its CPU kernel build falls back to a bare platform whose
rotary embedding imports vllm, and refuses DFLASH on device "cpu". This out-of-tree platform is SGLang's
in-tree CPU platform plus: torch_native attention and the pytorch sampler by default, DFLASH supported
with torch_native for the drafter too (and triton under TRITON_INTERPRET=1). Written against SGLang 0.5.23.
"""

from __future__ import annotations

from .sglang_api import CpuSRTPlatform, PlatformEnum


class DFlashCpuPlatform(CpuSRTPlatform):
    _enum = PlatformEnum.OOT

    def get_device(self, device_id: int = 0) -> str:
        # A string, not torch.device: SGLang 0.5.23 fills a missing --device with this value and then
        # calls .split(":") on it (arg_groups/serving_hook.py, handle_missing_default_values).
        return "cpu"

    def get_default_attention_backend(self) -> str:
        return "torch_native"

    def get_default_speculative_draft_attention_backend(self, algorithm: str) -> str:
        return "torch_native"

    def supports_speculative_algorithm(self, algorithm: str) -> bool:
        return algorithm.upper() == "DFLASH"

    def supports_speculative_draft_attention_backend(self, algorithm: str, backend: str) -> bool:
        from ..envs import triton_interpreter

        # triton only under Triton's CPU interpreter: SGLang's triton backend then runs here (slowly), which is
        # how its GPU metadata path (kv indptr, ENCODER_ONLY non-causal extend) is tested on CPU
        allowed = ("torch_native", "triton") if triton_interpreter() else ("torch_native",)
        return algorithm.upper() == "DFLASH" and backend in allowed

    def apply_server_args_defaults(self, server_args) -> None:
        super().apply_server_args_defaults(server_args)
        if getattr(server_args, "device", None) in (None, "auto"):
            server_args.device = "cpu"
        if server_args.sampling_backend is None:
            server_args.sampling_backend = "pytorch"
        server_args.disable_cuda_graph = True
