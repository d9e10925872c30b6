"""Frame sampling vs transformers' ERNIE-4.5-VL `sample_frames` (and the torch arithmetic it uses)."""

import numpy as np
import pytest

from ernie_jax.processor.frames import sample_frame_indices

CASES = [dict(total=10), dict(total=300), dict(total=1000), dict(total=97, num_frames=16),
         dict(total=4000, num_frames=180), dict(total=333, num_frames=47), dict(total=250, fps=2.0, video_fps=30.0),
         dict(total=9000, fps=1.0, video_fps=29.97), dict(total=50, fps=0.5, video_fps=25.0),
         dict(total=181, fps=3.3, video_fps=24.0)]


def _kwargs(case):
    return {k: v for k, v in case.items() if k != "total"}


@pytest.mark.hf
@pytest.mark.parametrize("case", CASES)
def test_indices_match_torch_arange(case):
    torch = pytest.importorskip("torch")
    got = sample_frame_indices(case["total"], **_kwargs(case))
    n = len(got)
    assert 1 <= n <= 180 and np.all(np.diff(got) > 0) and got[-1] < case["total"]
    # transformers: num_frames = min(max(total / video_fps * fps, 16), 180, total) (a float), then
    # torch.arange(0, total, total / num_frames).int()
    if "num_frames" in case:
        num = case["num_frames"]
    else:
        num = case["total"] / case["video_fps"] * case["fps"] if "fps" in case else case["total"]
        num = min(max(num, 16), 180, case["total"])
    want = torch.arange(0, case["total"], case["total"] / num).int().numpy()
    np.testing.assert_array_equal(got, want)


@pytest.mark.hf
@pytest.mark.parametrize("case", CASES)
def test_indices_match_transformers_sample_frames(case):
    pytest.importorskip("torchvision")  # transformers' video processor imports it at module level
    from transformers.models.ernie4_5_vl_moe.video_processing_ernie4_5_vl_moe import Ernie4_5_VLMoeVideoProcessor
    from transformers.video_utils import VideoMetadata
    meta = VideoMetadata(total_num_frames=case["total"], fps=case.get("video_fps"))
    kw = {k: v for k, v in _kwargs(case).items() if k != "video_fps"}
    want = Ernie4_5_VLMoeVideoProcessor(draw_on_frames=False).sample_frames(meta, **kw).numpy()
    np.testing.assert_array_equal(sample_frame_indices(case["total"], **_kwargs(case)), want)


def test_bad_sampling_raises():
    with pytest.raises(ValueError, match="mutually exclusive"):
        sample_frame_indices(100, num_frames=20, fps=1.0, video_fps=30.0)
    with pytest.raises(ValueError, match=r"num_frames must be in \[min_frames=16, max_frames=180\], got 8"):
        sample_frame_indices(100, num_frames=8)
    with pytest.raises(ValueError, match="pass video_fps"):
        sample_frame_indices(100, fps=2.0)
    with pytest.raises(ValueError, match="cannot sample num_frames=20 out of total_num_frames=10"):
        sample_frame_indices(10, num_frames=20)
    with pytest.raises(ValueError, match="must be positive"):
        sample_frame_indices(0)
