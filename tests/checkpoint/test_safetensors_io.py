import ml_dtypes
import numpy as np
import pytest

from ernie_jax.checkpoint.safetensors_io import SafetensorsError, SafetensorsFile, save_file, shard_groups


def test_round_trip_all_dtypes(tmp_path):
    rng = np.random.RandomState(0)
    tensors = {
        "f32": rng.randn(3, 4).astype(np.float32),
        "bf16": rng.randn(5).astype(ml_dtypes.bfloat16),
        "i32": np.arange(6, dtype=np.int32).reshape(2, 3),
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }
    save_file(tensors, str(tmp_path / "a.safetensors"))
    f = SafetensorsFile(str(tmp_path / "a.safetensors"))
    assert sorted(f.keys()) == sorted(tensors)
    for k, v in tensors.items():
        assert f.dtype(k) == v.dtype and f.shape(k) == v.shape
        np.testing.assert_array_equal(f.get(k), v)


def test_readable_by_the_reference_library(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    t = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(2, np.int64)}
    save_file(t, str(tmp_path / "a.safetensors"))
    back = st.load_file(str(tmp_path / "a.safetensors"))
    for k in t:
        np.testing.assert_array_equal(back[k], t[k])
    st.save_file(t, str(tmp_path / "b.safetensors"))
    f = SafetensorsFile(str(tmp_path / "b.safetensors"))
    np.testing.assert_array_equal(f.get("w"), t["w"])


def test_garbage_is_rejected_with_the_path(tmp_path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(SafetensorsError, match="bad.safetensors: not a safetensors file"):
        SafetensorsFile(str(p))
    p.write_bytes(b"\xff" * 16)
    with pytest.raises(SafetensorsError, match="header length"):
        SafetensorsFile(str(p))


def test_shard_groups():
    assert shard_groups([("a", 4), ("b", 4), ("c", 10), ("d", 1)], 8) == [["a", "b"], ["c"], ["d"]]
