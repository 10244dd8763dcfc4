"""SGLang plugin entry point (group `sglang.srt.plugins`, name `dflash`): the version gate.

SGLang calls `register()` with no arguments early in every process, before argument parsing
(`sglang.srt.plugins.load_plugins`). On the release we were written against (0.5.23) it installs the hooks; they
are all in ONE module, `sglang_dflash.srt.hooks`, each with the reason it exists: read that one to see how we
attach. On any other release nothing of ours is attached (a warning names both versions, once per process), and a
server or engine that asks for DFLASH fails at start with an error naming both versions (`refuse_dflash`): without
that, `--speculative-algorithm DFLASH` would silently run SGLang's built-in DFLASH worker.

`SGLANG_PLUGINS=<names>` (a whitelist) leaves this plugin out when `dflash` is not named.
The CPU platform is a second entry point (group `sglang.srt.platforms`, `sglang_dflash.srt.platform:activate`),
behind the same gate (`check_sglang_version`).
"""

from __future__ import annotations

import logging
import pkgutil
import sys

from . import SGLANG_VERSION, __version__

logger = logging.getLogger("sglang_dflash")

# Where a mismatched release is stopped from serving DFLASH without us (a BEFORE hook raising for DFLASH only).
# Both are where SGLang 0.5.23 starts a DFLASH server, in the launching process, before any scheduler starts:
MISMATCH_TARGETS = (
    # the DFLASH argument resolution (`SpeculativeAlgorithm.handle_server_args` calls it for DFLASH only), reached
    # by every launcher through `ServerArgs.resolve_once`; a private name, so another release may have moved it
    "sglang.srt.arg_groups.speculative_hook._handle_dflash",
    # ServerArgs' public validation step (`Engine._launch_subprocesses`, which the HTTP server goes through too)
    "sglang.srt.server_args.ServerArgs.check_server_args",
)
_mismatch_warned = False  # the mismatch warning is logged once per process (plugin and platform entry points)


def installed_sglang_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sglang")
    except PackageNotFoundError:
        return None


def check_sglang_version() -> bool:
    """True when the installed SGLang is the release we were written against; else say so, once per process."""
    global _mismatch_warned
    found = installed_sglang_version()
    if found == SGLANG_VERSION:
        return True
    if not _mismatch_warned:
        _mismatch_warned = True
        logger.warning(
            "sglang-dflash %s was written against sglang %s but sglang %s is installed; its DFLASH worker, hooks "
            "and CPU platform stay off, and a server asking for DFLASH is refused (install sglang==%s to use them)",
            __version__, SGLANG_VERSION, found, SGLANG_VERSION,
        )
    return False


def register() -> None:
    if not check_sglang_version():
        refuse_dflash(installed_sglang_version())
        return
    from .srt import hooks

    hooks.install()


def refusal(found: str | None) -> str:
    return (f"sglang-dflash {__version__} was written against sglang {SGLANG_VERSION} but sglang {found} is "
            f"installed, so its DFLASH worker is not attached and this DFLASH server would run SGLang's built-in one "
            f"instead. Install sglang=={SGLANG_VERSION}, or leave this plugin out (uninstall sglang-dflash, or name "
            f"only the plugins you want in SGLANG_PLUGINS) to serve SGLang's own DFLASH")


def refuse_dflash(found: str | None, targets: tuple[str, ...] = MISMATCH_TARGETS,
                  argv: list[str] | None = None) -> None:
    """On a release other than ours: make a server or engine that asks for DFLASH fail at start, naming both versions.

    A BEFORE hook on each of `targets` this release still has raises `refusal(found)` when the server arguments ask
    for DFLASH (other servers start as they would without us). When none of them resolves, the only signal left is
    this process's command line (`argv`, default sys.argv): if it asks for DFLASH, SystemExit now, at plugin load.
    SystemExit because SGLang's loader catches any Exception from a plugin, logs it and carries on, which would
    leave the built-in DFLASH serving; it is how argparse refuses arguments too. Only as the last resort: a command
    line says nothing of an Engine built in Python or of arguments in a --config file, which the hooks see.
    """
    if _hook_refusal(targets):
        return
    if _asks_for_dflash(sys.argv[1:] if argv is None else argv):
        raise SystemExit(refusal(found))


def _hook_refusal(targets: tuple[str, ...]) -> list[str]:
    """-> the targets a refusing BEFORE hook was registered on (those this release has)."""
    try:
        from .srt.sglang_api import HookRegistry, HookType
    except ImportError:  # this release keeps its hook registry elsewhere: nothing can be hooked
        return []
    hooked = [t for t in targets if _resolves(t)]
    for target in hooked:
        HookRegistry.register(target, _refuse_if_dflash, HookType.BEFORE)
    return hooked


def _refuse_if_dflash(server_args, *args, **kwargs) -> None:
    # read defensively: this runs on a release we were not written against, on every server's arguments
    algorithm = getattr(server_args, "speculative_algorithm", None)
    if str(algorithm or "").upper() == "DFLASH":
        raise RuntimeError(refusal(installed_sglang_version()))


def _resolves(target: str) -> bool:
    """Whether `module.path.attr` names an attribute, resolved as HookRegistry resolves its targets."""
    path, _, attr = target.rpartition(".")
    try:
        return hasattr(pkgutil.resolve_name(path), attr)
    except (ImportError, AttributeError):
        return False


def _asks_for_dflash(args: list[str]) -> bool:
    """Whether command-line `args` hold `--speculative-algorithm DFLASH` (or `=DFLASH`, any case)."""
    flag = "--speculative-algorithm"
    values = [b for a, b in zip(args, args[1:]) if a == flag]
    values += [a.split("=", 1)[1] for a in args if a.startswith(flag + "=")]
    return any(v.upper() == "DFLASH" for v in values)
