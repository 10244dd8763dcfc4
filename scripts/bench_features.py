"""Feature requests (JSON schema, regex, penalties, none) on the bundled pair: DFLASH vs SGLang without speculation
(synchronous scheduler), six held-out prompts one at a time, 48 greedy tokens; prints time and tokens per side
and the DFLASH / plain tok/s ratio per kind, then the DFLASH server's last step-timing lines.

    python scripts/bench_features.py
"""

from __future__ import annotations

import json
import re
import time

from sglang_dflash.assets import heldout_prompts, tiny_pair
from sglang_dflash.server import Server, start_all

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
          "required": ["name", "n"]}
KINDS = {
    "json": {"json_schema": json.dumps(SCHEMA)},
    "regex": {"regex": "(def|class) [a-z_]{1,20}\\("},
    "none": {},
    "rep": {"repetition_penalty": 1.3, "frequency_penalty": 0.3},
}


def main() -> None:
    target, draft = tiny_pair()
    dflash = Server(target, draft, env={"SGLANG_DFLASH_TIMING": "1"})
    plain = Server(target, None, "--disable-overlap-schedule")
    start_all(dflash, plain)
    try:
        for name, kind in KINDS.items():
            res = {}
            for label, server in (("dflash", dflash), ("plain", plain)):
                start, tokens = time.time(), 0
                for prompt in heldout_prompts()[30:36]:
                    body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": 48, "temperature": 0, **kind}}
                    tokens += server.post("/generate", body)[1]["meta_info"]["completion_tokens"]
                res[label] = (time.time() - start, tokens)
            ratio = (res["dflash"][1] / res["dflash"][0]) / (res["plain"][1] / res["plain"][0])
            print(name, {k: (round(s, 2), n) for k, (s, n) in res.items()}, "speedup", round(ratio, 2), flush=True)
        print("\n".join(re.findall(r"step timing.*", dflash.log())[-3:]))
    finally:
        dflash.stop()
        plain.stop()


if __name__ == "__main__":
    main()
