"""SGLang HTTP servers in child processes: start, wait for health, talk to them, stop.

Used by the demo, the benchmarks, the soak and the tests. A server always runs in its own process group: a
crashing SGLang kills its parent's process tree, so it never runs inside the caller's process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

STARTUP_TIMEOUT_S = 240


def _body(raw: bytes):
    try:
        return json.loads(raw or b"{}")
    except json.JSONDecodeError:
        return {"text": raw.decode(errors="replace")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: str | Path, draft: str | Path | None = None, *extra: str, env: dict | None = None,
                 strict_memory_check: bool = False):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model), "--port", str(self.port),
               "--host", "127.0.0.1", "--dtype", "float32", "--max-total-tokens", "8192", "--skip-server-warmup",
               "--random-seed", "0", "--sleep-on-idle", *extra]
        if draft is not None:
            cmd += ["--speculative-algorithm", "DFLASH", "--speculative-draft-model-path", str(draft)]
        self.log_file = tempfile.NamedTemporaryFile("w+", prefix="sglang-", suffix=".log", delete=False)
        full_env = {**os.environ, **(env or {})}
        if strict_memory_check:  # SGLang's idle KV-pool check raises (and the server dies) on a leak
            full_env["SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE"] = "1"
        self.proc = subprocess.Popen(cmd, stdout=self.log_file, stderr=subprocess.STDOUT, env=full_env,
                                     start_new_session=True)

    def log(self) -> str:
        return Path(self.log_file.name).read_text(errors="replace")

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> Server:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log()[-4000:]}")

    def wait_exit(self, timeout: float = STARTUP_TIMEOUT_S) -> int:
        """For servers that must refuse to start: the exit code (killing the group after the timeout)."""
        try:
            return self.proc.wait(timeout)
        finally:
            self.stop()

    def post(self, path: str, payload: dict, timeout: float = 300) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, _body(r.read())
        except urllib.error.HTTPError as e:
            return e.code, _body(e.read())

    def generate(self, input_ids: list[int], max_new_tokens: int, **sampling) -> dict:
        status, out = self.post("/generate", {
            "input_ids": input_ids,
            "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0, **sampling},
        })
        assert status == 200, out
        return out

    def generate_many(self, prompts: list[list[int]], max_new_tokens: int, concurrency: int, **sampling) -> list[dict]:
        with ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(lambda p: self.generate(p, max_new_tokens, **sampling), prompts))

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 9)
            except ProcessLookupError:
                pass
            self.proc.wait(30)


def verify_width_counts(server: Server) -> dict[int, int]:
    """Decode steps per verify width from the server's /metrics (histogram `sglang_dflash:verify_width`; the
    server must run with --enable-metrics)."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    cumulative = {}
    for line in text.splitlines():
        if line.startswith("sglang_dflash:verify_width_bucket{") and 'le="+Inf"' not in line:
            le = line.split('le="')[1].split('"')[0]
            cumulative[int(float(le))] = int(float(line.rsplit(" ", 1)[1]))
    counts, below = {}, 0
    for width in sorted(cumulative):
        counts[width], below = cumulative[width] - below, cumulative[width]
    return counts


def start_all(*servers: Server) -> list[Server]:
    """Servers start concurrently; wait for all of them."""
    try:
        return [s.wait_ready() for s in servers]
    except Exception:
        for s in servers:
            s.stop()
        raise
