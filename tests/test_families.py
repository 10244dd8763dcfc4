"""Target families (`families.py`): which targets start, and a refusal naming the reason for the rest.
Weightless config checks, then a hybrid Gated DeltaNet target refused by a real server before it starts."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from sglang_dflash.config import DFlashConfig
from sglang_dflash.families import check_target, refusal, text_config


def _qwen3_5(**text):
    from transformers import Qwen3_5Config

    return Qwen3_5Config(text_config=dict(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                          num_key_value_heads=2, head_dim=8, **text))


def _qwen3_next():
    from transformers import Qwen3NextConfig

    return Qwen3NextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, linear_num_key_heads=2,
                           linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
                           num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                           shared_expert_intermediate_size=16, max_position_embeddings=512)


# Kimi-K2.5's layout (a multimodal composite whose text config is DeepSeek-V3 with MLA), sizes as published
KIMI_K2_5 = {
    "architectures": ["KimiK25ForConditionalGeneration"], "model_type": "kimi_k25",
    "text_config": {"model_type": "kimi_k2", "hidden_size": 7168, "num_hidden_layers": 61, "vocab_size": 163840,
                    "num_attention_heads": 64, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
                    "qk_nope_head_dim": 128, "v_head_dim": 128, "n_routed_experts": 384},
    "vision_config": {"hidden_size": 1152},
}
KIMI_DRAFTER = {
    "architectures": ["DFlashDraftModel"], "model_type": "qwen3", "hidden_size": 7168, "intermediate_size": 18432,
    "num_hidden_layers": 5, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128,
    "rope_theta": 50000.0, "block_size": 16, "num_target_layers": 61,
    "dflash_config": {"target_layer_ids": [1, 15, 30, 44, 58], "mask_token_id": 163838, "block_size": 16},
}


def test_dense_targets_pass():
    from transformers import LlamaConfig, Qwen3Config, Qwen3MoeConfig

    for cfg in (Qwen3Config(), LlamaConfig(rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 8192}),
                Qwen3MoeConfig()):
        assert refusal(cfg, "cpu") is None, type(cfg).__name__
    # sliding and full attention layers keep only KV
    assert refusal({"model_type": "gemma3_text", "layer_types": ["sliding_attention", "full_attention"]}, "cpu") is None


def test_attention_sinks_refused_off_a_gpu():
    gpt_oss = {"model_type": "gpt_oss", "layer_types": ["sliding_attention", "full_attention"]}
    assert "attention sinks" in refusal(gpt_oss, "cpu") and "'cpu'" in refusal(gpt_oss, "cpu")
    assert refusal(gpt_oss, "cuda") is None


def test_torch_native_attention_refuses_inputs_it_does_not_implement():
    """Our CPU attention once dropped gpt-oss's `sinks` in prefill (a different attention, silently)."""
    from sglang_dflash.srt.attention import VerifyCapableTorchNativeBackend

    backend = object.__new__(VerifyCapableTorchNativeBackend)
    for forward in (backend.forward_extend, backend.forward_decode):
        with pytest.raises(NotImplementedError, match="'sinks'"):
            forward(None, None, None, None, None, sinks=object())


def test_hybrid_gated_deltanet_served_where_its_kernels_run():
    """Gated DeltaNet targets are served (the worker commits their state after verify): everywhere for Qwen3-Next,
    whose layer runs on CPU with our torch pieces; Qwen3.5 / 3.6 (composite: read from the text config) only on a
    GPU, with a refusal naming the reason on CPU."""
    for device in ("cpu", "cuda"):
        check_target(_qwen3_next(), device)
    check_target(_qwen3_5(), "cuda")
    with pytest.raises(ValueError) as e:
        check_target(_qwen3_5(), "cpu")
    missing = [w for w in ("'qwen3_5_text'", "Gated DeltaNet", "'cpu'", "['qwen3_next']") if w not in str(e.value)]
    assert not missing, str(e.value)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_other_recurrent_layers_refused(device):
    """A linear-attention hybrid that is not Gated DeltaNet (Kimi-Linear's KDA) would be served wrong: refused."""
    kimi_linear = {"model_type": "kimi_linear", "layer_types": ["linear_attention", "full_attention"]}
    reason = refusal(kimi_linear, device)
    assert "'kimi_linear'" in reason and "only for Gated DeltaNet" in reason and "wrong output" in reason, reason


def test_recurrent_without_layer_types_refused():
    assert "linear_num_value_heads" in refusal({"model_type": "x", "linear_num_value_heads": 4}, "cpu")
    assert "'mamba2'" in refusal({"model_type": "mamba2"}, "cpu")


def test_composite_text_config_and_mla():
    text = text_config(KIMI_K2_5)
    assert text["hidden_size"] == 7168 and text_config(_qwen3_5())["model_type"] == "qwen3_5_text"
    reason = refusal(KIMI_K2_5, "cpu")
    assert "multi-head latent attention" in reason and "kv_lora_rank=512" in reason and "'cpu'" in reason
    assert refusal(KIMI_K2_5, "cuda") is None  # on a GPU SGLang's MLA backends serve its verify
    # the drafter checks read the text config: a Kimi-K2.5 drafter fits, a wrong hidden size is named
    DFlashConfig.from_dict(KIMI_DRAFTER).validate_against_target(text)
    with pytest.raises(ValueError, match="hidden_size=7168, expected the target's hidden_size=32"):
        DFlashConfig.from_dict(KIMI_DRAFTER).validate_against_target(text_config(_qwen3_5()))


def _start_args(tmp_path, target, **changes):
    path = tmp_path / target["model_type"]  # one directory per config: SGLang caches a path's config
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(target))
    base = dict(model_path=str(path), trust_remote_code=False, revision=None, json_model_override_args="{}",
                device="cpu", speculative_draft_window_size=None, enable_mixed_chunk=False,
                speculative_draft_model_path=None)
    return SimpleNamespace(**{**base, **changes})


def test_start_args_checks(tmp_path):
    from sglang_dflash.srt.hooks import check_start_args
    from transformers import Qwen3Config

    dense = Qwen3Config(vocab_size=64, hidden_size=32, num_hidden_layers=2).to_dict()
    check_start_args(_start_args(tmp_path, dense))
    with pytest.raises(ValueError, match="--speculative-draft-window-size=64 is not supported"):
        check_start_args(_start_args(tmp_path, dense, speculative_draft_window_size=64))
    with pytest.raises(ValueError, match="--enable-mixed-chunk is not supported"):
        check_start_args(_start_args(tmp_path, dense, enable_mixed_chunk=True))
    assert check_start_args(_start_args(tmp_path, _qwen3_next().to_dict()))["model_type"] == "qwen3_next"
    # the drafter against the target, from its config alone (no weights read)
    draft = tmp_path / "draft"
    draft.mkdir()
    raw = {**KIMI_DRAFTER, "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
           "num_target_layers": 2, "dflash_config": {"target_layer_ids": [0], "mask_token_id": 63, "block_size": 4}}
    (draft / "config.json").write_text(json.dumps(raw))
    check_start_args(_start_args(tmp_path, dense, speculative_draft_model_path=str(draft),
                                 speculative_draft_model_revision=None, speculative_num_draft_tokens=None))
    with pytest.raises(ValueError, match="block_size=1, expected an integer >= 2"):
        check_start_args(_start_args(tmp_path, dense, speculative_draft_model_path=str(draft),
                                     speculative_draft_model_revision=None, speculative_num_draft_tokens=1))


def test_gated_deltanet_under_overlap_refused_on_cpu(tmp_path, monkeypatch):
    """SGLang's overlap scheduler needs its extra_buffer Mamba radix cache for a GDN target, GPU-only in 0.5.23."""
    from sglang_dflash.srt.hooks import check_start_args

    monkeypatch.setenv("SGLANG_ENABLE_DFLASH_SPEC_V2", "1")
    with pytest.raises(ValueError, match="'qwen3_next'.* overlap scheduler .* runs only on GPUs"):
        check_start_args(_start_args(tmp_path, _qwen3_next().to_dict()))
    check_start_args(_start_args(tmp_path, _qwen3_next().to_dict(), device="cuda"))


def test_server_refuses_a_gdn_target_it_cannot_run_here_before_starting(tmp_path):
    """A Qwen3.5 target (a config is enough: the refusal comes first) with a drafter that fits it: on CPU the server
    exits at argument resolution with the reason, before any scheduler starts or any weight is read."""
    from sglang_server import Server

    for name, raw in (("target", {**_qwen3_5().to_dict(), "architectures": ["Qwen3_5ForConditionalGeneration"]}),
                      ("draft", {**KIMI_DRAFTER, "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
                                 "head_dim": 8, "num_target_layers": 4, "vocab_size": 64,
                                 "dflash_config": {"target_layer_ids": [0, 1], "mask_token_id": 63,
                                                   "block_size": 4}})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(raw))
    server = Server(tmp_path / "target", tmp_path / "draft", "--skip-tokenizer-init")
    rc = server.wait_exit(timeout=240)
    log = server.log()
    assert rc != 0, log[-3000:]
    assert "'qwen3_5_text' has Gated DeltaNet layers" in log and "serve it on a GPU" in log, log[-3000:]
    assert "Load weight begin" not in log, "refused only after the target was loaded"
