"""SGLang plugin entry point (group `sglang.srt.plugins`, name `dflash`).

SGLang calls `register()` with no arguments early in every process, before argument parsing
(`sglang.srt.plugins.load_plugins`). Every hook this package places into SGLang is registered from here,
so this module is the one place to read to see how we attach. Written against SGLang 0.5.23.

`SGLANG_PLUGINS=<names>` (a whitelist) leaves this plugin out when `dflash` is not named.

What it attaches is listed, with the reason for each hook, in `sglang_dflash.srt.hooks`. On an SGLang
release other than the one we were written against, nothing is attached and a warning names both.
The CPU platform is a second entry point (group `sglang.srt.platforms`, `sglang_dflash.srt.platform`).
"""

from __future__ import annotations

import logging

from . import SGLANG_VERSION, __version__

logger = logging.getLogger("sglang_dflash")


def installed_sglang_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sglang")
    except PackageNotFoundError:
        return None


def check_sglang_version() -> bool:
    """True when the installed SGLang is the release we were written against; else say so, once."""
    found = installed_sglang_version()
    if found == SGLANG_VERSION:
        return True
    logger.warning(
        "sglang-dflash %s was written against sglang %s but sglang %s is installed; "
        "its DFLASH hooks stay off (install sglang==%s to use them)",
        __version__, SGLANG_VERSION, found, SGLANG_VERSION,
    )
    return False


def register() -> None:
    if not check_sglang_version():
        return
    from .srt import hooks

    hooks.install()
