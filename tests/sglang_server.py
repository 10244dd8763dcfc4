"""The tests' server: `sglang_dflash.server.Server` with SGLang's strict idle KV-leak check switched on (a leak
kills the server, so the test that caused it fails). Everything else (`start_all`, `verify_width_counts`) is
imported from `sglang_dflash.server`."""

from __future__ import annotations

from sglang_dflash.server import Server as _Server


class Server(_Server):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("strict_memory_check", True)
        super().__init__(*args, **kwargs)
