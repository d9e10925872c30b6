"""TensorBoard scalars through the `tensorboard` package's event-file writer (no TensorFlow, no torch).

`tensorboard.summary.writer.event_file_writer.EventFileWriter` is the writer torch's SummaryWriter uses; it
writes `events.out.tfevents.*` in `logdir` (TFRecords of `Event` protos). Not tensorboardX: importing it
imports torch when torch is installed. Tags are cleaned as tensorboardX / torch do (`[^-/\\w.]` -> `_`).
"""

from __future__ import annotations

import re
import time

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

_INVALID_TAG_CHARACTERS = re.compile(r"[^-/\w\.]")


def clean_tag(tag: str) -> str:
    return _INVALID_TAG_CHARACTERS.sub("_", tag).lstrip("/")


class EventWriter:
    """Scalars into a new event file in `logdir`; each `scalars` call is on disk when it returns."""

    def __init__(self, logdir: str):
        self._writer = EventFileWriter(logdir)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=clean_tag(t), simple_value=float(v))
                                             for t, v in values.items()])
        self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
