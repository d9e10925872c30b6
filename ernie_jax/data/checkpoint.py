"""Orbax checkpointing of the pipeline iterator that also restores under a different process count.

Grain's `CheckpointHandler` writes `process_{i}-of-{n}.json` (the iterator's `get_state()`) and restores
only from the file with the *same* i and n. A `PipelineIterator` state is global (identical on every
process and valid for any process count), so `PipelineCheckpointHandler` restores from
`process_{i}-of-{n}.json` when it exists and otherwise from the saved `process_0-of-{m}.json`:

    mngr.save(step, args=ocp.args.Composite(state=..., data_iter=PipelineCheckpointSave(it)))
    mngr.restore(step, args=ocp.args.Composite(state=..., data_iter=PipelineCheckpointRestore(fresh_it)))

Plain `grain.checkpoint.CheckpointSave/Restore` also work (same files), but only at the same process count.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import orbax.checkpoint as ocp
from grain._src.core import sharding
from grain.checkpoint import CheckpointHandler

from ernie_jax.data.pipeline import PipelineIterator

_NAME = re.compile(r"process_(\d+)-of-(\d+)\.json$")


class PipelineCheckpointHandler(CheckpointHandler):
    def restore(self, directory, item: Any = None, args: Any = None):
        item = item or args.item
        from ernie_jax.data.multimodal import MultimodalPipelineIterator  # noqa: PLC0415
        if not isinstance(item, (PipelineIterator, MultimodalPipelineIterator)):
            return super().restore(directory, item=item, args=args)
        pi, pc = sharding.get_process_index_and_count()
        path = directory / f"process_{pi}-of-{pc}.json"
        if not path.exists():
            saved = sorted((int(m.group(2)), int(m.group(1)), p) for p in directory.iterdir()
                           if (m := _NAME.search(p.name)))
            zero = [p for n, i, p in saved if i == 0]
            if not zero:
                raise ValueError(f"{directory}: no process_0-of-N.json data pipeline state")
            path = zero[0]
        item.set_state(json.loads(path.read_text()))
        item.start_prefetch()
        return item


@ocp.args.register_with_handler(PipelineCheckpointHandler, for_save=True)
@dataclasses.dataclass
class PipelineCheckpointSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(PipelineCheckpointHandler, for_restore=True)
@dataclasses.dataclass
class PipelineCheckpointRestore(ocp.args.CheckpointArgs):
    item: Any
