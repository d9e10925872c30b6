"""The embedded toy corpora and their tasks, generated deterministically on first use (not part of the core
data pipeline, which takes any data config):

- `text`: arithmetic / algorithmic tasks with checkable answers plus templated text (`data/default/`);
- `vqa`: questions about rendered shapes, for VL models (`data/vqa/`);
- `tasks`: answer accuracy by greedy completion of their held-out prompts, and printed samples.

Import the modules themselves (`from ernie_jax.synthetic import text`): `vqa` needs Pillow, `tasks` JAX.
"""
