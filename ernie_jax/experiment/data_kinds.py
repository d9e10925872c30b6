"""The registry of experiment data kinds: what `config.data.kind` (and the evaluation kind) name.

A kind says how to build the train / held-out data configs of a model from the `data` section's options,
the pipeline over them, the held-out evaluation and the sample printer, so that no launcher, data or
evaluation code forks on the kind's name. Built in:

- `text`: the embedded text corpus (`ernie_jax.synthetic.text`), or the user's `sources` (no held-out split);
- `vqa`: the embedded VQA corpus (`ernie_jax.synthetic.vqa`), VL models only;
- `chat`: SFT conversations (`ernie_jax.posttrain.chat_pipeline`), the embedded tasks as chat by default;
- `preference`: DPO pairs (`ernie_jax.posttrain.preference_pipeline`), evaluated as `chat`.

`register_kind(DataKind(...))` adds one (e.g. a post-training experiment's).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

from ernie_jax.config import ErnieConfig


class ExperimentConfigError(ValueError):
    """An experiment config that cannot run: an unknown key or kind, a bad value, data the model cannot take.
    The message names the key (`config.section.key`)."""


@dataclasses.dataclass(frozen=True)
class DataKind:
    """One kind of experiment data.

    config_class: () -> the data config dataclass; its fields are the `data` section's keys (besides `kind`).
    data_configs: (model config, options) -> (train data config, held-out data config or None).
    make_pipeline: (data config, *, process_index, process_count) -> the batch iterator.
    make_eval_fn: (data config, held-out data config or None, n_examples) -> eval_fn(model, step) -> metrics.
    print_samples: (model, data config, n, speculative=None) -> the decoding counters.
    """

    name: str
    config_class: Callable[[], type]
    data_configs: Callable[[ErnieConfig, dict[str, Any]], tuple[Any, Any]]
    make_pipeline: Callable[..., Iterator[dict]]
    make_eval_fn: Callable[[Any, Any, int], Callable]
    print_samples: Callable[..., dict]


_KINDS: dict[str, DataKind] = {}


def register_kind(kind: DataKind) -> DataKind:
    """Adds `kind` to the registry; a name registered twice is an error."""
    if kind.name in _KINDS:
        raise ValueError(f"data kind {kind.name!r} is already registered")
    _KINDS[kind.name] = kind
    return kind


def registered_kinds() -> tuple[str, ...]:
    return tuple(sorted(_KINDS))


def get_kind(name: str, where: str = "config.data.kind") -> DataKind:
    """The registered kind `name`; an unknown one is an error naming `where` and the registered kinds."""
    if name not in _KINDS:
        raise ExperimentConfigError(f"{where}: unknown kind {name!r}; registered: {list(registered_kinds())}")
    return _KINDS[name]


def check_data_fits_model(model: ErnieConfig, data_cfg: Any) -> None:
    """Refuses at start a model that cannot take its data (such a run would train into NaNs or index past its
    tables): token ids past the model's vocabulary (naming the tokenizer), rows longer than its positions,
    and VL special token ids that differ between the model and the data."""
    from ernie_jax.data.tokenizer import SentencePieceTokenizer  # noqa: PLC0415

    pieces = SentencePieceTokenizer(data_cfg.tokenizer).vocab_size if data_cfg.tokenizer else None
    vocab = data_cfg.vocab_size or pieces
    source = f"the tokenizer {data_cfg.tokenizer} has {pieces} pieces" if pieces else f"data vocab_size={vocab}"
    if vocab is not None and vocab > model.vocab_size:
        raise ExperimentConfigError(
            f"the data's token ids reach {vocab - 1} ({source}) but the model's vocab_size is {model.vocab_size}: "
            f"use a model with vocab_size >= {vocab} (config.model_overrides.vocab_size) or a smaller tokenizer")
    if data_cfg.pad_id >= model.vocab_size:
        raise ExperimentConfigError(f"config.data.pad_id={data_cfg.pad_id} is outside the model's vocab_size "
                                    f"{model.vocab_size}")
    if data_cfg.seq_len > model.max_position_embeddings:
        raise ExperimentConfigError(f"config.data.seq_len={data_cfg.seq_len} exceeds the model's "
                                    f"max_position_embeddings={model.max_position_embeddings}")
    special = getattr(data_cfg, "special", None)  # VL data: the six image / video token ids
    if special is not None:
        from ernie_jax.processor.prompt import SpecialTokens  # noqa: PLC0415
        want = SpecialTokens.from_config(model)
        for f in dataclasses.fields(special):
            if getattr(special, f.name) != getattr(want, f.name):
                raise ExperimentConfigError(f"config.data.special.{f.name}={getattr(special, f.name)} but the "
                                            f"model's is {getattr(want, f.name)}")


# -- the built-in kinds (their modules imported on use: `vqa` needs Pillow, the tasks JAX) -------------------
def _text_config_class() -> type:
    from ernie_jax.data import DataConfig  # noqa: PLC0415
    return DataConfig


def _text_configs(model: ErnieConfig, options: dict[str, Any]) -> tuple[Any, Any]:
    from ernie_jax.data import DataConfig  # noqa: PLC0415
    from ernie_jax.synthetic.text import default_data_config  # noqa: PLC0415
    del model
    if options.get("sources"):  # the user's corpus: no held-out split
        return DataConfig.from_dict(options), None
    options = {k: v for k, v in options.items() if k != "sources"}
    return default_data_config("train", **options), default_data_config("heldout", **options)


def _vqa_config_class() -> type:
    from ernie_jax.data import MultimodalDataConfig  # noqa: PLC0415
    return MultimodalDataConfig


def _vqa_configs(model: ErnieConfig, options: dict[str, Any]) -> tuple[Any, Any]:
    from ernie_jax.synthetic.vqa import vqa_data_config  # noqa: PLC0415
    if model.vision is None:
        raise ExperimentConfigError("config.data.kind='vqa' needs a VL model (a config with `vision`); "
                                    "this model has none")
    return vqa_data_config(model, "train", **options), vqa_data_config(model, "heldout", **options)


def _text_pipeline(data_cfg, **kw):
    from ernie_jax.data import make_pipeline  # noqa: PLC0415
    return make_pipeline(data_cfg, **kw)


def _vqa_pipeline(data_cfg, **kw):
    from ernie_jax.data import make_multimodal_pipeline  # noqa: PLC0415
    return make_multimodal_pipeline(data_cfg, **kw)


def _text_eval_fn(data_cfg, heldout_cfg, n_examples):
    from ernie_jax.synthetic.tasks import make_eval_fn  # noqa: PLC0415
    return make_eval_fn(data_cfg, heldout_cfg, n_examples)


def _vqa_eval_fn(data_cfg, heldout_cfg, n_examples):
    from ernie_jax.synthetic.tasks import make_vqa_eval_fn  # noqa: PLC0415
    return make_vqa_eval_fn(data_cfg, heldout_cfg, n_examples)


def _text_samples(model, data_cfg, n, speculative=None):
    from ernie_jax.synthetic.tasks import print_samples  # noqa: PLC0415
    return print_samples(model, data_cfg, n, speculative=speculative)


def _vqa_samples(model, data_cfg, n, speculative=None):
    from ernie_jax.synthetic.tasks import print_vqa_samples  # noqa: PLC0415
    return print_vqa_samples(model, data_cfg, n, speculative=speculative)


def _post_configs(kind: str):
    """`chat` / `preference` data configs: the user's `sources` (their kind set; no held-out split), or the
    embedded tasks' sets (`synthetic.chat_tasks`); a preference run is evaluated on the chat held-out set."""
    def configs(model: ErnieConfig, options: dict[str, Any]) -> tuple[Any, Any]:
        from ernie_jax.data import DataConfig  # noqa: PLC0415
        from ernie_jax.synthetic import chat_tasks  # noqa: PLC0415
        del model
        if options.get("sources"):
            srcs = [{"path": s, "kind": kind} if isinstance(s, str) else {"kind": kind, **s}
                    for s in options["sources"]]
            return DataConfig.from_dict(dict(options, sources=srcs)), None
        options = {k: v for k, v in options.items() if k != "sources"}
        train = (chat_tasks.chat_data_config if kind == "chat" else chat_tasks.preference_data_config)("train",
                                                                                                      **options)
        return train, chat_tasks.chat_data_config("heldout", **options)
    return configs


def _chat_pipeline(data_cfg, **kw):
    from ernie_jax.posttrain.chat_pipeline import make_chat_pipeline  # noqa: PLC0415
    return make_chat_pipeline(data_cfg, **kw)


def _preference_pipeline(data_cfg, **kw):
    from ernie_jax.posttrain.preference_pipeline import make_preference_pipeline  # noqa: PLC0415
    return make_preference_pipeline(data_cfg, **kw)


def _chat_eval_fn(data_cfg, heldout_cfg, n_examples):
    from ernie_jax.synthetic.tasks import make_chat_eval_fn  # noqa: PLC0415
    return make_chat_eval_fn(data_cfg, heldout_cfg, n_examples)


def _chat_samples(model, data_cfg, n, speculative=None):
    from ernie_jax.synthetic.tasks import print_chat_samples  # noqa: PLC0415
    return print_chat_samples(model, data_cfg, n, speculative=speculative)


register_kind(DataKind("text", _text_config_class, _text_configs, _text_pipeline, _text_eval_fn, _text_samples))
register_kind(DataKind("vqa", _vqa_config_class, _vqa_configs, _vqa_pipeline, _vqa_eval_fn, _vqa_samples))
register_kind(DataKind("chat", _text_config_class, _post_configs("chat"), _chat_pipeline, _chat_eval_fn,
                       _chat_samples))
register_kind(DataKind("preference", _text_config_class, _post_configs("preference"), _preference_pipeline,
                       _chat_eval_fn, _chat_samples))
