"""The CPU platform's entry point (group `sglang.srt.platforms`): `activate()`, behind the version gate.

SGLang calls `activate()` when it first resolves its platform, in every process. It names our CPU platform
(`cpu_platform.DFlashCpuPlatform`) only on the SGLang release we were written against (0.5.23; on another one it
activates nothing, and the mismatch is logged once per process: `plugin.check_sglang_version`) and only on a machine
without CUDA, ROCm, XPU or NPU, so GPU machines are untouched. This module imports no SGLang module: the platform
class is imported by SGLang from the name returned, after the gate.
"""

from __future__ import annotations

import torch

from ..plugin import check_sglang_version


def activate() -> str | None:
    if not check_sglang_version():
        return None
    if torch.cuda.is_available():
        return None
    for name in ("xpu", "npu"):
        mod = getattr(torch, name, None)
        if mod is not None and getattr(mod, "is_available", lambda: False)():
            return None
    return "sglang_dflash.srt.cpu_platform.DFlashCpuPlatform"
