"""Train a DFlash drafter for a frozen target (the paper's recipe, DESIGN.md section 2).

    python -m sglang_dflash.train --target DIR --prompt-ids-file prompts.json --out DRAFT_DIR \
        --target-layer-ids 1,9,17,25,33 --mask-token-id 151669 [--num-layers 5 --block-size 16 ...]

Data: each prompt plus the target's own greedy continuation; the target features of every token.
Each training sequence gets `--anchors` random anchor positions a in its response; a block is
`[token_a, MASK x (B-1)]` at positions a..a+B-1, seeing the context features of tokens < a and its own
block (bidirectionally), never another block. Loss: cross-entropy at block positions k = 1..B-1
(the token at a+k), weighted exp(-(k-1)/gamma). AdamW, warm-up then cosine, grad clip 1.0.
The target's embedding and lm_head are used frozen; only the drafter is trained.

Resumable: `--ckpt-dir` keeps the generated data and the training state; a rerun continues from it.
The progress bar shows the loss; every `--eval-every` steps a held-out acceptance length is printed
(tau, walked exactly as real greedy decoding would, not a per-anchor average).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from dflash_kernels import greedy_accept
from tqdm import tqdm

from .config import DFlashConfig, default_target_layer_ids
from .drafter import DFlashDrafter
from .target import load_target
from .train_data import Sequence, build_dataset

IGNORE = -100


def default_gamma(block_size: int) -> float:
    """The paper's loss decay: 7 for B=16, 5 for B=10, 4 for B=8."""
    return {16: 7.0, 10: 5.0, 8: 4.0}.get(block_size, max(1.0, block_size / 2.3))


def drafter_config_for(target_cfg, *, num_layers: int, block_size: int, layer_ids, mask_token_id: int) -> DFlashConfig:
    n_target = target_cfg.num_hidden_layers
    heads = target_cfg.num_attention_heads
    theta = getattr(target_cfg, "rope_theta", None)
    if theta is None:
        theta = (getattr(target_cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return DFlashConfig(
        hidden_size=target_cfg.hidden_size,
        intermediate_size=target_cfg.intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=getattr(target_cfg, "num_key_value_heads", heads),
        head_dim=getattr(target_cfg, "head_dim", None) or target_cfg.hidden_size // heads,
        rms_norm_eps=target_cfg.rms_norm_eps,
        rope_theta=float(theta),
        max_position_embeddings=target_cfg.max_position_embeddings,
        block_size=block_size,
        target_layer_ids=tuple(layer_ids) if layer_ids else default_target_layer_ids(n_target, num_layers),
        mask_token_id=mask_token_id,
        num_target_layers=n_target,
        vocab_size=target_cfg.vocab_size,
    )


def init_weights(model: DFlashDrafter, std: float = 0.02) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------
def block_batch(
    seqs: list[Sequence], anchors: list[torch.Tensor], B: int, mask_id: int, device
) -> dict[str, torch.Tensor]:
    """Pack sequences and their anchors into one training forward.

    -> feats [bs, S, K*H], ctx_pos [bs, S], block_ids/positions/labels [bs, n*B],
       mask [bs, n*B, S + n*B] (True = visible).
    """
    bs, S = len(seqs), max(len(s.tokens) for s in seqs)
    n = max(len(a) for a in anchors)
    KH = seqs[0].features.shape[-1]
    feats = torch.zeros(bs, S, KH)
    block_ids = torch.full((bs, n * B), mask_id, dtype=torch.int64)
    positions = torch.zeros(bs, n * B, dtype=torch.int64)
    labels = torch.full((bs, n * B), IGNORE, dtype=torch.int64)
    mask = torch.zeros(bs, n * B, S + n * B, dtype=torch.bool)
    offs = torch.arange(B)
    block_of = torch.arange(n * B) // B
    for i, (s, a) in enumerate(zip(seqs, anchors)):
        L = len(s.tokens)
        feats[i, :L] = s.features.float()
        for j, anchor in enumerate(a.tolist()):
            q = slice(j * B, (j + 1) * B)
            block_ids[i, j * B] = s.tokens[anchor]
            positions[i, q] = anchor + offs
            tgt = anchor + offs[1:]
            ok = tgt < L
            labels[i, j * B + 1 : (j + 1) * B][ok] = s.tokens[tgt[ok]]
            mask[i, q, :anchor] = True  # context: tokens before the anchor
        real = torch.zeros(n * B, dtype=torch.bool)
        real[: len(a) * B] = True
        mask[i, :, S:] = (block_of[:, None] == block_of[None, :]) & real[None, :]
        # padded query rows (no anchor) still need one visible key to avoid NaN; they carry no loss
        mask[i, len(a) * B :, S:] |= torch.eye(n * B, dtype=torch.bool)[len(a) * B :]
    ctx_pos = torch.arange(S)[None].expand(bs, S)
    out = dict(feats=feats, ctx_pos=ctx_pos, block_ids=block_ids, positions=positions, labels=labels, mask=mask)
    return {k: v.to(device) for k, v in out.items()}


def block_logits(drafter: DFlashDrafter, embed, lm_head, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """-> logits [bs, n*B, V] at every block position."""
    dtype = next(drafter.parameters()).dtype
    context = drafter.project(batch["feats"].to(dtype))
    ctx_kv = drafter.context_kv(context, batch["ctx_pos"])
    hidden = drafter(embed(batch["block_ids"]).to(dtype), batch["positions"], ctx_kv, batch["mask"])
    return lm_head(hidden.to(lm_head.weight.dtype))


def weighted_loss(logits: torch.Tensor, labels: torch.Tensor, B: int, gamma: float) -> torch.Tensor:
    k = (torch.arange(labels.shape[1], device=labels.device) % B).clamp_min(1)
    w = torch.exp(-(k - 1).float() / gamma)[None].expand_as(labels) * (labels != IGNORE)
    ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten().clamp_min(0), reduction="none")
    return (ce * w.flatten()).sum() / w.sum().clamp_min(1e-6)


@torch.no_grad()
def walk_tau(drafter, embed, lm_head, seqs: list[Sequence], B: int, mask_id: int, device) -> float:
    """Mean tokens per step of real greedy decoding over each sequence's response.

    The responses are the target's greedy output, so a draft is accepted exactly when it equals the
    next response token. Every anchor's acceptance is computed in one forward, then walked.
    """
    total_tokens = total_steps = 0
    for s in seqs:
        L, P = len(s.tokens), s.prompt_len
        anchors = torch.arange(P, L - 1)
        batch = block_batch([s], [anchors], B, mask_id, device)
        pred = block_logits(drafter, embed, lm_head, batch).argmax(-1)[0].view(len(anchors), B)
        labels = batch["labels"][0].view(len(anchors), B)
        # the worker's rule: drafts pred[:, 1:] against the target's next tokens labels[:, 1:] (IGNORE never
        # equals a token); the last predict column only feeds the bonus, unused here
        acc, _ = greedy_accept.accept(pred, torch.cat([labels[:, 1:], labels[:, :1]], dim=1))
        acc = acc.tolist()
        a = P
        while a < L - 1:
            step = acc[a - P] + 1
            total_tokens += step
            total_steps += 1
            a += step
    return total_tokens / max(1, total_steps)


# ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sglang_dflash.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True)
    ap.add_argument("--prompt-ids-file", required=True, help="JSON list of token-id lists")
    ap.add_argument("--out", required=True, help="where the z-lab format drafter is written")
    ap.add_argument("--ckpt-dir", default=None, help="data cache + resumable state (default: OUT.ckpt)")
    ap.add_argument("--num-layers", type=int, default=5)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--target-layer-ids", default=None, help="comma list; default: even spread")
    ap.add_argument("--mask-token-id", type=int, required=True)
    ap.add_argument("--response-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    ap.add_argument("--anchors", type=int, default=16, help="anchors per sequence (paper: 512)")
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--warmup-frac", type=float, default=0.04)
    ap.add_argument("--gamma", type=float, default=None, help="loss decay; default by block size")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-seqs", type=int, default=16)
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--gen-batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    out = Path(args.out)
    ckpt = Path(args.ckpt_dir) if args.ckpt_dir else out.with_name(out.name + ".ckpt")
    ckpt.mkdir(parents=True, exist_ok=True)
    target = load_target(args.target, device=args.device, dtype=dtype)
    target.requires_grad_(False)
    layer_ids = [int(x) for x in args.target_layer_ids.split(",")] if args.target_layer_ids else None
    cfg = drafter_config_for(target.config, num_layers=args.num_layers, block_size=args.block_size,
                             layer_ids=layer_ids, mask_token_id=args.mask_token_id)
    cfg.validate_against_target(target.config)
    B, gamma = cfg.block_size, args.gamma or default_gamma(cfg.block_size)

    data_file = ckpt / "data.pt"
    if data_file.exists():
        data = torch.load(data_file, weights_only=False)
    else:
        prompts = json.loads(Path(args.prompt_ids_file).read_text())
        pad = target.config.pad_token_id if target.config.pad_token_id is not None else 0
        data = build_dataset(target, prompts, args.response_len, cfg.target_layer_ids, pad, args.gen_batch_size)
        torch.save(data, data_file)
    rng = random.Random(args.seed)
    rng.shuffle(data)
    n_eval = min(args.eval_seqs, max(1, len(data) // 10))
    eval_set, train_set = data[:n_eval], data[n_eval:]

    drafter = DFlashDrafter(cfg)
    init_weights(drafter)
    drafter.to(device=device, dtype=dtype).train()
    embed, lm_head = target.get_input_embeddings(), target.get_output_embeddings()
    opt = torch.optim.AdamW(drafter.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, int(args.warmup_frac * args.steps))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    start = 0
    state_file = ckpt / "train_state.pt"
    if state_file.exists():
        st = torch.load(state_file, weights_only=False)
        drafter.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        start = st["step"]
        rng.setstate(st["rng"])
        torch.set_rng_state(st["torch_rng"])
        print(f"resumed from {state_file} at step {start}", flush=True)

    def save_state(step: int) -> None:
        torch.save(dict(model=drafter.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(),
                        step=step, rng=rng.getstate(), torch_rng=torch.get_rng_state()), state_file)

    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="drafter", unit="step")
    tau = float("nan")
    for step in bar:
        seqs = rng.sample(train_set, min(args.batch_size, len(train_set)))
        anchors = []
        for s in seqs:
            lo, hi = s.prompt_len, len(s.tokens) - 1  # anchors in the response, one label at least
            k = min(args.anchors, hi - lo)
            anchors.append(torch.tensor(sorted(rng.sample(range(lo, hi), k))))
        batch = block_batch(seqs, anchors, B, cfg.mask_token_id, device)
        loss = weighted_loss(block_logits(drafter, embed, lm_head, batch), batch["labels"], B, gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        opt.step()
        sched.step()
        done = step + 1
        if done % args.eval_every == 0 or done == args.steps:
            drafter.eval()
            tau = walk_tau(drafter, embed, lm_head, eval_set, B, cfg.mask_token_id, device)
            drafter.train()
            tqdm.write(f"step {done}: loss {loss.item():.3f}, held-out greedy acceptance length {tau:.2f}")
        if done % args.save_every == 0:
            save_state(done)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{sched.get_last_lr()[0]:.2e}", tau=f"{tau:.2f}")
    drafter.eval()
    drafter.save_pretrained(out)
    save_state(args.steps)
    print(f"wrote {out} (held-out greedy acceptance length {tau:.2f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
