"""Serving benchmark: the same SGLang server with DFLASH and without, side by side in one run.

    .venv/bin/python scripts/bench_serving.py [--concurrency 1,4,16] [--max-new-tokens 64] [--requests 32] [--timing]
        [--overlap] [--model DIR --draft DIR] [--out docs/bench_serving] [-- extra SGLang server args]

Both servers serve the fixed prompt set shipped in `sglang_dflash/assets/bench_prompts.json` (code, prose,
dialogue; chat template applied), greedy, the same max_new_tokens, EOS ignored so every request decodes
the same length. For each concurrency the baseline and DFLASH are measured one after the other (the other
server idle), after a warm-up that is not counted. Reported per side: output tokens/s, time to first token,
inter-token latency p50/p99 (a streamed chunk's gap shared by its tokens), and for DFLASH the mean
acceptance length (tokens per verify step) and its histogram; plus the DFLASH/baseline throughput ratio.
`--overlap` adds a third side: DFLASH with SGLang's overlap scheduler (SGLANG_ENABLE_DFLASH_SPEC_V2=1),
reported as its own tok/s, its ratio to the baseline and to synchronous DFLASH.
Greedy outputs must be identical between the servers: a mismatch fails the benchmark (exit 1).
Writes OUT.json, OUT.md and OUT.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from sglang_dflash.assets import tiny_pair  # noqa: E402
from sglang_server import Server, start_all  # noqa: E402

PROMPTS_FILE = Path(__file__).resolve().parents[1] / "python/sglang_dflash/assets/bench_prompts.json"


def stream_one(url: str, input_ids: list[int], max_new: int) -> dict:
    """One streamed /generate request -> output ids, chunk timings, meta_info."""
    body = {"input_ids": input_ids, "stream": True,
            "sampling_params": {"max_new_tokens": max_new, "temperature": 0.0, "ignore_eos": True}}
    req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    stamps: list[tuple[float, int]] = []  # (time, tokens so far)
    last = None
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            last = json.loads(line[5:])
            stamps.append((time.perf_counter() - t0, last["meta_info"]["completion_tokens"]))
    ids = last.get("output_ids") or []
    return {"stamps": stamps, "meta": last["meta_info"], "output_ids": ids, "end": time.perf_counter() - t0}


def run_level(server: Server, prompts: list[list[int]], max_new: int, concurrency: int, bar) -> dict:
    lock = threading.Lock()

    def one(p):
        out = stream_one(server.url, p, max_new)
        with lock:
            bar.update(1)
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        outs = list(pool.map(one, prompts))
    wall = time.perf_counter() - t0
    tokens = sum(o["meta"]["completion_tokens"] for o in outs)
    ttft = [o["stamps"][0][0] for o in outs]
    itl: list[float] = []
    for o in outs:
        for (t_a, n_a), (t_b, n_b) in zip(o["stamps"], o["stamps"][1:]):
            if n_b > n_a:
                itl += [(t_b - t_a) / (n_b - n_a)] * (n_b - n_a)
    res = {"concurrency": concurrency, "requests": len(outs), "output_tokens": tokens, "wall_s": round(wall, 3),
           "output_tok_s": round(tokens / wall, 2), "ttft_mean_s": round(statistics.mean(ttft), 4),
           "itl_p50_ms": round(1000 * _pct(itl, 50), 2), "itl_p99_ms": round(1000 * _pct(itl, 99), 2)}
    verify = sum(o["meta"].get("spec_verify_ct", 0) for o in outs)
    if verify:
        res["mean_accept_length"] = round((tokens - len(outs)) / verify, 3)
        hist: Counter = Counter()
        for o in outs:
            for k, v in enumerate(o["meta"].get("spec_correct_drafts_histogram") or []):
                hist[k + 1] += v
        res["accept_length_histogram"] = dict(sorted(hist.items()))
    res["_outputs"] = [o["output_ids"] for o in outs]
    return res


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def last_step_timing(server: Server, since: int) -> str | None:
    """The worker's split of its last 50 decode steps (logged with SGLANG_DFLASH_TIMING=1), looking only
    at the log written after offset `since`."""
    lines = [line for line in server.log()[since:].splitlines() if "sglang-dflash step timing" in line]
    return lines[-1].split("step timing: ", 1)[1] if lines else None


def load_prompts(target_dir: Path, n: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(target_dir)
    items = json.loads(PROMPTS_FILE.read_text())
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": items[i % len(items)]["content"]}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = [r["concurrency"] for r in results]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(cs, [r["baseline"]["output_tok_s"] for r in results], "o-", label="no speculation")
    a.plot(cs, [r["dflash"]["output_tok_s"] for r in results], "o-", label="DFLASH")
    if "dflash_overlap" in results[0]:
        a.plot(cs, [r["dflash_overlap"]["output_tok_s"] for r in results], "o-", label="DFLASH, overlap")
        b.plot(cs, [r["overlap_ratio"] for r in results], "o--", color="C3", label="overlap")
    a.set_xscale("log", base=2)
    a.set_xlabel("concurrency")
    a.set_ylabel("output tokens/s")
    a.legend()
    b.plot(cs, [r["ratio"] for r in results], "o-", color="C2")
    b.axhline(1.0, color="gray", lw=0.8)
    b.set_xscale("log", base=2)
    b.set_xlabel("concurrency")
    b.set_ylabel("DFLASH / baseline")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--draft", default=None)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=None, help="per level (default: max(16, 2 x concurrency))")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", default="docs/bench_serving")
    ap.add_argument("--timing", action="store_true",
                    help="run the DFLASH server with SGLANG_DFLASH_TIMING=1 and report its step split per level")
    ap.add_argument("--overlap", action="store_true",
                    help="also measure DFLASH with SGLang's overlap scheduler (SGLANG_ENABLE_DFLASH_SPEC_V2=1)")
    ap.add_argument("--baseline-max-new-tokens", type=int, default=None,
                    help="testing only: a different length for the baseline, to see the equality check fail")
    ap.add_argument("server_args", nargs="*", help="extra SGLang server arguments (after --)")
    args = ap.parse_args(argv)
    from tqdm import tqdm

    t_dir, d_dir = (Path(args.model), Path(args.draft)) if args.model else tiny_pair()
    levels = [int(c) for c in args.concurrency.split(",")]
    base = Server(t_dir, None, *args.server_args)
    spec = Server(t_dir, d_dir, *args.server_args, env={"SGLANG_DFLASH_TIMING": "1"} if args.timing else None)
    sides = [("baseline", base), ("dflash", spec)]
    if args.overlap:
        sides.append(("dflash_overlap", Server(t_dir, d_dir, *args.server_args,
                                               env={"SGLANG_ENABLE_DFLASH_SPEC_V2": "1"})))
    start_all(*(s for _, s in sides))
    results, mismatches = [], 0
    try:
        warm = load_prompts(t_dir, 2)
        for _, s in sides:
            s.generate_many(warm, 8, concurrency=2)
        total = sum(len(sides) * (args.requests or max(16, 2 * c)) for c in levels)
        bar = tqdm(total=total, desc="requests", unit="req")
        for c in levels:
            prompts = load_prompts(t_dir, args.requests or max(16, 2 * c))
            row = {"concurrency": c}
            log_start = len(spec.log())
            for name, s in sides:
                bar.set_postfix(side=name, concurrency=c)
                n = args.baseline_max_new_tokens if name == "baseline" and args.baseline_max_new_tokens else None
                row[name] = run_level(s, prompts, n or args.max_new_tokens, c, bar)
            outs_b = row["baseline"].pop("_outputs")
            bad = 0
            for name, _ in sides[1:]:
                bad += sum(a != b for a, b in zip(outs_b, row[name].pop("_outputs")))
            row["identical_outputs"] = f"{len(outs_b) * (len(sides) - 1) - bad}/{len(outs_b) * (len(sides) - 1)}"
            mismatches += bad
            row["ratio"] = round(row["dflash"]["output_tok_s"] / row["baseline"]["output_tok_s"], 3)
            if args.overlap:
                ovl = row["dflash_overlap"]["output_tok_s"]
                row["overlap_ratio"] = round(ovl / row["baseline"]["output_tok_s"], 3)
                row["overlap_vs_sync"] = round(ovl / row["dflash"]["output_tok_s"], 3)
            if args.timing:
                row["dflash"]["step_timing"] = last_step_timing(spec, log_start)
            results.append(row)
        bar.close()
    finally:
        for _, s in sides:
            s.stop()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "model": str(t_dir), "draft": str(d_dir),
            "max_new_tokens": args.max_new_tokens, "server_args": args.server_args,
            "command": "python scripts/bench_serving.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    lines = ["| concurrency | baseline tok/s | DFLASH tok/s | ratio | TTFT base / DFLASH (s) "
             "| ITL p50 base / DFLASH (ms) | ITL p99 base / DFLASH (ms) | mean accept length | identical |",
             "|" + "---|" * 9]
    for r in results:
        b, d = r["baseline"], r["dflash"]
        lines.append(f"| {r['concurrency']} | {b['output_tok_s']} | {d['output_tok_s']} | {r['ratio']}x | "
                     f"{b['ttft_mean_s']} / {d['ttft_mean_s']} | {b['itl_p50_ms']} / {d['itl_p50_ms']} | "
                     f"{b['itl_p99_ms']} / {d['itl_p99_ms']} | {d.get('mean_accept_length', '-')} | "
                     f"{r['identical_outputs']} |")
    if args.overlap:
        lines.append("\n| concurrency | DFLASH overlap tok/s | overlap / baseline | overlap / synchronous DFLASH | "
                     "mean accept length |\n|---|---|---|---|---|")
        for r in results:
            lines.append(f"| {r['concurrency']} | {r['dflash_overlap']['output_tok_s']} | {r['overlap_ratio']}x | "
                         f"{r['overlap_vs_sync']}x | {r['dflash_overlap'].get('mean_accept_length', '-')} |")
    hist = Counter()
    for r in results:
        hist.update({int(k): v for k, v in r["dflash"].get("accept_length_histogram", {}).items()})
    lines.append("\nDFLASH accept length histogram (tokens per step: steps), all levels: "
                 + ", ".join(f"{k}: {v}" for k, v in sorted(hist.items())))
    for r in results:
        if r["dflash"].get("step_timing"):
            lines.append(f"\nDFLASH step split at concurrency {r['concurrency']}: {r['dflash']['step_timing']}")
    table = "\n".join(lines)
    out.with_suffix(".md").write_text(f"Command: `{meta['command']}` ({meta['date']})\n\n{table}\n")
    plot(results, out.with_suffix(".png"))
    print(table)
    if mismatches:
        print(f"ERROR: {mismatches} greedy outputs differ between DFLASH and the baseline", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
