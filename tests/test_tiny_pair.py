"""The bundled trained pair: small, loadable, lossless, and accepting several tokens per step."""

from sglang_dflash.assets import heldout_prompts
from sglang_dflash.reference import generate


def test_files_are_small_and_real(tiny_pair):
    target, draft = tiny_pair
    size = sum(f.stat().st_size for d in (target, draft) for f in d.iterdir())
    assert size < 16 * 2**20
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (target / name).is_file(), name
    assert (draft / "config.json").is_file() and (draft / "model.safetensors").is_file()


def test_tokenizer_chat_template_and_mask(tiny_pair):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_pair[0])
    ids = tok.apply_chat_template([{"role": "user", "content": "x = 1"}], add_generation_prompt=True, tokenize=False)
    assert ids.startswith("<|im_start|>user\n") and ids.endswith("<|im_start|>assistant\n")
    assert tok.convert_tokens_to_ids("<|mask|>") == 1


def test_greedy_lossless_with_real_acceptance(tiny_pair_models):
    """Token-for-token equal to target-only on 12 held-out prompts; mean acceptance length > 2."""
    target, drafter = tiny_pair_models
    prompts = heldout_prompts()[:12]
    spec = generate(target, drafter, prompts, 48)
    plain = generate(target, None, prompts, 48)
    steps = []
    for s, p in zip(spec, plain):
        assert s.output_ids == p.output_ids
        steps += s.accept_lengths
    tau = sum(steps) / len(steps)
    assert tau > 2.0, f"mean acceptance length {tau:.2f}"
    assert max(steps) >= 6
