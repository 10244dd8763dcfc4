"""The main job: an SGLang server with DFLASH, chat prompts streamed through the OpenAI client, then the
same prompts without speculation, and the speed-up.

    python -m sglang_dflash.demo                                  # the bundled tiny pair, on CPU
    python -m sglang_dflash.demo --model Qwen/Qwen3-4B --draft z-lab/Qwen3-4B-DFlash-b16 -- --attention-backend fa3

Per request it prints the streamed answer, then: tokens, acceptance length (tokens per verify step, from
SGLang's spec details), tokens/s; the speculation-off pass checks the greedy answers are identical.
Arguments after `--` go to both SGLang servers unchanged.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .assets import tiny_pair
from .server import Server

PROMPTS = [
    "def read_config(path):",
    "class LRUCache:\n    def __init__(self, capacity):",
    "import os\nfor root, dirs, files in os.walk(top):",
    "Write a function that parses an HTTP header line.",
    "Explain what a context manager is.",
]


def _check_model_arg(name: str, value: str) -> str | None:
    """A local directory must hold a config.json; anything else is left to SGLang (a hub id on a GPU box)."""
    p = Path(value)
    if p.exists() and not (p / "config.json").is_file():
        return f"{name} {value!r}: no config.json in that directory (expected a model directory)"
    if not p.exists() and (value.startswith((".", "/")) or value.count("/") != 1):
        return f"{name} {value!r}: no such directory (expected a local model directory or a hub id org/name)"
    return None


def chat(server: Server, prompt: str, max_new: int, echo: bool) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="none")
    t0 = time.perf_counter()
    stream = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": prompt}], max_tokens=max_new, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"return_spec_tokens_details": True})
    text, usage, spec = [], None, None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            piece = chunk.choices[0].delta.content
            text.append(piece)
            if echo:
                print(piece, end="", flush=True)
        if getattr(chunk, "usage", None):
            usage = chunk.usage
        ext = (chunk.model_extra or {}).get("sglext") if hasattr(chunk, "model_extra") else None
        if ext and ext.get("spec_tokens_details"):
            spec = ext["spec_tokens_details"]
            spec = spec[0] if isinstance(spec, list) else spec
    elapsed = time.perf_counter() - t0
    if echo:
        print()
    tokens = usage.completion_tokens if usage else len(text)
    return {"text": "".join(text), "tokens": tokens, "seconds": elapsed, "spec": spec}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sglang_dflash.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="target model (default: the bundled tiny target)")
    ap.add_argument("--draft", default=None, help="DFlash drafter (default: the bundled drafter)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"how many of the {len(PROMPTS)} prompts")
    ap.add_argument("server_args", nargs="*", help="extra SGLang server arguments (after --)")
    args = ap.parse_args(argv)
    if (args.model is None) != (args.draft is None):
        ap.error("give both --model and --draft, or neither (the bundled pair)")
    if args.model is None:
        model, draft = (str(p) for p in tiny_pair())
        extra = ["--dtype", "float32", *args.server_args]
    else:
        for name, value in (("--model", args.model), ("--draft", args.draft)):
            problem = _check_model_arg(name, value)
            if problem:
                ap.error(problem)
        model, draft, extra = args.model, args.draft, list(args.server_args)
    prompts = PROMPTS[: max(1, args.prompts)]
    print(f"starting SGLang: target {model}, DFLASH drafter {draft} (and a second server without speculation)")
    spec_server, plain_server = Server(model, draft, *extra), Server(model, None, *extra)
    try:
        for s in (spec_server, plain_server):
            try:
                s.wait_ready()
            except RuntimeError as e:
                last = [line for line in str(e).splitlines() if "Error" in line or "error" in line]
                print(f"error: the SGLang server did not start: {last[-1] if last else str(e)[-500:]}",
                      file=sys.stderr)
                return 2
        chat(spec_server, "warm up", 4, echo=False)
        chat(plain_server, "warm up", 4, echo=False)
        spec_runs = []
        for prompt in prompts:
            print(f"\n>>> {prompt}")
            r = chat(spec_server, prompt, args.max_new_tokens, echo=True)
            tau = r["spec"]["spec_accept_length"] if r["spec"] else float("nan")
            print(f"--- {r['tokens']} tokens | acceptance length {tau:.2f} | {r['tokens'] / r['seconds']:.1f} tok/s")
            spec_runs.append(r)
        plain_runs = [chat(plain_server, p, args.max_new_tokens, echo=False) for p in prompts]
    finally:
        spec_server.stop()
        plain_server.stop()
    same = sum(a["text"] == b["text"] for a, b in zip(spec_runs, plain_runs))
    spec_tps = sum(r["tokens"] for r in spec_runs) / sum(r["seconds"] for r in spec_runs)
    plain_tps = sum(r["tokens"] for r in plain_runs) / sum(r["seconds"] for r in plain_runs)
    verify = sum(r["spec"]["spec_verify_ct"] for r in spec_runs if r["spec"])
    tau = sum(r["tokens"] for r in spec_runs) / verify if verify else float("nan")
    print(f"\nDFLASH: {spec_tps:.1f} tok/s, acceptance length {tau:.2f} | no speculation: {plain_tps:.1f} tok/s | "
          f"speed-up {spec_tps / plain_tps:.2f}x | identical answers: {same}/{len(prompts)}")
    return 0 if same == len(prompts) else 1


if __name__ == "__main__":
    sys.exit(main())
