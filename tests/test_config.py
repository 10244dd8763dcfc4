import json

import pytest
from sglang_dflash.config import DFlashConfig, default_target_layer_ids

ZLAB_4B = {
    "architectures": ["DFlashDraftModel"], "model_type": "qwen3", "hidden_size": 2560,
    "intermediate_size": 9728, "num_hidden_layers": 5, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 1000000,
    "max_position_embeddings": 40960, "vocab_size": 151936, "block_size": 16, "num_target_layers": 36,
    "dflash_config": {"target_layer_ids": [1, 9, 17, 25, 33], "mask_token_id": 151669, "block_size": 16},
}
TARGET_4B = {"hidden_size": 2560, "num_hidden_layers": 36, "vocab_size": 151936}


def test_parses_zlab_config():
    cfg = DFlashConfig.from_dict(ZLAB_4B)
    assert cfg.target_layer_ids == (1, 9, 17, 25, 33)
    assert (cfg.mask_token_id, cfg.block_size, cfg.head_dim, cfg.num_key_value_heads) == (151669, 16, 128, 8)
    assert cfg.num_target_features == 5
    assert cfg.rope_theta == 1e6
    cfg.validate_against_target(TARGET_4B)


def test_roundtrip_through_json(tmp_path):
    cfg = DFlashConfig.from_dict(ZLAB_4B)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    assert DFlashConfig.from_pretrained(tmp_path) == cfg


@pytest.mark.parametrize("n_target,n_draft,expected", [
    (36, 5, (1, 9, 17, 25, 33)), (36, 1, (18,)), (28, 1, (14,)), (28, 3, (1, 13, 25)), (12, 2, (1, 9)),
])
def test_default_layer_ids(n_target, n_draft, expected):
    assert default_target_layer_ids(n_target, n_draft) == expected


def test_older_checkpoint_without_dflash_config():
    raw = {k: v for k, v in ZLAB_4B.items() if k != "dflash_config"}
    raw["mask_token_id"] = 151669
    cfg = DFlashConfig.from_dict(raw)
    assert cfg.target_layer_ids == (1, 9, 17, 25, 33)  # the even spread
    assert cfg.block_size == 16


def test_block_size_override():
    assert DFlashConfig.from_dict(ZLAB_4B, block_size=8).block_size == 8


def _raw(**changes):
    raw = json.loads(json.dumps(ZLAB_4B))
    for k, v in changes.items():
        if k in ("target_layer_ids", "mask_token_id"):
            raw["dflash_config"][k] = v
        else:
            raw[k] = v
    return raw


@pytest.mark.parametrize("changes,words", [
    ({"target_layer_ids": [1, 40]}, ["target_layer_ids", "40", "[0, 36)"]),
    ({"target_layer_ids": [-1]}, ["target_layer_ids", "-1"]),
    ({"target_layer_ids": []}, ["target_layer_ids"]),
    ({"mask_token_id": -3}, ["mask_token_id", "-3"]),
    ({"num_attention_heads": 30}, ["num_attention_heads=30", "num_key_value_heads=8"]),
    ({"hidden_size": 0}, ["hidden_size=0"]),
])
def test_invalid_config_names_the_field(changes, words):
    with pytest.raises(ValueError) as e:
        DFlashConfig.from_dict(_raw(**changes))
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("bs", [1, 0, -4])
def test_block_size_below_two(bs):
    with pytest.raises(ValueError, match=f"block_size={bs}.*>= 2"):
        DFlashConfig.from_dict(ZLAB_4B, block_size=bs)


def test_missing_fields():
    raw = {k: v for k, v in ZLAB_4B.items() if k != "num_target_layers"}
    with pytest.raises(ValueError, match="num_target_layers"):
        DFlashConfig.from_dict(raw)
    with pytest.raises(ValueError, match="hidden_size"):
        DFlashConfig.from_dict({"model_type": "qwen3"})
    raw = _raw()
    del raw["dflash_config"]["mask_token_id"]
    with pytest.raises(ValueError, match="mask_token_id"):
        DFlashConfig.from_dict(raw)


@pytest.mark.parametrize("target,words", [
    ({**TARGET_4B, "hidden_size": 4096}, ["hidden_size=2560", "4096"]),
    ({**TARGET_4B, "num_hidden_layers": 28}, ["target_layer_ids", "33", "[0, 28)"]),
    ({**TARGET_4B, "vocab_size": 151669}, ["mask_token_id=151669", "[0, 151669)"]),
])
def test_validate_against_target(target, words):
    cfg = DFlashConfig.from_dict(ZLAB_4B)
    with pytest.raises(ValueError) as e:
        cfg.validate_against_target(target)
    for w in words:
        assert w in str(e.value)


def test_bad_directory(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        DFlashConfig.from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="no config.json"):
        DFlashConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        DFlashConfig.from_pretrained(tmp_path)


def test_target_layer_ids_distinct_and_capture_order():
    from sglang_dflash.config import capture_order

    with pytest.raises(ValueError, match=r"target_layer_ids=\[1, 9, 9\] repeats a layer"):
        DFlashConfig.from_dict(_raw(target_layer_ids=[1, 9, 9]))
    assert capture_order((1, 9, 17)) is None
    # SGLang captures layers 1, 9, 17 in that order; a config listing (17, 1, 9) reads captured rows 2, 0, 1
    order = capture_order((17, 1, 9))
    assert order == [2, 0, 1]  # served end to end: test_sglang_drafter_config.py
