"""The RL loop with verifiable rewards: rollouts from the inference engine, rewards, GRPO / DAPO updates.

One step: draw `prompts_per_step` prompts, answer each `group_size` times with the `Engine` (continuous
batching, sampled at `temperature`, every answer its own seed) from the policy's *current* weights (the train
state's arrays, merged into the module: no copy through the host); score the answers (`reward_fn`, plus the
overlong penalty); with dynamic sampling keep only the groups whose rewards differ and draw more prompts until
the batch is full (at most `max_sampling_rounds` draws); normalise the rewards per group into advantages;
pack prompt + answer rows; score them once with the rollout weights (`old_logp`, and the frozen reference's
`ref_logp` when `kl_coef` > 0); then `updates_per_batch` optimizer steps of the GRPO objective on them. Runs
build and resume like pre-training (`train.loop.start_run`: Orbax checkpoints, the prompt cursor saved with
the state, SIGTERM); metrics.jsonl / TensorBoard get the rewards per source, the fraction of groups filtered,
answer lengths, KL, entropy, rollouts so far, and the held-out evaluation every `eval_every_steps`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from ernie_jax.inference.engine import Engine
from ernie_jax.inference.sampling import SamplingParams
from ernie_jax.posttrain.grpo import (EXTRA_KEYS, GRPOConfig, group_advantages, grpo_objective, informative_groups,
                                     overlong_penalty, pack_rollouts, token_logps)
from ernie_jax.sharding import activate
from ernie_jax.train.loop import (MetricsWriter, StopRequest, TrainConfig, TrainingAborted, evaluate, global_batch,
                                  start_run, state_model)
from ernie_jax.train.step import make_train_step

log = logging.getLogger(__name__)

# reward_fn(examples, responses) -> (rewards [N] float32, metrics): the verifiable reward of each answer
RewardFn = Callable[[Sequence[dict], Sequence[str]], tuple[np.ndarray, dict]]


@dataclasses.dataclass(frozen=True)
class Rollouts:
    """The answers to a list of prompts: ids without the prompt (eos kept when it stopped), decoded text."""

    answers: list[list[int]]
    texts: list[str]
    seconds: float


def rollout(model: nnx.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float,
            seeds: Sequence[int], eos: int, decode: Callable[[list[int]], str], max_slots: int | None = None
            ) -> Rollouts:
    """Samples one answer per prompt through the `Engine` (all prompts in flight at once, or `max_slots`)."""
    t0 = time.perf_counter()
    longest = max(len(p) for p in prompts) + max_new_tokens
    engine = Engine(model, max_slots=max_slots or len(prompts), max_len=-(-longest // 64) * 64)
    ids = [engine.submit(list(p), max_new_tokens=max_new_tokens, eos_token_id=eos,
                         sampling=SamplingParams(temperature=temperature, seed=int(s)))
           for p, s in zip(prompts, seeds)]
    out = engine.run()
    answers = [list(out[i]) for i in ids]
    texts = [decode([t for t in a if t != eos]) for a in answers]
    return Rollouts(answers, texts, time.perf_counter() - t0)


def chat_prompts(data_cfg) -> list[dict]:
    """The RL prompts of a chat data config's sources: each conversation's turns but the last as the prompt and
    its last (assistant) turn as the reference answer the verifier checks: records {task, messages, answer}."""
    from ernie_jax.data.sources import decode_record, open_source  # noqa: PLC0415
    from ernie_jax.posttrain.chat import ChatFormatError, validate  # noqa: PLC0415
    out = []
    for scfg in data_cfg.sources:
        src = open_source(scfg)
        for r in range(len(src)):
            messages = decode_record(src[r], scfg, r)
            try:
                validate(messages, index=r)
            except ChatFormatError as e:
                raise ValueError(f"{scfg.path}: {e}") from None
            out.append({"task": scfg.display_name, "messages": messages[:-1], "answer": messages[-1]["content"]})
    return out


def exact_answer_rewards() -> RewardFn:
    """The reward of the embedded tasks: 1 for an answer that is the reference answer, else 0
    (`synthetic.chat_tasks.check_response` through a `RewardSystem`, which counts failures per source)."""
    from ernie_jax.reward import RewardSystem, exact_answer_source  # noqa: PLC0415
    system = RewardSystem([exact_answer_source()])

    def reward_fn(examples, texts):
        out = system(examples, texts)
        return out.raw["exact_answer"], out.metrics()
    return reward_fn


class PromptCursor:
    """Endless deterministic pass over `examples` (a permutation per epoch from `seed`); its state is the number
    of prompts drawn, saved with each checkpoint."""

    def __init__(self, examples: Sequence[dict], seed: int):
        if not examples:
            raise ValueError("the RL prompt set is empty")
        self.examples, self.seed, self.drawn = list(examples), seed, 0

    def take(self, n: int) -> list[dict]:
        out = []
        for _ in range(n):
            epoch, i = divmod(self.drawn, len(self.examples))
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
            out.append(self.examples[order[i]])
            self.drawn += 1
        return out

    def get_state(self) -> dict:
        return {"kind": "rl_prompts", "drawn": self.drawn, "seed": self.seed, "size": len(self.examples)}

    def set_state(self, state: dict) -> None:
        if state.get("kind") != "rl_prompts" or state.get("size") != len(self.examples) \
                or state.get("seed") != self.seed:
            raise ValueError(f"the saved prompt state {state!r:.200} belongs to another prompt set (size "
                             f"{len(self.examples)}, seed {self.seed})")
        self.drawn = int(state["drawn"])


def train_grpo(cfg: TrainConfig, grpo: GRPOConfig, workdir: str, prompts: Sequence[dict], reward_fn: RewardFn,
               tokenizer, *, encode: Callable[[dict], Sequence[int]], eval_fn=None, eval_every_steps: int = 0,
               progress: bool = True) -> dict[str, Any]:
    """RL with verifiable rewards on `prompts` (records; `encode(record)` gives a prompt's ids) until
    cfg.total_steps optimizer steps; resumes from workdir. Returns the summary of `train.loop.train`, plus
    `rollouts` (answers sampled in all)."""
    run = start_run(cfg, workdir)
    mesh, rules, model, state = run.mesh, run.rules, run.model, run.state
    cursor = PromptCursor(prompts, cfg.seed)
    rollouts_total = 0
    if run.data_state is not None:
        cursor.set_state(run.data_state["prompts"])
        rollouts_total = int(run.data_state["rollouts"])
    ref_state = None
    if grpo.kl_coef:  # the frozen reference: the weights the run started from (also after a resume)
        if not cfg.init_from:
            raise ValueError("GRPOConfig.kl_coef > 0 needs TrainConfig.init_from: the reference model's weights")
        from ernie_jax.checkpoint.hf import from_pretrained  # noqa: PLC0415
        ref_state = nnx.state(from_pretrained(cfg.init_from, config=cfg.model, mesh=mesh, rules=rules))

    max_prompt = max(len(encode(p)) for p in prompts)
    per_sample = max_prompt + grpo.max_new_tokens
    seq_len = -(-4 * per_sample // 16) * 16  # four answers per row at most
    n_rollouts = grpo.prompts_per_step * grpo.group_size
    rows = -(-n_rollouts // (seq_len // per_sample))
    rows = -(-rows // cfg.micro_batches) * cfg.micro_batches
    state_shardings = jax.tree.map(lambda a: a.sharding, state)
    with activate(mesh, rules):
        step_fn = jax.jit(make_train_step(model, run.tx, run.schedule, cfg.loss, ema_cfg=cfg.ema,
                                          objective=grpo_objective(grpo), batch_keys=EXTRA_KEYS),
                          donate_argnums=0, out_shardings=(state_shardings, None))
    graphdef = nnx.graphdef(model)
    score = jax.jit(lambda st, b: token_logps(nnx.merge(graphdef, st), b)[0])

    writer = MetricsWriter(workdir)
    bar = tqdm(total=cfg.total_steps, initial=int(state.step), desc="grpo", unit="step", disable=not progress,
               dynamic_ncols=True)
    metrics: dict[str, float] = {}
    summary: dict[str, Any] = {"stopped_early": False}
    eos = tokenizer.eos_id
    no_signal = 0  # steps in a row without an informative group
    with StopRequest() as stop:
        step = int(state.step)
        while step < cfg.total_steps:
            t0 = time.perf_counter()
            policy = state_model(model, state)
            kept_ex, kept_ans, kept_rew, m_rew = [], [], [], []
            drawn_groups = kept_groups = 0
            gen_s, lengths, truncated = 0.0, [], 0
            for _ in range(grpo.max_sampling_rounds):
                need = grpo.prompts_per_step - len(kept_ex)
                batch = cursor.take(need)
                ex = [e for e in batch for _ in range(grpo.group_size)]
                ids = [encode(e) for e in ex]
                seeds = [(cfg.seed * 1_000_003 + rollouts_total + i) % 2**31 for i in range(len(ex))]
                ro = rollout(policy, ids, max_new_tokens=grpo.max_new_tokens, temperature=grpo.temperature,
                             seeds=seeds, eos=eos, decode=tokenizer.decode)
                rollouts_total += len(ex)
                gen_s += ro.seconds
                rewards, rm = reward_fn(ex, ro.texts)
                n_tok = np.asarray([len(a) for a in ro.answers])
                lengths += n_tok.tolist()
                truncated += int(sum(1 for a in ro.answers if not a or a[-1] != eos))
                rewards = np.asarray(rewards, np.float32) + overlong_penalty(n_tok, grpo)
                m_rew.append(rm)
                groups = rewards.reshape(need, grpo.group_size)
                keep = informative_groups(groups) if grpo.dynamic_sampling else np.ones(need, bool)
                drawn_groups += need
                kept_groups += int(keep.sum())
                for g in np.flatnonzero(keep):
                    sl = slice(g * grpo.group_size, (g + 1) * grpo.group_size)
                    kept_ex.append(ids[sl])
                    kept_ans.append(ro.answers[sl])
                    kept_rew.append(groups[g])
                if len(kept_ex) >= grpo.prompts_per_step or not grpo.dynamic_sampling:
                    break
            m = {"rollouts": float(rollouts_total), "filtered_fraction": 1 - kept_groups / drawn_groups,
                 "answer_length": float(np.mean(lengths)), "truncated_fraction": truncated / len(lengths),
                 "rollout_s": gen_s, "samples_per_s": len(lengths) / gen_s}
            for k in m_rew[0]:
                m[k] = float(np.mean([r[k] for r in m_rew]))
            if kept_ex:
                no_signal = 0
                adv = group_advantages(np.stack(kept_rew), grpo.adv_eps)
                b = pack_rollouts([p for g in kept_ex for p in g], [a for g in kept_ans for a in g],
                                  adv.reshape(-1).tolist(), rows=rows, seq_len=seq_len, pad_id=cfg.model.pad_token_id)
                jb = {k: jnp.asarray(v) for k, v in b.items()}
                b["old_logp"] = np.asarray(score(nnx.state(policy), jb))
                b["ref_logp"] = np.asarray(score(ref_state, jb)) if ref_state is not None else b["old_logp"]
                for _ in range(grpo.updates_per_batch):
                    if step >= cfg.total_steps:
                        break
                    with activate(mesh, rules):
                        state, sm = step_fn(state, global_batch(b, mesh, rules, cfg.micro_batches, EXTRA_KEYS))
                    step = int(state.step)
                    bar.update(1)
                m.update({k: float(v) for k, v in jax.device_get(sm).items()})
            else:  # every group uniform after every draw: nothing to learn from this step's prompts
                no_signal += 1
                log.warning("step %d: every sampled group had equal rewards (%d times in a row); drawing new prompts",
                            step, no_signal)
                if no_signal >= cfg.max_nonfinite:
                    run.ckpt.close()
                    raise TrainingAborted(
                        f"{no_signal} steps in a row found no group whose answers' rewards differ (every answer right, "
                        f"or every answer wrong, in {grpo.max_sampling_rounds} draws of {grpo.prompts_per_step} "
                        "prompts each): the prompts are too hard or too easy for this policy; change the prompts, "
                        "the temperature or group_size")
            m["step_time_s"] = time.perf_counter() - t0
            metrics = m
            if step % cfg.log_every_steps == 0 or step == cfg.total_steps:
                writer.write(step, m)
                bar.set_postfix(reward=f"{m.get('reward/total_mean', float('nan')):.3f}",
                                kept=f"{1 - m['filtered_fraction']:.2f}")
            if not kept_ex and not stop.requested:
                continue
            if eval_fn is not None and eval_every_steps and step % eval_every_steps == 0:
                writer.write(step, evaluate(eval_fn, model, state, step))
            data_state = {"prompts": cursor.get_state(), "rollouts": rollouts_total}
            if (step % cfg.checkpoint_every_steps == 0 or step >= cfg.total_steps or stop.requested) \
                    and step not in run.ckpt.all_steps():
                run.ckpt.save(step, state, data_state)
            if stop.requested:
                summary["stopped_early"] = True
                break
    bar.close()
    run.ckpt.close()
    writer.close()
    summary.update(step=step, metrics=metrics, model=state_model(model, state), state=state,
                   rollouts=rollouts_total)
    return summary
