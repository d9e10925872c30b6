"""The vision / resampler key rules against what transformers really writes (`save_pretrained`, hub layout)
and holds in memory (`state_dict`), both directions."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from ernie_jax.checkpoint.hf_vision import adapter_rules, vision_rules
from ernie_jax.checkpoint.rules import CheckpointError, export_tensors, load_tensors
from ernie_jax.config import VisionConfig
from ernie_jax.model.adapter import Adapter
from ernie_jax.model.vision import VisionEncoder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

VCFG = VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=2)
H_TEXT = 64
_PARTS = ("model.vision_model.", "model.resampler_model.", "model.vision_tower.")


@pytest.fixture(scope="module")
def hf_model():
    cfg = transformers.Ernie4_5_VLMoeConfig(
        text_config=dict(vocab_size=99, hidden_size=H_TEXT, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, moe_intermediate_size=[32, 32], moe_k=2,
                         moe_num_experts=4, mlp_layer_types=["dense", "sparse"],
                         rope_parameters={"rope_type": "default", "rope_theta": 5e5, "mrope_section": [6, 6, 4]}),
        vision_config=dict(depth=VCFG.depth, hidden_size=VCFG.hidden_size, num_heads=VCFG.num_heads,
                           intermediate_size=VCFG.intermediate_size, patch_size=VCFG.patch_size,
                           spatial_merge_size=2, temporal_merge_size=2, hidden_act="quick_gelu"))
    torch.manual_seed(0)
    model = transformers.Ernie4_5_VLMoeForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape))
    return model


def _abstract():
    return (nnx.eval_shape(lambda: VisionEncoder(VCFG, param_dtype=jnp.float32, rngs=nnx.Rngs(0))),
            nnx.eval_shape(lambda: Adapter(VCFG, H_TEXT, 1e-5, param_dtype=jnp.float32, rngs=nnx.Rngs(0))))


def test_hub_layout_is_what_save_pretrained_writes(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    on_disk = {k: v for k, v in load_file(tmp_path / "model.safetensors").items() if k.startswith(_PARTS)}
    rules_v, rules_a = vision_rules(VCFG, (), layout="hub"), adapter_rules((), layout="hub")
    assert {k for r in rules_v + rules_a for k in r.keys()} == set(on_disk)
    enc, ad = _abstract()
    enc, ad = load_tensors(enc, rules_v, on_disk), load_tensors(ad, rules_a, on_disk)
    back = {**export_tensors(enc, rules_v), **export_tensors(ad, rules_a)}  # ours -> hub keys, bit-exact
    assert set(back) == set(on_disk)
    for k, v in on_disk.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_memory_layout_is_the_state_dict(hf_model):
    sd = {k: v.numpy() for k, v in hf_model.state_dict().items() if k.startswith(_PARTS)}
    rules_v, rules_a = vision_rules(VCFG, (), layout="memory"), adapter_rules((), layout="memory")
    assert {k for r in rules_v + rules_a for k in r.keys()} == set(sd)
    enc, ad = _abstract()
    enc = load_tensors(enc, rules_v, sd)
    # the fused qkv splits as (q|k|v, head, dim): block 1's key projection of head 1 is rows [48, 64)
    qkv = sd["model.vision_tower.blocks.1.attn.qkv.weight"]
    np.testing.assert_array_equal(np.asarray(enc.blocks.attn.wqkv[1, :, 1, 1, :]), qkv[48:64].T)


def test_missing_and_misshapen_keys_are_named(hf_model):
    sd = {k: v.numpy() for k, v in hf_model.state_dict().items() if k.startswith("model.vision_tower.")}
    enc, _ = _abstract()
    rules = vision_rules(VCFG, (), layout="memory")
    with pytest.raises(CheckpointError, match=r"model\.vision_tower\.blocks\.1\.mlp\.fc2\.bias"):
        load_tensors(enc, rules, {k: v for k, v in sd.items() if k != "model.vision_tower.blocks.1.mlp.fc2.bias"})
    with pytest.raises(CheckpointError, match=r"model\.vision_tower\.ln\.weight"):
        load_tensors(enc, rules, {**sd, "model.vision_tower.ln.weight": np.ones(7, np.float32)})
    with pytest.raises(ValueError, match="unknown HF key layout"):
        vision_rules(VCFG, layout="disk")
