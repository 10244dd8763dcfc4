"""Drafter training: the packed training forward equals inference, loss falls, checkpoints load."""

import json

import torch
from conftest import make_drafter, make_target
from sglang_dflash.drafter import DFlashDrafter
from sglang_dflash.train import block_batch, block_logits, main, weighted_loss
from sglang_dflash.train_data import build_dataset


def _data(target, layer_ids, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 60, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    return prompts, build_dataset(target, prompts, 12, layer_ids, pad_id=0, batch_size=4)


def test_dataset_is_target_greedy():
    from sglang_dflash.reference import generate
    from sglang_dflash.target import target_features

    target = make_target()
    prompts, data = _data(target, (0, 2))
    by_prompt = {tuple(s.tokens[: s.prompt_len].tolist()): s for s in data}
    for p in prompts:
        s = by_prompt[tuple(p)]
        assert s.tokens[len(p):].tolist() == generate(target, None, [p], 12)[0].output_ids
        with torch.no_grad():
            hs = target(s.tokens[None], output_hidden_states=True).hidden_states
        torch.testing.assert_close(s.features.float(), target_features(hs, (0, 2))[0], rtol=1e-2, atol=1e-2)


def test_packed_blocks_equal_per_anchor_inference():
    """Training sees each block exactly as inference would: context = features before the anchor."""
    target = make_target()
    drafter = make_drafter(target, block_size=4, layer_ids=(0, 2))
    _, data = _data(target, (0, 2), n=3)
    anchors = [torch.tensor([s.prompt_len, s.prompt_len + 3, len(s.tokens) - 2]) for s in data]
    embed, head = target.get_input_embeddings(), target.get_output_embeddings()
    B, mask_id = 4, drafter.cfg.mask_token_id
    with torch.no_grad():
        packed = block_logits(drafter, embed, head, block_batch(data, anchors, B, mask_id, "cpu"))
        for i, (s, a) in enumerate(zip(data, anchors)):
            for j, anchor in enumerate(a.tolist()):
                ctx = drafter.project(s.features[:anchor].float()[None])
                kv = drafter.context_kv(ctx, torch.arange(anchor)[None])
                block = torch.full((1, B), mask_id)
                block[0, 0] = s.tokens[anchor]
                hidden = drafter(embed(block), torch.arange(anchor, anchor + B)[None], kv)
                torch.testing.assert_close(packed[i, j * B:(j + 1) * B], head(hidden)[0], rtol=1e-4, atol=1e-4)


def test_few_steps_lower_the_loss():
    target = make_target()
    drafter = make_drafter(target, block_size=4, layer_ids=(0, 2))
    drafter.train()
    _, data = _data(target, (0, 2))
    anchors = [torch.arange(s.prompt_len, len(s.tokens) - 1) for s in data]
    batch = block_batch(data, anchors, 4, drafter.cfg.mask_token_id, "cpu")
    embed, head = target.get_input_embeddings(), target.get_output_embeddings()
    opt = torch.optim.AdamW(drafter.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = weighted_loss(block_logits(drafter, embed, head, batch), batch["labels"], 4, 4.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_cli_writes_loadable_checkpoint_and_resumes(tmp_path, capsys):
    target = make_target()
    target.save_pretrained(tmp_path / "t")
    prompts = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12], [13, 14], [3, 3, 3], [9, 8, 7, 6]] * 2
    (tmp_path / "p.json").write_text(json.dumps(prompts))
    args = ["--target", str(tmp_path / "t"), "--prompt-ids-file", str(tmp_path / "p.json"), "--out",
            str(tmp_path / "d"), "--num-layers", "1", "--block-size", "4", "--target-layer-ids", "0,1",
            "--mask-token-id", "63", "--response-len", "10", "--batch-size", "4", "--anchors", "4",
            "--eval-every", "3", "--save-every", "3", "--eval-seqs", "2"]
    assert main(args + ["--steps", "3"]) == 0
    d = DFlashDrafter.from_pretrained(tmp_path / "d")
    d.cfg.validate_against_target(target.config)
    assert d.cfg.target_layer_ids == (0, 1) and d.cfg.block_size == 4 and d.cfg.mask_token_id == 63
    assert main(args + ["--steps", "5"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "at step 3" in out
    assert "held-out greedy acceptance length" in out
