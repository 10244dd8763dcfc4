"""Test servers: `sglang_dflash.server.Server` with SGLang's strict idle KV-leak check switched on."""

from __future__ import annotations

from sglang_dflash.server import Server as _Server
from sglang_dflash.server import start_all  # noqa: F401


class Server(_Server):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("strict_memory_check", True)
        super().__init__(*args, **kwargs)


def verify_width_counts(server) -> dict[int, int]:
    """Decode steps per verify width from the server's /metrics (histogram `sglang_dflash:verify_width`; the
    server must run with --enable-metrics)."""
    import urllib.request

    text = urllib.request.urlopen(server.url + "/metrics", timeout=30).read().decode()
    cumulative = {}
    for line in text.splitlines():
        if line.startswith("sglang_dflash:verify_width_bucket{") and 'le="+Inf"' not in line:
            le = line.split('le="')[1].split('"')[0]
            cumulative[int(float(le))] = int(float(line.rsplit(" ", 1)[1]))
    counts, below = {}, 0
    for width in sorted(cumulative):
        counts[width], below = cumulative[width] - below, cumulative[width]
    return counts
