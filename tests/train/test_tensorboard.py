import math
import struct
import subprocess
import sys

import pytest

from ernie_jax.train.tensorboard import EventWriter, clean_tag, encode_event, masked_crc32c


def _records(path):
    data, out, i = open(path, "rb").read(), [], 0
    while i < len(data):
        header = data[i:i + 8]
        (n,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[i + 8:i + 12])[0] == masked_crc32c(header)
        body = data[i + 12:i + 12 + n]
        assert struct.unpack("<I", data[i + 12 + n:i + 16 + n])[0] == masked_crc32c(body)
        out.append(body)
        i += 16 + n
    return out


def test_crc32c_known_value():
    assert masked_crc32c(b"") == 0xA282EAD8  # crc32c("") = 0
    # crc32c("123456789") = 0xE3069283 (the Castagnoli check value), masked:
    x = 0xE3069283
    assert masked_crc32c(b"123456789") == ((((x >> 15) | (x << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def test_events_are_byte_identical_to_tensorboardx():
    tbx = pytest.importorskip("tensorboardX")
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c as tbx_crc
    from tensorboardX.summary import scalar

    for data in (b"", b"abc", bytes(range(256)) * 3):
        assert masked_crc32c(data) == tbx_crc(data)
    assert encode_event(1234.5, file_version="brain.Event:2") == event_pb2.Event(
        wall_time=1234.5, file_version="brain.Event:2").SerializeToString()
    for step in (0, 1, 300, 2**40):
        for tag, value in (("loss", 2.5), ("grad/norm", 0.0), ("lr", -1e-3), ("tok/s", float("nan"))):
            ref = event_pb2.Event(wall_time=99.25, step=step, summary=scalar(tag, value)).SerializeToString()
            assert encode_event(99.25, step, scalars={tag: value}) == ref
    assert clean_tag("/a b:c") == "a_b_c" and tbx.summary._clean_tag("/a b:c") == "a_b_c"


def test_writer_file(tmp_path):
    w = EventWriter(str(tmp_path))
    w.scalars(3, {"loss": 1.5, "lr": 0.25})
    w.scalars(4, {"loss": 1.25})
    w.close()
    assert w.path.startswith(str(tmp_path / "events.out.tfevents."))
    recs = _records(w.path)
    assert len(recs) == 4 and b"brain.Event:2" in recs[0]
    assert recs[1].endswith(b"loss" + b"\x15" + struct.pack("<f", 1.5)) and b"\x10\x03" in recs[1]
    assert recs[3].endswith(struct.pack("<f", 1.25)) and b"\x10\x04" in recs[3]
    assert not math.isnan(struct.unpack("<d", recs[1][1:9])[0])


def test_metrics_writer_writes_events_without_torch(tmp_path):
    code = ("import sys; from ernie_jax.train.loop import MetricsWriter; "
            f"w = MetricsWriter({str(tmp_path)!r}); w.write(1, {{'loss': 2.0}}); w.close(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    (path,) = (tmp_path / "tensorboard").iterdir()
    recs = _records(str(path))
    assert len(recs) == 2 and recs[1].endswith(b"loss" + b"\x15" + struct.pack("<f", 2.0))
