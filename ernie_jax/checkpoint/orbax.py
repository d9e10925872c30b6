"""Training checkpoints with Orbax: train state (model, optimizer, EMA, counters) and the data iterator's
state in one step directory, saved asynchronously every N steps, the last K kept.

Restoring takes the newest step that loads; a step that fails (truncated or corrupt files) is named in a
warning and the previous one is tried. The restore target carries shardings, so a checkpoint written on
one mesh restores onto another (8 -> 4 devices, other rules).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                                 create=True),
        )

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def save(self, step: int, state: Any, data_state: dict | None = None) -> None:
        """Starts saving (async: returns once the arrays are copied off the devices)."""
        args = {"state": ocp.args.StandardSave(state)}
        if data_state is not None:
            args["data"] = ocp.args.JsonSave(data_state)
        self._mngr.save(step, args=ocp.args.Composite(**args), force=True)

    def restore(self, target: Any, *, with_data: bool) -> tuple[int, Any, dict | None] | None:
        """(step, state, data state) of the newest loadable step, or None when there is none.

        target: a pytree like the state (arrays or ShapeDtypeStructs with shardings) to restore into.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        for step in reversed(self.all_steps()):
            args = {"state": ocp.args.StandardRestore(abstract)}
            if with_data:
                args["data"] = ocp.args.JsonRestore()
            try:
                out = self._mngr.restore(step, args=ocp.args.Composite(**args))
            except Exception as e:  # noqa: BLE001  (any failure to read a step: fall back to the previous)
                log.warning("checkpoint step %d in %s cannot be restored (%s: %s); trying the previous one",
                            step, self.directory, type(e).__name__, str(e).splitlines()[0][:300])
                continue
            return step, out["state"], (out["data"] if with_data else None)
        return None

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()
