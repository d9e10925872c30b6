"""Named configs: the five released ERNIE-4.5 shapes (architecture doc §2) and tiny ones for tests / CPU.

`get_preset("ernie-4.5-0.3b", dtype="bfloat16")` returns the preset with fields replaced; an unknown
name or field is an error that lists what exists.
"""

from __future__ import annotations

from typing import Any

from ernie_jax.config import ConfigError, ErnieConfig, VisionConfig

_VIT = VisionConfig()  # every released VL model uses the same 32 x 1280 ViT

PRESETS: dict[str, ErnieConfig] = {
    "ernie-4.5-0.3b": ErnieConfig(
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=18, num_attention_heads=16,
        num_key_value_heads=2, head_dim=128, tie_word_embeddings=True),
    "ernie-4.5-21b-a3b": ErnieConfig(
        hidden_size=2560, intermediate_size=12288, num_hidden_layers=28, num_attention_heads=20,
        num_key_value_heads=4, head_dim=128, tie_word_embeddings=True,
        moe_num_experts=64, moe_k=6, moe_intermediate_size=(1536,), moe_num_shared_experts=2,
        moe_layer_start_index=1, moe_layer_end_index=27, num_nextn_predict_layers=1),
    "ernie-4.5-300b-a47b": ErnieConfig(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=54, num_attention_heads=64,
        num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
        moe_num_experts=64, moe_k=8, moe_intermediate_size=(3584,), moe_num_shared_experts=0,
        moe_layer_start_index=3, moe_layer_end_index=53, num_nextn_predict_layers=1),
    "ernie-4.5-vl-28b-a3b": ErnieConfig(
        hidden_size=2560, intermediate_size=12288, num_hidden_layers=28, num_attention_heads=20,
        num_key_value_heads=4, head_dim=128, tie_word_embeddings=True, pad_token_id=None, bos_token_id=None,
        eos_token_id=None, moe_num_experts=64, moe_k=6, moe_intermediate_size=(1536, 512),
        moe_num_shared_experts=2, moe_layer_start_index=1, moe_layer_end_index=27, vision=_VIT),
    "ernie-4.5-vl-424b-a47b": ErnieConfig(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=54, num_attention_heads=64,
        num_key_value_heads=8, head_dim=128, tie_word_embeddings=False, pad_token_id=None, bos_token_id=None,
        eos_token_id=None, moe_num_experts=64, moe_k=8, moe_intermediate_size=(3584, 1536),
        moe_num_shared_experts=0, moe_layer_start_index=3, moe_layer_end_index=53, vision=_VIT),
    # Tiny shapes: they keep the released models' quirks (head_dim != hidden/heads, GQA) at a size that
    # runs in milliseconds on a CPU. `tiny` is the CPU default of the main job.
    "tiny": ErnieConfig(
        vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=2048, rope_theta=10000.0),
    "tiny-test": ErnieConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rope_theta=10000.0),
    "tiny-moe-test": ErnieConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rope_theta=10000.0,
        moe_num_experts=8, moe_k=2, moe_intermediate_size=(16,), moe_num_shared_experts=1,
        moe_layer_start_index=1),
    # Tiny VL: `tiny`'s decoder with modality-isolated experts and a 2-block ViT; the vocab is the embedded
    # 512-piece tokenizer's plus the six image/video special ids, which the tokenizer never produces.
    "tiny-vl": ErnieConfig(
        vocab_size=520, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=2048, rope_theta=10000.0,
        moe_num_experts=8, moe_k=2, moe_intermediate_size=(128, 64), moe_num_shared_experts=1,
        moe_layer_start_index=1, mrope_section=(12, 12, 8),
        vision=VisionConfig(depth=2, hidden_size=64, intermediate_size=256, num_heads=4),
        image_token_id=512, image_start_token_id=513, image_end_token_id=514, video_token_id=515,
        video_start_token_id=516, video_end_token_id=517),
    "tiny-vl-test": ErnieConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rope_theta=10000.0,
        moe_num_experts=8, moe_k=2, moe_intermediate_size=(16, 8), moe_num_shared_experts=1,
        moe_layer_start_index=1, mrope_section=(3, 3, 2),
        vision=VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2),
        image_token_id=100, image_start_token_id=101, image_end_token_id=102, video_token_id=103,
        video_start_token_id=104, video_end_token_id=105),
}

RELEASED = ("ernie-4.5-0.3b", "ernie-4.5-21b-a3b", "ernie-4.5-300b-a47b", "ernie-4.5-vl-28b-a3b",
            "ernie-4.5-vl-424b-a47b")


def get_preset(name: str, **changes: Any) -> ErnieConfig:
    """The preset `name` with `changes` applied (validated again)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name].replace(**changes) if changes else PRESETS[name]
