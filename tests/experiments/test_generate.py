"""experiments/generate.py: what the CLI prints behind each prompt is `ernie_jax.generate`'s continuation on
the same weights: a 2-step run of the tiny config (conftest.py; raw and EMA weights, text and id prompts, one
run through the real command line), a transformers directory (greedy, sampled, speculative) and a quantized
checkpoint; bad flags are usage errors that name the flag."""

import contextlib
import io
import os
import subprocess
import sys

import jax
import pytest
from absl import app, flags

import ernie_jax
from ernie_jax.data.tokenizer import SentencePieceTokenizer
from ernie_jax.inference import KVCacheConfig
from ernie_jax.quantization.checkpoint import load_quantized, save_quantized
from ernie_jax.quantization.model import quantize_model
from ernie_jax.quantization.scheme import get_scheme
from ernie_jax.sharding import make_mesh, resolve_rules
from experiments import generate as cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_FILE = os.path.join(ROOT, "experiments", "configs", "tiny.py")  # the `run` fixture's (conftest.py)
FLAGS = flags.FLAGS


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A transformers directory of a tiny MoE with an MTP block (its config.json keeps the MTP depth)."""
    d = tmp_path_factory.mktemp("hf")
    model = ernie_jax.create_model(ernie_jax.get_preset("tiny-moe-test", num_nextn_predict_layers=1), seed=3)
    ernie_jax.save_pretrained(model, d)
    return d, ernie_jax.from_pretrained(d)


def _cli(**values) -> str:
    """main() with these flag values (lists: a repeated flag) -> stdout, the values set flag by flag."""
    FLAGS.unparse_flags()
    try:
        for name, value in values.items():
            for v in value if isinstance(value, list) else [value]:
                FLAGS[name].parse(str(v))
        FLAGS.mark_as_parsed()
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            cli.main(["generate"])
        return buf.getvalue()
    finally:
        FLAGS.unparse_flags()


def _expected(tok, prompts, outs) -> str:
    """The lines the CLI prints: each prompt's text, then its continuation (eos left out)."""
    lines = []
    for i, (p, o) in enumerate(zip(prompts, outs)):
        o = o[:-1] if o and o[-1] == tok.eos_id else o
        before, after = tok.decode(p), tok.decode(p + o)
        assert after.startswith(before)
        lines.append(f"[{i}] {before}{after[len(before):]}\n")
    return "".join(lines)


PROMPTS = ["12+34=", "reverse abc ="]


def _text_prompts(tok):
    return [[tok.bos_id] + tok.encode(p).tolist() for p in PROMPTS]


@pytest.mark.parametrize("weights, kv", [("raw", None), ("ema", None), ("raw", 4)])
def test_workdir_text_prompts_equal_generate(run, weights, kv):
    """--kv_bits=4 --kv_hadamard: the tokens of generate(..., kv_cache=KVCacheConfig(4, hadamard=True)) and the
    scheme with its bytes per token in the summary."""
    workdir, train_cfg, data_cfg, raw, ema = run
    tok = SentencePieceTokenizer(data_cfg.tokenizer)
    mesh, rules = make_mesh(train_cfg.mesh), resolve_rules(train_cfg.mesh)
    prompts = _text_prompts(tok)
    kw = {} if weights == "raw" else {"weights": "ema"}
    scheme = None
    if kv:
        kw.update(kv_bits=kv, kv_hadamard=True)
        scheme = KVCacheConfig(bits=kv, hadamard=True)
    got = _cli(workdir=workdir, config=CONFIG_FILE, prompt=PROMPTS, max_new_tokens=12, **kw)
    want = ernie_jax.generate(raw if weights == "raw" else ema, prompts, max_new_tokens=12,
                              eos_token_id=tok.eos_id, mesh=mesh, rules=rules, kv_cache=scheme)
    assert got.startswith(f"step 2 of {workdir} ({weights} weights)\n")
    assert _expected(tok, prompts, want) in got
    assert "2 prompt(s)," in got and "tokens/s" in got and "acceptance rate" not in got
    if kv:
        c = raw.config
        per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.head_dim // 2 + 4)  # int4 codes + fp32 scale
        assert f"KV cache: int4 after a Hadamard rotation, {per_token} bytes per token" in got
    else:
        assert "KV cache" not in got


def test_workdir_command_line_speculative_sampled(run):
    """The real command line (flag parsing); MTP drafts with sampling
    draw the same tokens as `generate(..., speculative="mtp")`; prompt ids are decoded with the run's
    tokenizer."""
    workdir, train_cfg, data_cfg, raw, _ = run
    tok = SentencePieceTokenizer(data_cfg.tokenizer)
    prompts = _text_prompts(tok)
    cmd = [sys.executable, "-m", "experiments.generate", f"--workdir={workdir}", f"--config={CONFIG_FILE}",
           "--max_new_tokens=10", "--temperature=0.9", "--top_k=20", "--seed=5", "--speculative=mtp"]
    cmd += [f"--prompt_ids={','.join(map(str, p))}" for p in prompts]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
                       timeout=300)  # the same 8 emulated devices as this process (XLA_FLAGS from conftest)
    assert r.returncode == 0, r.stderr[-3000:]
    want = ernie_jax.generate(raw, prompts, max_new_tokens=10, temperature=0.9, top_k=20, seed=5,
                              eos_token_id=tok.eos_id, speculative="mtp", mesh=make_mesh(train_cfg.mesh),
                              rules=resolve_rules(train_cfg.mesh))
    assert _expected(tok, prompts, want) in r.stdout
    assert "speculative decoding (MTP drafts): acceptance rate" in r.stdout and "tokens per forward" in r.stdout


@pytest.mark.parametrize("speculative", [None, "mtp"])
def test_hf_dir_prompt_ids_equal_generate(hf_dir, speculative):
    d, model = hf_dir
    assert model.config.num_nextn_predict_layers == 1
    prompts = [[5, 17, 3], [9, 9, 40, 2, 7, 1]]
    kw = {"speculative": speculative} if speculative else {}
    got = _cli(hf_dir=d, prompt_ids=[",".join(map(str, p)) for p in prompts], max_new_tokens=9, temperature=0.7,
               seed=11, **kw)
    want = ernie_jax.generate(model, prompts, max_new_tokens=9, temperature=0.7, seed=11, speculative=speculative)
    for i, (p, o) in enumerate(zip(prompts, want)):
        assert f"[{i}] {p} ->{''.join(f' {t}' for t in o)}\n" in got
    assert ("acceptance rate" in got) == bool(speculative)


def test_hf_dir_text_prompt_with_tokenizer(hf_dir, run):
    d, model = hf_dir
    tok = SentencePieceTokenizer(run[2].tokenizer)  # 512 pieces: tiny-test's vocabulary (128) is smaller
    got = _cli(hf_dir=d, tokenizer=run[2].tokenizer, prompt="the", max_new_tokens=4)
    prompt = [tok.bos_id] + tok.encode("the").tolist()
    assert max(prompt) < 128
    assert _expected(tok, [prompt], ernie_jax.generate(model, [prompt], max_new_tokens=4)) in got


@pytest.mark.parametrize("values, match", [
    ({"prompt_ids": "1,2"}, "exactly one of --workdir .*--hf_dir .* or --quantized"),
    ({"workdir": "/x", "hf_dir": "/y", "prompt_ids": "1,2"}, "exactly one of --workdir"),
    ({"hf_dir": "HF"}, "--prompt .* or --prompt_ids"),
    ({"hf_dir": "HF", "prompt": "a", "prompt_ids": "1"}, "one of the two"),
    ({"hf_dir": "HF", "prompt": "12+3="}, "--prompt with --hf_dir needs --tokenizer"),
    ({"hf_dir": "HF", "prompt_ids": "1,x"}, "--prompt_ids='1,x': expected comma-separated integers"),
    ({"hf_dir": "HF", "prompt_ids": "1,-2"}, "token ids must be >= 0"),
    ({"hf_dir": "HF", "prompt_ids": "1", "weights": "ema"}, "--weights describes a training run"),
    ({"hf_dir": "HF", "prompt_ids": "1", "max_new_tokens": 0}, "--max_new_tokens must be >= 1, got 0"),
    ({"hf_dir": "HF", "prompt_ids": "1", "temperature": -1}, "--temperature must be a finite number >= 0"),
    ({"hf_dir": "HF", "prompt_ids": "1", "top_p": 0}, "--top_p must be in"),
    ({"hf_dir": "HF", "prompt_ids": "1", "tokenizer": "/nope.model"}, "--tokenizer='/nope.model': no such file"),
    ({"hf_dir": "/nope", "prompt_ids": "1"}, "--hf_dir='/nope': no config.json"),
    ({"hf_dir": "HF", "prompt_ids": "1,200"}, r"--prompt_ids #0: .*token id 200 .*vocab_size=128"),
    ({"hf_dir": "HF", "prompt_ids": "1", "max_new_tokens": 256}, "exceeds max_position_embeddings=256"),
])
def test_bad_flags_are_usage_errors(hf_dir, values, match):
    values = {k: str(hf_dir[0]) if v == "HF" else v for k, v in values.items()}
    with pytest.raises(app.UsageError, match=match):
        _cli(**values)


def test_workdir_errors(tmp_path, hf_dir):
    with pytest.raises(app.UsageError, match="no checkpoints in"):
        _cli(workdir=tmp_path, config=CONFIG_FILE, prompt="a")
    with pytest.raises(app.UsageError, match="--config describes a training run"):
        _cli(hf_dir=hf_dir[0], config=CONFIG_FILE, prompt_ids="1")
    with pytest.raises(app.UsageError, match="speculative='mtp' needs a model with MTP weights"):
        d = tmp_path / "plain"
        ernie_jax.save_pretrained(ernie_jax.create_model(ernie_jax.get_preset("tiny-test"), seed=0), d)
        _cli(hf_dir=d, prompt_ids="1,2", speculative="mtp")


def test_quantized_dir_text_prompts_equal_generate(run, tmp_path):
    """--quantized: the checkpoint loads quantized and text goes through the tokenizer its manifest names."""
    workdir, _, data_cfg, raw, _ = run
    scheme = get_scheme("w4a8")
    d = tmp_path / "w4a8"
    save_quantized(quantize_model(raw, scheme), d, scheme=scheme,
                   extra={"source": str(workdir), "tokenizer": data_cfg.tokenizer, "add_bos": data_cfg.add_bos})
    tok = SentencePieceTokenizer(data_cfg.tokenizer)
    prompts = _text_prompts(tok)
    got = _cli(quantized=d, prompt=PROMPTS, max_new_tokens=12)
    want = ernie_jax.generate(load_quantized(d), prompts, max_new_tokens=12, eos_token_id=tok.eos_id)
    assert got.startswith(f"w4a8 (rtn) weights of {workdir}\n")
    assert _expected(tok, prompts, want) in got
    with pytest.raises(app.UsageError, match="--quantized: .*no quantization.json"):
        _cli(quantized=tmp_path, prompt_ids="1")
    with pytest.raises(app.UsageError, match="--weights describes a training run: use it with --workdir, not "
                                             "--quantized"):
        _cli(quantized=d, prompt_ids="1", weights="ema")
