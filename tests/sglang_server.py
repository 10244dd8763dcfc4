"""Test servers: `sglang_dflash.server.Server` with SGLang's strict idle KV-leak check switched on."""

from __future__ import annotations

from sglang_dflash.server import Server as _Server
from sglang_dflash.server import start_all  # noqa: F401


class Server(_Server):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("strict_memory_check", True)
        super().__init__(*args, **kwargs)
