"""Serving benchmark: the same SGLang server without speculation and with DFLASH, side by side in one run.

    .venv/bin/python scripts/bench_serving.py [--concurrency 1,4,16] [--max-new-tokens 64] [--requests 32]
        [--sides baseline,dflash] [--repeats 1] [--timing] [--overlap] [--model DIR --draft DIR]
        [--out docs/bench_serving] [-- extra SGLang server args]

    e.g. adaptive verify width against the fixed full block, 3 repeats:
    .venv/bin/python scripts/bench_serving.py --concurrency 1,4,8,16,32,64 --sides baseline,adaptive,fixed \
        --repeats 3 --out /tmp/bench_adaptive

Sides (`--sides`, comma-separated; `baseline` is required, ratios and the equality check are against it):
    baseline   no speculation
    dflash     DFLASH as the server starts by default (whatever SGLANG_DFLASH_ADAPTIVE says in this environment)
    adaptive   DFLASH with SGLANG_DFLASH_ADAPTIVE=1: each step picks its verify width k
    fixed      DFLASH with SGLANG_DFLASH_ADAPTIVE=0: every step verifies the full block, k = B
    overlap    DFLASH with SGLang's overlap scheduler (SGLANG_ENABLE_DFLASH_SPEC_V2=1); `--overlap` adds it

Every side serves the fixed prompt set shipped in `sglang_dflash/assets/bench_prompts.json` (code, prose,
dialogue; chat template applied), greedy, the same max_new_tokens, EOS ignored so every request decodes the
same length. For each concurrency each side is measured `--repeats` times, one side at a time (the others
idle), interleaved: repeat r runs every side once, starting at side r (mod the number of sides), so drift
hits all sides alike. A warm-up per side is not counted. Reported per side and level, as the median over
the repeats: output tokens/s, time to first token, inter-token latency p50/p99 (a streamed chunk's gap
shared by its tokens); for DFLASH sides the mean acceptance length (tokens per verify step, pooled over the
repeats) and its histogram, and the throughput ratio median(side) / median(baseline); with both `adaptive`
and `fixed` also median(adaptive) / median(fixed) (likewise overlap / dflash). Every repeat stays in OUT.json.
Capacity: every side runs with --max-running-requests max(48, highest level) (SGLang's default for DFLASH
is 48, which would queue part of a level of 64; the baseline's is far higher) and a KV pool of at least
highest level x (longest prompt + max_new_tokens + 2 B) tokens (not below the 8192 `Server` sets), so a level
runs at its nominal concurrency on every side; on a GPU SGLang then caps its decode CUDA-graph batch sizes at
that same running limit. Extra server args after `--` override both. Retractions (KV pool full) are counted
per side and level and reported.
`--timing` runs the DFLASH sides except `overlap` (timing serialises an overlapped scheduler) with
SGLANG_DFLASH_TIMING=1 and reports each side's last step-timing line per level.
Greedy outputs must be identical on every side and repeat: a mismatch fails the benchmark (exit 1).
Writes OUT.json, OUT.md (tables) and OUT.png (throughput ratio to the baseline against concurrency).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from sglang_dflash.assets import tiny_pair
from sglang_dflash.server import Server, start_all

REPO = Path(__file__).resolve().parents[1]
PROMPTS_FILE = REPO / "python/sglang_dflash/assets/bench_prompts.json"


def _shown(path) -> str:
    """A model path for the results' metadata: relative to the repository when inside it (no machine paths)."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
SGLANG_DFLASH_MAX_RUNNING = 48  # SGLang 0.5.23's default --max-running-requests under speculative decoding
SERVER_KV_TOKENS = 8192  # the --max-total-tokens `Server` passes


@dataclass(frozen=True)
class Side:
    name: str
    label: str
    speculative: bool
    env: dict[str, str] = field(default_factory=dict)
    timing: bool = False  # takes SGLANG_DFLASH_TIMING=1 under --timing


SIDES = {s.name: s for s in [
    Side("baseline", "no speculation", False),
    Side("dflash", "DFLASH", True, timing=True),
    Side("adaptive", "DFLASH adaptive k", True, {"SGLANG_DFLASH_ADAPTIVE": "1"}, timing=True),
    Side("fixed", "DFLASH fixed k=B", True, {"SGLANG_DFLASH_ADAPTIVE": "0"}, timing=True),
    Side("overlap", "DFLASH, overlap scheduler", True, {"SGLANG_ENABLE_DFLASH_SPEC_V2": "1"}),
]}
PAIRS = [("adaptive", "fixed"), ("overlap", "dflash")]  # extra ratios of medians, when both sides run


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
        res["verify_steps"] = verify
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


def retractions(server: Server, since: int) -> int:
    """How often SGLang's scheduler retracted requests for lack of KV space after log offset `since`: a level
    measured under retraction did not run at its nominal concurrency."""
    return server.log()[since:].count("KV cache pool is full. Retract requests.")


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


def block_size(draft_dir: Path) -> int:
    cfg = json.loads((draft_dir / "config.json").read_text())
    return int(cfg.get("block_size") or cfg.get("dflash_config", {}).get("block_size") or 16)


def capacity_args(peak_concurrency: int, longest_prompt: int, max_new: int, block: int) -> list[str]:
    """Server args so every side admits `peak_concurrency` requests at once and holds their KV (see the module
    docstring); placed before the user's extra args, which therefore win."""
    kv_tokens = peak_concurrency * (longest_prompt + max_new + 2 * block)
    kv_tokens = max(SERVER_KV_TOKENS, 1024 * math.ceil(kv_tokens / 1024))
    return ["--max-running-requests", str(max(SGLANG_DFLASH_MAX_RUNNING, peak_concurrency)),
            "--max-total-tokens", str(kv_tokens)]


def parse_sides(spec: str, overlap: bool) -> list[Side]:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if overlap and "overlap" not in names:
        names.append("overlap")
    unknown = [n for n in names if n not in SIDES]
    if unknown or "baseline" not in names or len(set(names)) != len(names) or len(names) < 2:
        raise ValueError(f"--sides {spec!r}: expected distinct names from {', '.join(SIDES)}, baseline included "
                         "and at least one other")
    return [SIDES[n] for n in names]


def summarize(runs: list[dict]) -> dict:
    """One side at one level: medians over the repeats, acceptance pooled over them, every repeat kept."""
    out = {k: round(statistics.median(r[k] for r in runs), 4)
           for k in ("output_tok_s", "ttft_mean_s", "itl_p50_ms", "itl_p99_ms")}
    verify = sum(r.get("verify_steps", 0) for r in runs)
    if verify:
        out["mean_accept_length"] = round(sum(r["output_tokens"] - r["requests"] for r in runs) / verify, 3)
        hist: Counter = Counter()
        for r in runs:
            hist.update(r.get("accept_length_histogram", {}))
        out["accept_length_histogram"] = dict(sorted(hist.items()))
    out["repeats"] = runs
    return out


def plot(results: list[dict], sides: list[Side], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = [r["concurrency"] for r in results]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, s in enumerate(x for x in sides if x.speculative):
        color = f"C{i}"
        ax.plot(cs, [r[s.name]["ratio"] for r in results], "o-", color=color, label=s.label)
        for r in results:  # each repeat's own ratio (side / baseline of the same repeat), when there are several
            reps = zip(r[s.name]["repeats"], r["baseline"]["repeats"])
            ys = [a["output_tok_s"] / b["output_tok_s"] for a, b in reps]
            if len(ys) > 1:
                ax.plot([r["concurrency"]] * len(ys), ys, ".", color=color, alpha=0.35)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--", label="no speculation (1.0)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(cs, [str(c) for c in cs])
    ax.set_xlabel("concurrency (requests in flight)")
    ax.set_ylabel("output tok/s / no-speculation tok/s")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def tables(results: list[dict], sides: list[Side], repeats: int) -> str:
    spec = [s for s in sides if s.speculative]
    names = {s.name for s in sides}
    pairs = [(a, b) for a, b in PAIRS if a in names and b in names]
    head = (["concurrency"] + [f"{s.label} tok/s" for s in sides] + [f"{s.name} / baseline" for s in spec]
            + [f"{a} / {b}" for a, b in pairs] + [f"accept length {s.name}" for s in spec] + ["identical"])
    lines = [f"tok/s: median of {repeats} repeat(s); ratios: median / median.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = ([r["concurrency"]] + [r[s.name]["output_tok_s"] for s in sides]
                 + [f"{r[s.name]['ratio']}x" for s in spec] + [f"{r[f'{a}_vs_{b}']}x" for a, b in pairs]
                 + [r[s.name].get("mean_accept_length", "-") for s in spec] + [r["identical_outputs"]])
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "| concurrency | side | TTFT mean (s) | ITL p50 (ms) | ITL p99 (ms) | retractions |",
              "|---|---|---|---|---|---|"]
    for r in results:
        for s in sides:
            d = r[s.name]
            lines.append(f"| {r['concurrency']} | {s.label} | {d['ttft_mean_s']} | {d['itl_p50_ms']} | "
                         f"{d['itl_p99_ms']} | {d['retractions']} |")
    for s in spec:
        hist: Counter = Counter()
        for r in results:
            hist.update({int(k): v for k, v in r[s.name].get("accept_length_histogram", {}).items()})
        lines.append(f"\n{s.label}: accept length histogram (tokens per step: steps), all levels and repeats: "
                     + ", ".join(f"{k}: {v}" for k, v in sorted(hist.items())))
    for s in spec:
        for r in results:
            if r[s.name].get("step_timing"):
                lines.append(f"\n{s.label} step split at concurrency {r['concurrency']}: {r[s.name]['step_timing']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--draft", default=None)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=None, help="per level (default: max(16, 2 x concurrency))")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--sides", default="baseline,dflash",
                    help=f"comma-separated, from {', '.join(SIDES)} (baseline required; default: baseline,dflash)")
    ap.add_argument("--repeats", type=int, default=1, help="measurements per side and level (median reported)")
    ap.add_argument("--out", default="docs/bench_serving")
    ap.add_argument("--timing", action="store_true",
                    help="run the DFLASH sides (not overlap) with SGLANG_DFLASH_TIMING=1, report their step split")
    ap.add_argument("--overlap", action="store_true",
                    help="add the overlap side: DFLASH, SGLang's overlap scheduler (SGLANG_ENABLE_DFLASH_SPEC_V2=1)")
    ap.add_argument("--baseline-max-new-tokens", type=int, default=None,
                    help="testing only: a different length for the baseline, to see the equality check fail")
    ap.add_argument("server_args", nargs="*", help="extra SGLang server arguments (after --)")
    args = ap.parse_args(argv)
    try:
        sides = parse_sides(args.sides, args.overlap)
    except ValueError as e:
        ap.error(str(e))
    if args.repeats < 1:
        ap.error(f"--repeats {args.repeats}: expected at least 1")
    from tqdm import tqdm

    t_dir, d_dir = (Path(args.model), Path(args.draft)) if args.model else tiny_pair()
    levels = [int(c) for c in args.concurrency.split(",")]
    prompts = {c: load_prompts(t_dir, args.requests or max(16, 2 * c)) for c in levels}
    block = block_size(d_dir)
    max_new = max(args.max_new_tokens, args.baseline_max_new_tokens or 0)
    longest = max(len(p) for ps in prompts.values() for p in ps)
    server_args = [*capacity_args(max(levels), longest, max_new, block), *args.server_args]
    servers = {}
    for s in sides:
        env = {**s.env, **({"SGLANG_DFLASH_TIMING": "1"} if args.timing and s.timing else {})}
        servers[s.name] = Server(t_dir, d_dir if s.speculative else None, *server_args, env=env,
                                 strict_memory_check=True)  # a KV leak kills the server, so the run fails
    start_all(*servers.values())
    results, mismatches = [], 0
    try:
        warm = load_prompts(t_dir, 2)
        for s in servers.values():
            s.generate_many(warm, 8, concurrency=2)
        bar = tqdm(total=sum(len(sides) * args.repeats * len(prompts[c]) for c in levels), desc="requests", unit="req")
        for c in levels:
            since = {name: len(s.log()) for name, s in servers.items()}
            runs: dict[str, list[dict]] = {s.name: [] for s in sides}
            for rep in range(args.repeats):
                for s in sides[rep % len(sides):] + sides[:rep % len(sides)]:
                    bar.set_postfix(side=s.name, concurrency=c, repeat=rep)
                    n = args.baseline_max_new_tokens if s.name == "baseline" else None
                    runs[s.name].append(run_level(servers[s.name], prompts[c], n or args.max_new_tokens, c, bar))
            outs = {(name, rep): r.pop("_outputs") for name, rs in runs.items() for rep, r in enumerate(rs)}
            ref = outs.pop(("baseline", 0))
            bad = sum(a != b for o in outs.values() for a, b in zip(ref, o))
            mismatches += bad
            row = {"concurrency": c, "requests": len(ref),
                   "identical_outputs": f"{len(ref) * len(outs) - bad}/{len(ref) * len(outs)}"}
            for s in sides:
                row[s.name] = summarize(runs[s.name])
                row[s.name]["retractions"] = retractions(servers[s.name], since[s.name])
                if s.speculative:
                    row[s.name]["ratio"] = round(row[s.name]["output_tok_s"] / row["baseline"]["output_tok_s"], 3)
                if args.timing and s.timing:
                    row[s.name]["step_timing"] = last_step_timing(servers[s.name], since[s.name])
            for a, b in PAIRS:
                if a in runs and b in runs:
                    row[f"{a}_vs_{b}"] = round(row[a]["output_tok_s"] / row[b]["output_tok_s"], 3)
            results.append(row)
        bar.close()
    finally:
        for s in servers.values():
            s.stop()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "model": _shown(t_dir), "draft": _shown(d_dir),
            "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "block_size": block,
            "sides": {s.name: {"label": s.label, "env": s.env} for s in sides}, "server_args": server_args,
            "command": "python scripts/bench_serving.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    table = tables(results, sides, args.repeats)
    out.with_suffix(".md").write_text(f"Command: `{meta['command']}` ({meta['date']})\n\n{table}\n")
    plot(results, sides, f"DFLASH throughput / no speculation ({t_dir.name}, greedy, {args.max_new_tokens} new "
         f"tokens, B = {block}, median of {args.repeats})", out.with_suffix(".png"))
    print(table)
    retracted = sum(r[s.name]["retractions"] for r in results for s in sides)
    if retracted:
        print(f"WARNING: {retracted} KV retractions: some levels ran below their nominal concurrency "
              "(raise --max-total-tokens after --)", file=sys.stderr)
    if mismatches:
        print(f"ERROR: {mismatches} greedy outputs differ from the baseline's", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
