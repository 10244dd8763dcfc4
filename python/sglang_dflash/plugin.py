"""SGLang plugin entry point (group `sglang.srt.plugins`, name `dflash`): the version gate.

SGLang calls `register()` with no arguments early in every process, before argument parsing
(`sglang.srt.plugins.load_plugins`). It checks that the installed SGLang is the release we were written
against (0.5.23) and then installs the hooks; on any other release nothing is attached and a warning
names both versions. The hooks themselves, each with the reason it exists, are in ONE module:
`sglang_dflash.srt.hooks`; read that one to see how we attach.

`SGLANG_PLUGINS=<names>` (a whitelist) leaves this plugin out when `dflash` is not named.
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
