"""ernie_jax.experiment.load_experiment: an experiment file's keys map onto one typed config, and every unknown
key (top level or nested), key given twice on the command line, bad value or unregistered kind is an error
that names it; the training CLI refuses such a config before it trains."""

import importlib.util
import os
import re
import subprocess
import sys
import time

import pytest

from ernie_jax.experiment import (DataKind, ExperimentConfigError, check_overrides_once, load_experiment,
                                  register_kind, registered_kinds)
from ernie_jax.experiment import data_kinds

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "experiments", "configs", "tiny.py")


def _tiny(**changes):
    """experiments/configs/tiny.py as a plain dict, with `changes` (a dict value updates that section)."""
    spec = importlib.util.spec_from_file_location("_tiny_config", TINY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config().to_dict()
    for k, v in changes.items():
        c[k] = {**c[k], **v} if isinstance(v, dict) and isinstance(c.get(k), dict) else v
    return c


def test_the_file_maps_onto_typed_sections():
    exp = load_experiment(_tiny(ema={"window": 100.0}, total_steps=7, eval_examples=3))
    assert exp.model.num_nextn_predict_layers == 1 and exp.model.max_position_embeddings == 2048
    assert exp.train.total_steps == 7 and exp.train.checkpoint_every_steps == 200 and exp.train.mesh.rules == "fsdp"
    assert exp.train.optimizer.peak_lr == 3e-3 and exp.train.loss.mtp_coef == 0.3
    assert exp.train.ema.window == 100.0 and exp.train.ema.effective_decay == pytest.approx(0.99005, abs=1e-5)
    assert exp.data.kind == exp.evaluation.kind == "text" and exp.eval_data is exp.data
    assert exp.data.train.seq_len == 128 and exp.data.heldout.sources[0].name == "default-heldout"
    assert (exp.evaluation.every_steps, exp.evaluation.examples, exp.evaluation.samples) == (300, 3, 4)
    assert load_experiment(_tiny(ema={"window": 0.0})).train.ema.enabled is False


@pytest.mark.parametrize("changes, path, key", [
    (dict(nonsense=1), "config", "nonsense"),
    (dict(optimizer={"peak_learning_rate": 1.0}), "config.optimizer", "peak_learning_rate"),
    (dict(loss={"mtp_coeff": 0.1}), "config.loss", "mtp_coeff"),
    (dict(mesh={"fsdpp": 2}), "config.mesh", "fsdpp"),
    (dict(ema={"half_life": 3}), "config.ema", "half_life"),
    (dict(model_overrides={"num_layers": 2}), "config.model_overrides", "num_layers"),
    (dict(data={"seq_length": 64}), "config.data", "seq_length"),
])
def test_an_unknown_key_at_any_level_is_named(changes, path, key):
    with pytest.raises(ExperimentConfigError, match=rf"^{path}: unknown key\(s\) \['{key}'\]; known: \[.+\]$"):
        load_experiment(_tiny(**changes))


def test_the_error_lists_the_known_keys():
    with pytest.raises(ExperimentConfigError) as e:
        load_experiment(_tiny(optimizer={"nope": 1}))
    assert "'peak_lr'" in str(e.value) and "'trainable'" in str(e.value)  # OptimizerConfig's fields


def test_the_old_ema_keys_say_where_they_moved():
    with pytest.raises(ExperimentConfigError, match=r"config.loss: unknown key\(s\) \['ema_window'\].*"
                                                    r"config.loss.ema_window is now config.ema.window"):
        load_experiment(_tiny(loss={"ema_window": 100.0}))


@pytest.mark.parametrize("changes, match", [
    (dict(total_steps=0), r"^config: TrainConfig.total_steps must be >= 1, got 0"),
    (dict(ema={"decay": 0.9, "window": 10.0}), r"^config.ema: EMAConfig: set decay or window, not both"),
    (dict(mesh={"fsdp": 0}), r"^config.mesh: MeshConfig: axis sizes must be >= 1 or -1"),
    (dict(eval_examples=-1), r"^config: EvalConfig.examples must be >= 0"),
    (dict(model="tiny-nope"), r"^config.model: unknown preset 'tiny-nope'; known: \[.*'tiny'"),
    (dict(data={"seq_len": 0}), r"^config.data: seq_len must be >= 1, got 0"),
    (dict(loss=[1, 2]), r"^config.loss must be a dict of keys, got \[1, 2\]"),
])
def test_a_bad_value_is_named(changes, match):
    with pytest.raises(ExperimentConfigError, match=match):
        load_experiment(_tiny(**changes))


def test_an_unknown_data_or_eval_kind_lists_the_registered_ones():
    assert {"text", "vqa", "chat", "preference"} <= set(registered_kinds())
    with pytest.raises(ExperimentConfigError, match=r"^config.data.kind: unknown kind 'images'; registered: "
                                                    r"\['chat', 'preference', 'text', 'vqa'\]"):
        load_experiment(_tiny(data={"kind": "images"}))
    with pytest.raises(ExperimentConfigError, match=r"^config.eval_kind: unknown kind 'mmlu'; registered: "
                                                    r"\['chat', 'preference', 'text', 'vqa'\]"):
        load_experiment(_tiny(eval_kind="mmlu"))


def test_vqa_data_on_a_text_model_is_refused():
    with pytest.raises(ExperimentConfigError, match=r"config.data.kind='vqa' needs a VL model .*"
                                                    r"\(config.model='tiny'\)"):
        load_experiment(_tiny(data={"kind": "vqa", "sources": None}))
    with pytest.raises(ExperimentConfigError, match=r"config.data.kind='vqa' needs a VL model"):
        load_experiment(_tiny(eval_kind="vqa"))  # an evaluation kind is checked against the model too


def test_an_evaluation_kind_apart_from_the_data_kind_gets_its_own_data():
    """tiny-vl trained on text, evaluated on the VQA corpus: the eval data is the vqa kind's, at the training
    rows' shapes."""
    from experiments.configs import tiny_vl
    c = tiny_vl.get_config("text").to_dict()
    exp = load_experiment({**c, "eval_kind": "vqa"})
    assert exp.data.kind == "text" and exp.evaluation.kind == exp.eval_data.kind == "vqa"
    assert type(exp.eval_data.train).__name__ == "MultimodalDataConfig"
    assert exp.eval_data.train.seq_len == exp.data.train.seq_len == 128
    assert exp.eval_data.heldout.sources[0].name == "vqa-heldout"


def test_a_registered_kind_serves_pipeline_eval_and_samples(monkeypatch):
    """The launcher's data / evaluation / samples all come from the registry entry the config names."""
    from ernie_jax.data import DataConfig
    from ernie_jax.synthetic.text import default_data_config
    monkeypatch.setattr(data_kinds, "_KINDS", dict(data_kinds._KINDS))
    calls = []
    kind = DataKind(
        name="echo", config_class=lambda: DataConfig,
        data_configs=lambda model, opts: (default_data_config("train", seq_len=opts["seq_len"]), None),
        make_pipeline=lambda cfg, **kw: calls.append(("pipeline", cfg.seq_len, kw)) or iter(()),
        make_eval_fn=lambda cfg, heldout, n: calls.append(("eval", heldout, n)) or (lambda model, step: {}),
        print_samples=lambda model, cfg, n, speculative=None: calls.append(("samples", n, speculative)) or {})
    register_kind(kind)
    with pytest.raises(ValueError, match="'echo' is already registered"):
        register_kind(kind)
    exp = load_experiment(_tiny(data={"kind": "echo", "seq_len": 64}, eval_examples=5, samples=2))
    assert exp.data.kind == exp.evaluation.kind == "echo" and exp.data.heldout is None
    exp.make_pipeline(process_index=1, process_count=2)
    exp.make_eval_fn()
    exp.print_samples(None, speculative="mtp")
    assert calls == [("pipeline", 64, {"process_index": 1, "process_count": 2}), ("eval", None, 5),
                     ("samples", 2, "mtp")]
    assert load_experiment(_tiny(data={"kind": "echo"}, eval_examples=0)).make_eval_fn() is None


def test_a_key_given_twice_on_the_command_line_is_an_error():
    """ml_collections' flag keeps the last of two `--config.key=` silently; the loader refuses them."""
    check_overrides_once(["--config=x.py", "--config.total_steps=1", "--config.loss.mtp_coef=0", "--workdir=d"])
    with pytest.raises(ExperimentConfigError, match=r"^--config.total_steps given more than once"):
        check_overrides_once(["--config.total_steps=1", "--workdir=d", "--config.total_steps=2"])
    with pytest.raises(ExperimentConfigError, match=r"--config given more than once"):
        check_overrides_once(["--config=a.py", "--config=b.py"])


def _train_cli(tmp_path, *overrides):
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "experiments.train", f"--config={TINY}", f"--workdir={workdir}", *overrides]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
                       timeout=300)
    return r, time.perf_counter() - t0, workdir


@pytest.mark.parametrize("overrides, message", [
    (["--config.nonsense=1"], r"config: unknown key\(s\) \['nonsense'\]; known: \["),
    (["--config.loss.ema_decay=0.5"], r"config.loss: unknown key\(s\) \['ema_decay'\].*now config.ema.decay"),
    (["--config.total_steps=3", "--config.total_steps=4"], r"--config.total_steps given more than once"),
])
def test_the_training_cli_refuses_a_bad_config_before_training(tmp_path, overrides, message):
    r, _, workdir = _train_cli(tmp_path, *overrides)
    assert r.returncode != 0
    assert re.search(message, r.stderr), r.stderr[-2000:]
    assert "Traceback" not in r.stderr  # a usage error, not a crash
    assert not workdir.exists()  # nothing trained, no checkpoint, no metrics


def test_the_training_cli_requires_a_workdir():
    r = subprocess.run([sys.executable, "-m", "experiments.train", f"--config={TINY}"], cwd=ROOT,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "--workdir" in r.stderr, r.stderr[-2000:]


def test_post_training_kinds_and_the_dpo_section():
    sft = load_experiment(_tiny(data={"kind": "chat", "sources": []}))
    assert sft.data.train.sources[0].kind == "chat" and sft.eval_data.heldout.sources[0].kind == "chat"
    assert sft.dpo is None and sft.objective == (None, ())
    dpo = load_experiment(_tiny(data={"kind": "preference", "sources": []}, dpo={"beta": 0.2}, init_from="x/hf"))
    assert dpo.dpo.beta == 0.2 and dpo.objective[1] == dpo.dpo.batch_keys
    assert dpo.eval_data.heldout.sources[0].kind == "chat"  # a preference run is evaluated as chat
    with pytest.raises(ExperimentConfigError, match=r"config.dpo is for config.data.kind='preference', not 'chat'"):
        load_experiment(_tiny(data={"kind": "chat", "sources": []}, dpo={"beta": 0.2}))
    with pytest.raises(ExperimentConfigError, match=r"config.dpo.loss='dpo' needs config.init_from"):
        load_experiment(_tiny(data={"kind": "preference", "sources": []}))
    with pytest.raises(ExperimentConfigError, match=r"config.dpo: unknown key\(s\) \['bta'\]"):
        load_experiment(_tiny(data={"kind": "preference", "sources": []}, dpo={"bta": 0.2}, init_from="x"))
    from ernie_jax.synthetic.text import ensure_default_data
    tok = str(ensure_default_data()["tokenizer"])
    simpo = load_experiment(_tiny(data={"kind": "preference", "sources": ["/data/pairs.jsonl"], "tokenizer": tok},
                                  dpo={"loss": "simpo"}))  # no reference: no init_from needed
    assert simpo.data.train.sources[0].kind == "preference" and simpo.data.heldout is None


def test_the_grpo_section_needs_chat_data():
    exp = load_experiment(_tiny(data={"kind": "chat", "sources": []}, grpo={"group_size": 4, "clip_high": 0.3}))
    assert exp.grpo.group_size == 4 and exp.grpo.clip_high == 0.3 and exp.grpo.dynamic_sampling
    with pytest.raises(ExperimentConfigError, match=r"config.grpo needs config.data.kind='chat'.*not 'text'"):
        load_experiment(_tiny(grpo={"group_size": 4}))
    with pytest.raises(ExperimentConfigError, match=r"config.grpo: .*group_size must be >= 2"):
        load_experiment(_tiny(data={"kind": "chat", "sources": []}, grpo={"group_size": 1}))
