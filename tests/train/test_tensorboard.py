"""Our event files read back by TensorBoard's own reader (`EventAccumulator`, which checks every record's
CRC): tags, steps and values, each call on disk before the writer closes, and no torch imported."""

import math
import subprocess
import sys

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event

from ernie_jax.train.tensorboard import EventWriter


def _scalars(logdir):
    """tag -> [(step, value)] as TensorBoard shows them."""
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_scalars_read_back_by_tensorboard(tmp_path):
    w = EventWriter(str(tmp_path))
    w.scalars(3, {"loss": 1.5, "lr": 0.25})
    w.scalars(4, {"loss": 1.25, "grad/norm": -1e-3})
    w.scalars(2**40, {"loss": float("nan")})
    w.close()
    got = _scalars(tmp_path)
    assert sorted(got) == ["grad/norm", "loss", "lr"]
    assert got["lr"] == [(3, 0.25)]
    assert got["grad/norm"] == [(4, float(np.float32(-1e-3)))]  # stored as float32
    assert [s for s, _ in got["loss"]] == [3, 4, 2**40]
    assert [v for _, v in got["loss"]][:2] == [1.5, 1.25] and math.isnan(got["loss"][2][1])


def test_file_starts_with_the_version_event(tmp_path):
    w = EventWriter(str(tmp_path))
    w.scalars(1, {"loss": 2.0})
    w.close()
    (path,) = tmp_path.iterdir()
    assert path.name.startswith("events.out.tfevents.")
    events = [Event.FromString(r) for r in RawEventFileLoader(str(path)).Load()]
    assert events[0].file_version == "brain.Event:2"
    assert len(events) == 2
    assert (events[1].step, [(v.tag, v.simple_value) for v in events[1].summary.value]) == (1, [("loss", 2.0)])


def test_each_call_is_on_disk_when_it_returns(tmp_path):
    """The library's writer is asynchronous (a queue and a thread): every call must still be on disk."""
    w = EventWriter(str(tmp_path))
    w.scalars(1, {"loss": 2.0})
    assert _scalars(tmp_path) == {"loss": [(1, 2.0)]}
    for step in range(2, 200):
        w.scalars(step, {"loss": float(step)})
    assert [s for s, _ in _scalars(tmp_path)["loss"]] == list(range(1, 200))
    w.close()


def test_tags_are_cleaned_as_tensorboardx_does(tmp_path):
    w = EventWriter(str(tmp_path))
    w.scalars(1, {"/a b:c": 1.0, "tok/s": 2.0})
    w.close()
    assert sorted(_scalars(tmp_path)) == ["a_b_c", "tok/s"]


def test_metrics_writer_writes_events_without_torch(tmp_path):
    code = ("import sys; from ernie_jax.train.loop import MetricsWriter; "
            f"w = MetricsWriter({str(tmp_path)!r}); w.write(1, {{'loss': 2.0}}); w.close(); "
            "print('torch' in sys.modules, 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False False"
    assert _scalars(tmp_path / "tensorboard") == {"loss": [(1, 2.0)]}
