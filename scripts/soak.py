"""Soak a DFLASH server: N concurrent clients for T seconds with a mix of requests, then check nothing was lost,
no answer changed, no KV slot leaked and the server's memory did not grow.

    python scripts/soak.py [--concurrency 16] [--duration 60] [--max-total-tokens 2048] [--target DIR --draft DIR]

Defaults: the bundled pair on CPU. The server runs with SGLang's strict idle KV-leak check
(SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE=1: a leak kills it), a small KV pool and an optimistic admission
(--schedule-conservativeness 0.05), so the scheduler must queue AND retract requests. Each client loops,
picking one request at random:

    greedy      a held-out prompt, 32 new tokens; the answer must equal the target alone (reference loop)
    long        4 prompts joined (~180 tokens), up to 256 new tokens or EOS, greedy; checked the same way
    sampled     temperature 0.8 / top-p 0.95 / top-k 50, 32 new tokens: all of them, ids in the vocabulary
    n2          sampled with n=2: two full answers
    stream_cut  a streamed request the client drops after its first chunks (the server must free it)
    bad         an out-of-vocabulary prompt id: HTTP 400 naming it

A warm-up phase (every kind, --warmup seconds) comes first; the server's resident memory (its whole
process tree) is read after it and again after the soak and an idle pause. Prints requests sent /
completed / failed / mismatched per kind, latency p50 / p99, retractions seen in the server log, memory
at both points, and a final JSON line. Exits 1 on any failed (lost, errored, unexpected status) or
mismatched request, a dead server, or memory that grew more than --max-memory-growth (10%).
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

from sglang_dflash.assets import heldout_prompts, tiny_pair
from sglang_dflash.server import Server

KINDS = ("greedy", "long", "sampled", "n2", "stream_cut", "bad")
WEIGHTS = (30, 8, 20, 10, 12, 6)
SHORT_NEW, LONG_NEW = 32, 256


def tree_rss_mb(pid: int) -> float:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return float("nan")
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


class Soak:
    def __init__(self, server: Server, vocab: int, greedy_prompts, long_prompts, answers: dict, seed: int) -> None:
        self.server, self.vocab = server, vocab
        self.greedy_prompts, self.long_prompts, self.answers = greedy_prompts, long_prompts, answers
        self.seed = seed
        self.lock = threading.Lock()
        self.counts: dict[str, dict[str, int]] = defaultdict(lambda: dict(sent=0, completed=0, failed=0, mismatched=0))
        self.latencies: list[float] = []
        self.failures: list[str] = []

    def _record(self, kind: str, outcome: str, latency: float | None = None, why: str = "") -> None:
        with self.lock:
            self.counts[kind][outcome] += 1
            if latency is not None:
                self.latencies.append(latency)
            if why and len(self.failures) < 20:
                self.failures.append(f"{kind}: {why}")

    def _post(self, payload: dict, timeout: float = 600):
        return self.server.post("/generate", payload, timeout=timeout)

    def one(self, rng: random.Random, kind: str) -> None:
        with self.lock:
            self.counts[kind]["sent"] += 1
        t0 = time.perf_counter()
        try:
            outcome, why = getattr(self, f"_{kind}")(rng)
        except Exception as e:  # a lost request: connection reset, timeout, a dead server
            outcome, why = "failed", f"{type(e).__name__}: {e}"
        self._record(kind, outcome, time.perf_counter() - t0 if outcome == "completed" and kind != "stream_cut"
                     else None, why)

    def _check_greedy(self, prompt_key, prompt, new, ignore_eos=True) -> tuple[str, str]:
        status, out = self._post({"input_ids": prompt, "sampling_params": {"max_new_tokens": new, "temperature": 0,
                                                                            "ignore_eos": ignore_eos}})
        if status != 200:
            return "failed", f"status {status}: {str(out)[:200]}"
        if out["output_ids"] != self.answers[prompt_key]:
            want = self.answers[prompt_key]
            return "mismatched", f"prompt {prompt_key}: got {out['output_ids'][:12]}.. want {want[:12]}.."
        return "completed", ""

    def _greedy(self, rng):
        i = rng.randrange(len(self.greedy_prompts))
        return self._check_greedy(("greedy", i), self.greedy_prompts[i], SHORT_NEW)

    def _long(self, rng):
        i = rng.randrange(len(self.long_prompts))
        # EOS honoured: SGLang then admits the request on an estimate of its growth (with ignore_eos it reserves
        # all of max_new_tokens), so the small pool can run out mid-decode and force a retraction
        return self._check_greedy(("long", i), self.long_prompts[i], LONG_NEW, ignore_eos=False)

    def _sampled_params(self, **extra) -> dict:
        return {"max_new_tokens": SHORT_NEW, "temperature": 0.8, "top_p": 0.95, "top_k": 50, "ignore_eos": True,
                **extra}

    def _valid(self, ids) -> bool:
        return len(ids) == SHORT_NEW and all(0 <= t < self.vocab for t in ids)

    def _sampled(self, rng):
        prompt = rng.choice(self.greedy_prompts)
        status, out = self._post({"input_ids": prompt, "sampling_params": self._sampled_params()})
        if status != 200 or not self._valid(out["output_ids"]):
            return "failed", f"status {status}: {str(out)[:200]}"
        return "completed", ""

    def _n2(self, rng):
        prompt = rng.choice(self.greedy_prompts)
        status, out = self._post({"input_ids": prompt, "sampling_params": self._sampled_params(n=2)})
        outs = out if isinstance(out, list) else [out]
        if status != 200 or len(outs) != 2 or not all(self._valid(o["output_ids"]) for o in outs):
            return "failed", f"status {status}: {str(out)[:200]}"
        return "completed", ""

    def _stream_cut(self, rng):
        prompt = rng.choice(self.greedy_prompts)
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=300)
        try:
            body = json.dumps({"input_ids": prompt, "stream": True,
                               "sampling_params": {"max_new_tokens": LONG_NEW, "temperature": 0, "ignore_eos": True}})
            conn.request("POST", "/generate", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                return "failed", f"status {resp.status}"
            chunks = 0
            while chunks < rng.randint(1, 3):
                line = resp.readline()
                if not line:
                    return "failed", "stream ended before the client dropped it"
                chunks += line.startswith(b"data:")
            return "completed", ""
        finally:
            conn.close()  # the drop: the server must abort the request and free its KV

    def _bad(self, rng):
        prompt = rng.choice(self.greedy_prompts)[:5] + [self.vocab + rng.randrange(1000)]
        status, out = self._post({"input_ids": prompt, "sampling_params": {"max_new_tokens": 4}})
        if status != 400 or "outside the vocabulary" not in str(out):
            return "failed", f"expected 400, got {status}: {str(out)[:200]}"
        return "completed", ""

    def run(self, concurrency: int, seconds: float, every_kind_first: bool = False) -> None:
        deadline = time.monotonic() + seconds

        def client(c: int) -> None:
            rng = random.Random(self.seed * 1000 + c)
            if every_kind_first:
                for kind in KINDS:
                    self.one(rng, kind)
            while time.monotonic() < deadline:
                self.one(rng, rng.choices(KINDS, WEIGHTS)[0])

        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(client, range(concurrency)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of soak after the warm-up")
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds of warm-up (every kind at least once)")
    ap.add_argument("--max-total-tokens", type=int, default=2048, help="KV pool size (small: forces retraction)")
    ap.add_argument("--schedule-conservativeness", type=float, default=0.05)
    ap.add_argument("--max-memory-growth", type=float, default=0.10)
    ap.add_argument("--target", default=None, help="default: the bundled pair")
    ap.add_argument("--draft", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra", default="", help="more server arguments, space separated")
    args = ap.parse_args(argv)
    for name in ("concurrency", "max_total_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}={getattr(args, name)}, expected >= 1")
    if args.duration <= 0 or args.warmup < 0:
        ap.error(f"--duration={args.duration} / --warmup={args.warmup}, expected > 0 / >= 0")
    target, draft = (args.target, args.draft) if args.target else tiny_pair()

    # a low schedule conservativeness admits requests on an optimistic estimate of their growth, so a small
    # pool runs out mid-decode and the scheduler must retract (not only queue) requests
    server = Server(target, draft, "--max-total-tokens", str(args.max_total_tokens), "--schedule-conservativeness",
                    str(args.schedule_conservativeness), *args.extra.split(), strict_memory_check=True)
    print(f"[soak] server starting (DFLASH, max-total-tokens {args.max_total_tokens}, strict idle leak check)",
          flush=True)
    try:
        # the target alone's answers, while the server loads
        import torch
        from sglang_dflash.reference import generate
        from sglang_dflash.target import default_stop_ids, load_target

        torch.set_num_threads(1)
        base = heldout_prompts()
        greedy_prompts = base[:24]
        long_prompts = [sum(base[24 + 4 * i: 28 + 4 * i], []) for i in range(6)]
        model = load_target(target)
        vocab = model.config.vocab_size
        answers = {("greedy", i): r.output_ids for i, r in enumerate(generate(model, None, greedy_prompts, SHORT_NEW))}
        answers |= {("long", i): r.output_ids for i, r in
                    enumerate(generate(model, None, long_prompts, LONG_NEW, stop_ids=default_stop_ids(model)))}
        del model
        print(f"[soak] target-only answers ready: {len(answers)} prompts "
              f"(long ones {min(map(len, long_prompts))}-{max(map(len, long_prompts))} tokens, answers "
              f"{[len(answers[('long', i)]) for i in range(len(long_prompts))]} tokens up to EOS)", flush=True)
        server.wait_ready()

        soak = Soak(server, vocab, greedy_prompts, long_prompts, answers, args.seed)
        soak.run(args.concurrency, args.warmup, every_kind_first=True)
        time.sleep(3)
        rss_warm = tree_rss_mb(server.proc.pid)
        print(f"[soak] warm-up done: {sum(c['sent'] for c in soak.counts.values())} requests, "
              f"server RSS {rss_warm:.0f} MB; soaking {args.duration:.0f} s at concurrency {args.concurrency}",
              flush=True)
        t0 = time.monotonic()
        soak.run(args.concurrency, args.duration)
        wall = time.monotonic() - t0
        time.sleep(5)  # idle: the strict leak check runs
        alive = server.proc.poll() is None
        healthy = alive and server.post("/generate", {"input_ids": greedy_prompts[0], "sampling_params": {
            "max_new_tokens": SHORT_NEW, "temperature": 0, "ignore_eos": True}})[1].get("output_ids") == \
            answers[("greedy", 0)]
        rss_end = tree_rss_mb(server.proc.pid)
        log = server.log()
    finally:
        server.stop()

    total = {k: sum(c[k] for c in soak.counts.values()) for k in ("sent", "completed", "failed", "mismatched")}
    lat = sorted(soak.latencies)
    p50 = lat[len(lat) // 2] if lat else float("nan")
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan")
    retractions = sum(int(line.split("#retracted_reqs:")[1].split(",")[0]) for line in log.splitlines()
                      if "#retracted_reqs:" in line)
    growth = rss_end / rss_warm - 1 if rss_warm == rss_warm and rss_warm > 0 else float("nan")
    print("\n| kind | sent | completed | failed | mismatched |\n|---|---|---|---|---|")
    for kind in KINDS:
        c = soak.counts[kind]
        print(f"| {kind} | {c['sent']} | {c['completed']} | {c['failed']} | {c['mismatched']} |")
    print(f"| all | {total['sent']} | {total['completed']} | {total['failed']} | {total['mismatched']} |")
    print(f"\nsoak wall {wall:.0f} s, concurrency {args.concurrency}; latency p50 {p50:.2f} s, p99 {p99:.2f} s "
          f"(non-streamed requests); requests retracted by the scheduler (KV pool full): {retractions}")
    print(f"server RSS after warm-up {rss_warm:.0f} MB, at the end {rss_end:.0f} MB ({growth:+.1%}); "
          f"server alive and answering correctly after the soak: {healthy}")
    for f in soak.failures:
        print("  failure:", f)
    ok = (total["failed"] == 0 and total["mismatched"] == 0 and healthy and total["sent"] == total["completed"]
          and growth <= args.max_memory_growth)
    print(json.dumps({"ok": ok, **total, "p50_s": round(p50, 3), "p99_s": round(p99, 3), "retractions": retractions,
                      "rss_warm_mb": round(rss_warm), "rss_end_mb": round(rss_end), "healthy": healthy,
                      "concurrency": args.concurrency, "duration_s": args.duration,
                      "per_kind": {k: soak.counts[k] for k in KINDS}}))
    if not healthy and alive is False:
        print(log[-3000:], file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
