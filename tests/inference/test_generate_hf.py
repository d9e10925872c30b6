"""Greedy parity of `ernie_jax.generate` (KV cache: prefill, then decode steps) with transformers' `generate`
(do_sample=False, eos disabled, fp32, eager attention and experts), token for token.

Random weights (std 0.3, norm scales ~1) so that greedy continuations are not one repeated token (asserted):
- the dense tiny model and the MoE tiny model (correction biases that change the routing, asserted), each on a
  batch of two text prompts of different lengths (right-padded in our prefill, decoded side by side) against
  transformers on each prompt alone;
- the VL model on one prompt with an image and a video (one prefill compile for both), the video long and of
  low resolution so that its last frames' t positions lie past the prompt's last token (transformers' 3D
  position rule does not advance over the temporal extent: `mrope` module doc): decoding must continue from
  the last prompt token's position + 1, as transformers' `generate` does (`position_ids[..., -1:] + 1`), not
  from its rope_deltas (max position + 1 - prompt tokens).
Every compile here is XLA:CPU's (~5-10 s each on 2 cores): one prefill and one decode program per model.
"""

import json

import numpy as np
import pytest

import ernie_jax
from ernie_jax import get_preset
from ernie_jax.processor.prompt import SpecialTokens, Vision, encode_prompt

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

HF_KW = dict(attn_implementation="eager", experts_implementation="eager")
N_NEW = 10
TEXT_PROMPTS = [[7, 3, 90, 14, 55], [21, 8, 60, 33, 2, 119, 47, 12, 5, 76, 31]]  # 5 and 11 tokens
VL_CFG = get_preset("tiny-vl-test")
STD = 0.3  # weights' scale: at 0.1-0.2 the tiny tied-head models mostly repeat one token forever


def _randomise(model, seed=0):
    """Every parameter random (std STD; 1-D norm scales 1 + 0.1 noise), correction biases too (std 0.1:
    transformers initialises them to zero, which would make the biased and the plain selection the same)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if p.ndim == 1 and ("norm" in name or name.endswith("ln.weight")) else STD * noise)
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                b = m.e_score_correction_bias
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model.eval()


def _hf_generate(hf, inputs, n=N_NEW, *, stop=False):
    """transformers' greedy continuation of one prompt (a dict of numpy arrays, batch 1): n new token ids, or
    with stop=True up to n, ending at the config's eos token."""
    inp = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    kw = {} if stop else dict(eos_token_id=None)
    with torch.no_grad():
        out = hf.generate(**inp, do_sample=False, max_new_tokens=n, num_beams=1, use_cache=True, pad_token_id=0, **kw)
    new = out[0, inp["input_ids"].shape[1]:].tolist()
    assert stop or len(new) == n, new  # no early stop
    return new


def _assert_varied(tokens):
    assert len(set(tokens)) >= 3, f"degenerate reference continuation {tokens}: the comparison would prove little"


# the dropless experts' grouped matmul that XLA:CPU compiles fastest (the default `bucketed` takes ~2x longer);
# the dispatch paths' own parity is tests/checkpoint/test_hf_moe.py's
FAST_GMM = dict(moe_gmm_impl="ragged_dot")


def _text_ckpt(cfg, tmp_path_factory, name):
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg.to_hf()),
                                                       dtype=torch.float32, **HF_KW)
    hf = _randomise(hf)
    path = tmp_path_factory.mktemp(name)
    hf.save_pretrained(path)
    ours = ernie_jax.from_pretrained(path, dtype="float32", **FAST_GMM)
    assert ours.config == cfg.replace(**FAST_GMM)
    return hf, ours


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return _text_ckpt(get_preset("tiny-test"), tmp_path_factory, "dense")


MOE_CFG = get_preset("tiny-moe-test")


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return _text_ckpt(MOE_CFG, tmp_path_factory, "moe")


def _check_batch_against_hf(hf, ours):
    """Both prompts in one batch through ours == each alone through transformers: without eos, and with the
    config's eos (the row ends with it)."""
    refs = [_hf_generate(hf, {"input_ids": np.asarray([p])}) for p in TEXT_PROMPTS]
    for r in refs:
        _assert_varied(r)
    assert ernie_jax.generate(ours, TEXT_PROMPTS, max_new_tokens=N_NEW, eos_token_id=None) == refs
    eos = ours.config.eos_token_id
    cut = [_hf_generate(hf, {"input_ids": np.asarray([p])}, stop=True) for p in TEXT_PROMPTS]
    assert cut == [r[:r.index(eos) + 1] if eos in r else r for r in refs]
    assert ernie_jax.generate(ours, TEXT_PROMPTS, max_new_tokens=N_NEW) == cut  # same shapes: no new compile
    return refs


def test_dense_greedy_matches_transformers(dense):
    _check_batch_against_hf(*dense)


def test_moe_greedy_matches_transformers(moe):
    hf, ours = moe
    refs = _check_batch_against_hf(hf, ours)
    assert MOE_CFG.eos_token_id in refs[1][:-1]  # the eos check above cut a row short
    # guard: the correction bias changes which experts some of these tokens go to
    seq = torch.tensor([TEXT_PROMPTS[1] + refs[1]])
    with torch.no_grad():
        router_logits = hf(seq, output_router_logits=True).router_logits
    gates = [m.mlp.gate for m in hf.model.layers if hasattr(m.mlp, "gate")]
    assert len(gates) == len(router_logits) >= 1
    for z, gate in zip(router_logits, gates):
        p = torch.softmax(z.float(), -1).numpy()
        bias = gate.moe_statics.e_score_correction_bias.numpy().reshape(-1)
        plain = np.sort(np.argsort(-p, -1)[:, :MOE_CFG.moe_k], -1)
        biased = np.sort(np.argsort(-(p + bias), -1)[:, :MOE_CFG.moe_k], -1)
        assert (plain != biased).any(1).sum() >= 2, "the correction bias never changes the routing"


# --- VL ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("vl"))
    with open(f"{tmp}/config.json", "w") as f:
        json.dump({**VL_CFG.to_hf(), "architectures": ["Ernie4_5_VLMoeForConditionalGeneration"]}, f)
    hf = transformers.Ernie4_5_VLMoeForConditionalGeneration._from_config(
        transformers.AutoConfig.from_pretrained(tmp), **HF_KW)
    hf = _randomise(hf)
    hf.save_pretrained(f"{tmp}/hf")
    return hf, ernie_jax.from_pretrained(f"{tmp}/hf", dtype="float32", **FAST_GMM)


def _vl_prompt():
    """Text, an image (2 x 3 merged patches), text, a video of 12 frames of 2 x 2 merged patches, text. The
    video's t positions run over 6 values but the text after it advances by max(2, 2) = 2 only (mrope rule
    "hf"), so its last frames lie past the prompt's last token: max position + 1 > last position + 1."""
    rs = np.random.RandomState(0)
    img = lambda h, w: rs.randint(0, 256, (h, w, 3), dtype=np.uint8)  # noqa: E731
    video = Vision.from_video(np.stack([img(56, 56) for _ in range(12)]), min_pixels=56 * 56)
    assert video.grid_thw.tolist() == [12, 4, 4]
    return encode_prompt([[5, 6], Vision.from_image(img(56, 84)), [7], video, [10, 11]],
                         SpecialTokens.from_config(VL_CFG))


def _hf_vl_inputs(enc):
    inp = {"input_ids": enc.input_ids[None], "attention_mask": np.ones((1, len(enc.input_ids)), np.int64),
           "mm_token_type_ids": enc.mm_token_type_ids[None], "moe_mm_token_type_ids": enc.moe_mm_token_type_ids[None]}
    for kind, pix, grid in (("images", "pixel_values", "image_grid_thw"),
                            ("videos", "pixel_values_videos", "video_grid_thw")):
        items = getattr(enc, kind)
        if items:
            inp[pix] = np.concatenate([v.patches for v in items]).astype(np.float32)
            inp[grid] = np.stack([v.grid_thw for v in items]).astype(np.int64)
    return inp


def test_vl_image_and_video_greedy_matches_transformers(vl):
    """One prefill compile for both modalities: the image and the video fill their placeholders, the 3D
    positions and the vision experts serve the prefill, the decode steps continue where transformers does."""
    hf, ours = vl
    enc = _vl_prompt()
    inp = _hf_vl_inputs(enc)
    # guard: the case where decoding from rope_deltas (max position + 1) and from the last token differ
    pos, rope_deltas = hf.model.get_rope_index(
        torch.from_numpy(inp["input_ids"]), mm_token_type_ids=torch.from_numpy(inp["mm_token_type_ids"]),
        image_grid_thw=torch.from_numpy(inp["image_grid_thw"]), video_grid_thw=torch.from_numpy(inp["video_grid_thw"]),
        attention_mask=torch.from_numpy(inp["attention_mask"]))
    n, last = pos.shape[-1], int(pos[0, 0, -1])  # the last prompt token is text: t = h = w
    assert (pos[:, 0, -1] == last).all() and int(rope_deltas[0, 0]) == int(pos.max()) + 1 - n > last + 1 - n
    ref = _hf_generate(hf, inp)
    _assert_varied(ref)
    assert ernie_jax.generate(ours, [enc], max_new_tokens=N_NEW, eos_token_id=None) == [ref]
