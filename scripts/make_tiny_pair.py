"""Build the bundled tiny (target, drafter) pair from scratch, deterministically.

    python scripts/make_tiny_pair.py --out python/sglang_dflash/assets/tiny_pair

Stages (each skipped when its output already exists in --work, so a crash resumes):
  1. corpus:    the running Python's standard-library source, split by file into train / held-out.
  2. tokenizer: byte-level BPE, vocab 4096, with <|endoftext|>, <|mask|>, <|pad|>, <|im_start|>,
                <|im_end|> and a chat template.
  3. target:    a 4-layer Qwen3 (hidden 256) trained from scratch on the corpus, with a quarter of the
                samples wrapped as chat turns so chat prompts get code answers.
  4. drafter:   a 2-layer DFlash drafter trained by `sglang_dflash.train` on the target's own greedy
                continuations (the paper's recipe).
Then weights are written as float16 safetensors (configs say float32: loaders upcast), about 12 MB.

Everything is seeded; the only machine-dependent input is the stdlib's source text (same Python 3.11.x
gives the same corpus). On 2 CPU cores the whole build takes about 35 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch

SPECIALS = ["<|endoftext|>", "<|mask|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
EOS_ID, MASK_ID, PAD_ID, IM_START_ID, IM_END_ID = range(5)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SEED = 1234


def log(msg: str) -> None:
    print(f"[make_tiny_pair {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# 1. corpus
def stage_corpus(work: Path) -> None:
    if (work / "corpus.json").exists():
        return
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "lib2to3", "__pycache__"}
    files = sorted(
        p for p in stdlib.rglob("*.py") if not (set(p.relative_to(stdlib).parts[:-1]) & skip)
    )
    rng = random.Random(SEED)
    rng.shuffle(files)
    texts = []
    for p in files:
        try:
            texts.append(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    n_eval = max(8, len(texts) // 20)
    corpus = {"train": texts[n_eval:], "eval": texts[:n_eval]}
    (work / "corpus.json").write_text(json.dumps(corpus))
    log(f"corpus: {len(texts) - n_eval} train files, {n_eval} held-out files from {stdlib}")


def load_corpus(work: Path) -> dict[str, list[str]]:
    return json.loads((work / "corpus.json").read_text())


# ----------------------------------------------------------------------------------------------
# 2. tokenizer
def stage_tokenizer(work: Path) -> None:
    out = work / "tokenizer"
    if (out / "tokenizer.json").exists():
        return
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = load_corpus(work)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus["train"], trainer=trainer)
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        mask_token="<|mask|>",
        bos_token=None,
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    log(f"tokenizer: vocab {tok.get_vocab_size()}")


def tokenizer(work: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(work / "tokenizer")


def chat_sample(text: str, rng: random.Random) -> str | None:
    """A chat turn made from a source file: the user shows a few lines, the assistant continues."""
    lines = text.splitlines()
    if len(lines) < 12:
        return None
    start = rng.randrange(0, len(lines) - 10)
    n_user = rng.randint(2, 6)
    n_reply = rng.randint(4, 24)
    user = "\n".join(lines[start : start + n_user])
    reply = "\n".join(lines[start + n_user : start + n_user + n_reply])
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{reply}<|im_end|>\n"


def token_stream(work: Path, split: str, rng: random.Random) -> torch.Tensor:
    tok = tokenizer(work)
    texts = load_corpus(work)[split]
    ids: list[int] = []
    for text in texts:
        ids += tok(text, add_special_tokens=False)["input_ids"] + [EOS_ID]
    # chat samples: about a quarter of all tokens
    n_plain = len(ids)
    chat_ids: list[int] = []
    while len(chat_ids) < n_plain // 3:
        s = chat_sample(rng.choice(texts), rng)
        if s is not None:
            chat_ids += tok(s, add_special_tokens=False)["input_ids"] + [EOS_ID]
    return torch.tensor(ids + chat_ids, dtype=torch.int64)


# ----------------------------------------------------------------------------------------------
# 3. target
TARGET_STEPS = 1300
TARGET_BATCH, TARGET_SEQ = 8, 256


def target_config():
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=EOS_ID,
        eos_token_id=IM_END_ID,
        pad_token_id=PAD_ID,
    )


def stage_target(work: Path) -> None:
    out = work / "target"
    if (out / "config.json").exists():
        return
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    train = token_stream(work, "train", rng)
    log(f"target: {train.numel()} training tokens")
    model = Qwen3ForCausalLM(target_config()).float()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-3, weight_decay=0.1, betas=(0.9, 0.95))
    sched = cosine_with_warmup(opt, TARGET_STEPS, warmup=50)
    g = torch.Generator().manual_seed(SEED)
    t0 = time.time()
    for step in range(TARGET_STEPS):
        starts = torch.randint(0, train.numel() - TARGET_SEQ - 1, (TARGET_BATCH,), generator=g)
        batch = torch.stack([train[s : s + TARGET_SEQ] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == TARGET_STEPS - 1:
            log(f"target step {step}/{TARGET_STEPS} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    model.eval()
    held = token_stream(work, "eval", random.Random(SEED + 1))
    with torch.no_grad():
        n = (held.numel() - 1) // TARGET_SEQ
        xs = held[: n * TARGET_SEQ].view(n, TARGET_SEQ)[:64]
        eval_loss = model(input_ids=xs, labels=xs).loss.item()
    log(f"target: held-out loss {eval_loss:.3f}")
    model.save_pretrained(out)
    (work / "target_eval_loss.txt").write_text(f"{eval_loss:.4f}\n")


def cosine_with_warmup(opt, total: int, warmup: int):
    import math

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        p = (step - warmup) / max(1, total - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


# ----------------------------------------------------------------------------------------------
# 4. drafter data + training (sglang_dflash.train)
def stage_prompts(work: Path) -> None:
    """Training prompts (train split) and held-out prompts (eval split) as token-id lists."""
    if (work / "prompts.json").exists():
        return
    rng = random.Random(SEED + 2)
    out = {}
    for split, n in (("train", 6000), ("eval", 64)):
        stream = token_stream(work, split, random.Random(SEED + 3)).tolist()
        prompts = []
        while len(prompts) < n:
            length = rng.randint(24, 64)
            s = rng.randrange(0, len(stream) - length)
            prompts.append(stream[s : s + length])
        out[split] = prompts
    (work / "prompts.json").write_text(json.dumps(out))
    log("prompts: 6000 train, 64 held-out")


def stage_drafter(work: Path, train_seconds_scale: float) -> None:
    out = work / "draft"
    if (out / "config.json").exists():
        return
    from sglang_dflash import train

    prompts = json.loads((work / "prompts.json").read_text())
    (work / "train_prompts.json").write_text(json.dumps(prompts["train"]))
    args = [
        "--target", str(work / "target"),
        "--prompt-ids-file", str(work / "train_prompts.json"),
        "--out", str(out),
        "--ckpt-dir", str(work / "draft_ckpt"),
        "--num-layers", "2",
        "--block-size", "16",
        "--target-layer-ids", "0,1,2",
        "--mask-token-id", str(MASK_ID),
        "--response-len", "96",
        "--steps", str(int(2800 * train_seconds_scale)),
        "--batch-size", "8",
        "--anchors", "16",
        "--lr", "1e-3",
        "--seed", str(SEED),
    ]
    train.main(args)


def finalize(work: Path, out: Path) -> None:
    from safetensors.torch import load_file, save_file

    if out.exists():
        shutil.rmtree(out)
    (out / "target").mkdir(parents=True)
    (out / "draft").mkdir(parents=True)
    for name in ("target", "draft"):
        src = work / name
        state = load_file(src / "model.safetensors")
        state = {k: v.to(torch.float16).contiguous() for k, v in state.items()}
        save_file(state, out / name / "model.safetensors", metadata={"format": "pt"})
        cfg = json.loads((src / "config.json").read_text())
        cfg["dtype"] = cfg["torch_dtype"] = "float32"
        (out / name / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for f in (work / "tokenizer").iterdir():
        shutil.copy(f, out / "target" / f.name)
    gen = {"bos_token_id": EOS_ID, "eos_token_id": [IM_END_ID, EOS_ID], "pad_token_id": PAD_ID}
    (out / "target" / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    prompts = json.loads((work / "prompts.json").read_text())
    (out / "heldout_prompts.json").write_text(json.dumps(prompts["eval"]) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"wrote {out} ({size / 2**20:.1f} MiB)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("python/sglang_dflash/assets/tiny_pair"))
    ap.add_argument("--work", type=Path, default=Path("runs/tiny_pair"))
    ap.add_argument("--until", choices=["corpus", "tokenizer", "target", "prompts", "drafter", "all"],
                    default="all")
    ap.add_argument("--drafter-scale", type=float, default=1.0,
                    help="multiply the drafter's step count (smoke runs use a small value)")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    args.work.mkdir(parents=True, exist_ok=True)
    stages = [
        ("corpus", stage_corpus),
        ("tokenizer", stage_tokenizer),
        ("target", stage_target),
        ("prompts", stage_prompts),
        ("drafter", lambda w: stage_drafter(w, args.drafter_scale)),
    ]
    for name, fn in stages:
        fn(args.work)
        if args.until == name:
            return
    finalize(args.work, args.out)


if __name__ == "__main__":
    sys.exit(main())
