"""dflash_kernels: drop-in kernels for the hot path of a DFLASH step, each beside its PyTorch reference.

Every kernel module defines `reference(...)` (plain PyTorch, the definition) and `triton_impl(...)` (same
signature, same outputs). `get(name, device, **shape)` returns the Triton version where it can run (a CUDA
device, or any device under TRITON_INTERPRET=1, which is how the CPU tests run it) and takes the shape (a
module's optional `supports(**shape)`), the reference elsewhere; falling back is logged once per kernel.
Modules are imported lazily, so CPU-only installs never need a working Triton.

| kernel | computes | module |
|---|---|---|
| block_prep | [bonus, MASK..] ids, positions and KV slots of every request's next block | block_prep.py |
| greedy_accept | accept length, bonus, committed run and new lengths | greedy_accept.py |
| sample_accept | rejection sampling with the drafter's q, bonus by an exponential race | sample_accept.py |
| context_kv | every drafter layer's context K/V: k_norm + RoPE + scatter into the pools | context_kv.py |
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable

logger = logging.getLogger("sglang_dflash")

KERNELS = ("block_prep", "greedy_accept", "sample_accept", "context_kv")
_warned: set[str] = set()


def lazy_jit(build: Callable[[], Callable]) -> Callable[[], Callable]:
    """Compile on first use: `build()` imports Triton and returns the @triton.jit function, so importing a
    kernel module never needs Triton (and TRITON_INTERPRET is read when the kernel is first used)."""
    compiled: list[Callable] = []

    def get() -> Callable:
        if not compiled:
            compiled.append(build())
        return compiled[0]

    return get


def triton_usable(device) -> bool:
    if os.environ.get("TRITON_INTERPRET") == "1":  # Triton's own switch: kernels run on the CPU interpreter
        return _has_triton()
    return str(device).startswith("cuda") and _has_triton()


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def get(name: str, device, **shape) -> Callable:
    """The kernel `name` for `device`. `shape` (e.g. head_dim=...) is checked against the module's `supports`
    where it has one: a shape the Triton version cannot take gets the reference, logged once per kernel."""
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}, expected one of {KERNELS}")
    module = importlib.import_module(f"{__name__}.{name}")
    if triton_usable(device):
        supports = getattr(module, "supports", None)
        if supports is None or supports(**shape):
            return module.triton_impl
        _log_once(name, "dflash kernel %s: the Triton version does not take %s, using the PyTorch reference",
                  name, shape)
        return module.reference
    _log_once(name, "dflash kernel %s: Triton cannot run on %s here, using the PyTorch reference", name, device)
    return module.reference


def _log_once(name: str, msg: str, *args) -> None:
    if name not in _warned:
        _warned.add(name)
        logger.info(msg, *args)
