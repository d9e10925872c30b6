"""safetensors reading / writing, checked against the format itself: the test parses and writes the bytes by
hand (8-byte little-endian header length, JSON header {name: {dtype, shape, data_offsets}}, raw data)."""

import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest

from ernie_jax.checkpoint.safetensors_io import SafetensorsError, SafetensorsFile, save_file, shard_groups

_CODES = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "I32": np.int32, "I64": np.int64, "BOOL": np.bool_,
          "F16": np.float16}


def _parse(path):
    """(metadata, {name: array}) of a safetensors file, by hand."""
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", None)
    out = {}
    for k, h in header.items():
        b, e = h["data_offsets"]
        out[k] = np.frombuffer(raw[8 + n + b:8 + n + e], np.dtype(_CODES[h["dtype"]]).newbyteorder("<")
                               ).reshape(h["shape"])
    return meta, out


def _write(path, tensors):
    """A safetensors file written by hand (keys in the given order, no metadata)."""
    names = {np.dtype(v): k for k, v in _CODES.items()}
    header, offset, data = {}, 0, b""
    for k, a in tensors.items():
        header[k] = {"dtype": names[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        data += a.tobytes()
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    open(path, "wb").write(struct.pack("<Q", len(h)) + h + data)


def _tensors():
    rng = np.random.RandomState(0)
    return {
        "f32": rng.randn(3, 4).astype(np.float32),
        "bf16": rng.randn(5, 2).astype(ml_dtypes.bfloat16),
        "i32": np.arange(6, dtype=np.int32).reshape(2, 3),
        "i64": np.array([-1, 2**40], np.int64),
        "mask": np.array([True, False, True]),
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }


def test_written_bytes_follow_the_format(tmp_path):
    t = _tensors()
    t["transposed"] = np.arange(12, dtype=np.float32).reshape(3, 4).T  # not C-contiguous
    save_file(t, tmp_path / "a.safetensors")
    meta, back = _parse(tmp_path / "a.safetensors")
    assert meta == {"format": "pt"}  # transformers refuses files without it
    assert sorted(back) == sorted(t)
    for k, v in t.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    # bf16 bit for bit
    np.testing.assert_array_equal(back["bf16"].view(np.uint16), t["bf16"].view(np.uint16))


def test_reads_a_hand_written_file_lazily_by_key(tmp_path):
    t = _tensors()
    _write(tmp_path / "a.safetensors", t)
    f = SafetensorsFile(tmp_path / "a.safetensors")
    assert sorted(f.keys()) == sorted(t)
    assert f.metadata == {}
    for k, v in t.items():
        assert f.shape(k) == v.shape, k
        got = f.get(k)
        assert got.dtype == v.dtype, k
        np.testing.assert_array_equal(got, v, err_msg=k)
    np.testing.assert_array_equal(f.get("bf16").view(np.uint16), t["bf16"].view(np.uint16))


def test_metadata_round_trips(tmp_path):
    save_file({"w": np.ones(2, np.float32)}, tmp_path / "a.safetensors", metadata={"format": "np", "step": "7"})
    assert _parse(tmp_path / "a.safetensors")[0] == {"format": "np", "step": "7"}
    assert SafetensorsFile(tmp_path / "a.safetensors").metadata == {"format": "np", "step": "7"}


def test_file_mode_follows_the_umask(tmp_path):
    """As a plain open() would: a checkpoint others on the machine can read (not a temporary file's 0600)."""
    old = os.umask(0o022)
    try:
        save_file({"w": np.ones(2, np.float32)}, tmp_path / "a.safetensors")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "a.safetensors").st_mode & 0o777 == 0o644


def test_garbage_and_missing_files_are_named(tmp_path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(SafetensorsError, match="bad.safetensors: not a readable safetensors file"):
        SafetensorsFile(p)
    p.write_bytes(b"\xff" * 16)  # header length past the end of the file
    with pytest.raises(SafetensorsError, match="bad.safetensors: not a readable safetensors file"):
        SafetensorsFile(p)
    with pytest.raises(SafetensorsError, match="nowhere.safetensors: not a readable"):
        SafetensorsFile(tmp_path / "nowhere.safetensors")


def test_truncated_file_is_rejected(tmp_path):
    save_file({"w": np.ones((4, 4), np.float32)}, tmp_path / "a.safetensors")
    raw = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "a.safetensors").write_bytes(raw[:-8])
    with pytest.raises(SafetensorsError, match="a.safetensors: not a readable safetensors file"):
        SafetensorsFile(tmp_path / "a.safetensors")


def test_unknown_key_is_named_with_the_file(tmp_path):
    save_file({"w": np.ones(2, np.float32)}, tmp_path / "a.safetensors")
    f = SafetensorsFile(tmp_path / "a.safetensors")
    with pytest.raises(SafetensorsError, match=r"a.safetensors: no tensor 'v'"):
        f.get("v")
    with pytest.raises(SafetensorsError, match=r"a.safetensors: no tensor 'v'"):
        f.shape("v")


def test_unstorable_dtype_names_the_tensor_and_leaves_the_old_file(tmp_path):
    p = tmp_path / "a.safetensors"
    save_file({"w": np.ones(2, np.float32)}, p)
    before = p.read_bytes()
    with pytest.raises(SafetensorsError, match=r"a.safetensors: cannot store tensor 'names'"):
        save_file({"w": np.zeros(2, np.float32), "names": np.array(["a", "b"])}, p)
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.safetensors"]


def test_shard_groups():
    assert shard_groups([("a", 4), ("b", 4), ("c", 10), ("d", 1)], 8) == [["a", "b"], ["c"], ["d"]]
