"""Which frames of a decoded video the ERNIE-4.5-VL video processor keeps (transformers' `sample_frames`).

    sample_frame_indices(total_num_frames, *, num_frames=None, fps=None, video_fps=None,
                         min_frames=16, max_frames=180) -> int64 [n]

Either a fixed `num_frames` (must lie in [min_frames, max_frames]) or a sampling rate `fps` (needs the
video's own `video_fps`: n = total / video_fps * fps, clamped to [min_frames, max_frames] and to the
video's length); with neither, every frame up to `max_frames`. Indices are `arange(0, total, total / n)`
in float32, truncated, as transformers computes them with torch. Decoding is the caller's business.
"""

from __future__ import annotations

import math

import numpy as np


def sample_frame_indices(total_num_frames: int, *, num_frames: int | None = None, fps: float | None = None,
                         video_fps: float | None = None, min_frames: int = 16, max_frames: int = 180) -> np.ndarray:
    """Indices (int64 [n], increasing) of the frames to keep out of `total_num_frames`."""
    if total_num_frames <= 0:
        raise ValueError(f"total_num_frames must be positive, got {total_num_frames}")
    if fps is not None and num_frames is not None:
        raise ValueError("num_frames and fps are mutually exclusive: pass one of them")
    if num_frames is not None:
        if not min_frames <= num_frames <= max_frames:
            raise ValueError(f"num_frames must be in [min_frames={min_frames}, max_frames={max_frames}], "
                             f"got {num_frames}")
        n: float = num_frames
    else:
        if fps is not None and video_fps is None:
            raise ValueError("sampling at fps needs the video's own frame rate: pass video_fps")
        n = total_num_frames / video_fps * fps if fps is not None else total_num_frames
        n = min(max(n, min_frames), max_frames, total_num_frames)
    if n > total_num_frames:
        raise ValueError(f"cannot sample num_frames={n} out of total_num_frames={total_num_frames}")
    step = total_num_frames / n
    count = math.ceil(total_num_frames / step)
    # torch.arange(0, total, step) in float32: values formed in float64, rounded to float32, then .int()
    return (np.arange(count, dtype=np.float64) * step).astype(np.float32).astype(np.int64)
