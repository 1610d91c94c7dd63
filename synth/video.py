"""Synthetic videos of moving, deforming shapes: test data for the video corpus and a controlled video corpus.

Written with PyAV as lossless H.264 (``qp=0``, one encoder thread, bit-exact muxing) in MP4: what decord or
PyAV decode is exactly the frames' YUV, so no encoder decision can change what training sees, and the same
frames give the same bytes. Each video holds a few bright ellipses on a dark background that drift,
pulse and rotate smoothly, so consecutive frames are correlated as in natural video.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.io import atomic_write


def shape_frames(n_frames: int, height: int, width: int, rng: np.random.Generator, n_shapes: int = 3) -> np.ndarray:
    """(n_frames, height, width, 3) uint8 frames of ``n_shapes`` moving, deforming ellipses."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    t = np.arange(n_frames, dtype=np.float32)[:, None, None]  # (T, 1, 1)
    frames = np.zeros((n_frames, height, width, 3), dtype=np.float32)
    for _ in range(n_shapes):
        cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
        vy, vx = rng.uniform(-1, 1, size=2) * 0.6  # pixels per frame
        ry, rx = rng.uniform(0.08, 0.25) * height, rng.uniform(0.08, 0.25) * width
        pulse, phase, spin = rng.uniform(0.1, 0.3), rng.uniform(0, 2 * np.pi), rng.uniform(-0.05, 0.05)
        colour = rng.uniform(0.3, 1.0, size=3)
        y = (yy - (cy + vy * t)) / (ry * (1 + pulse * np.sin(0.2 * t + phase)))  # (T, H, W)
        x = (xx - (cx + vx * t)) / (rx * (1 - pulse * np.sin(0.2 * t + phase)))
        angle = spin * t
        u, v = y * np.cos(angle) - x * np.sin(angle), y * np.sin(angle) + x * np.cos(angle)
        inside = 1.0 / (1.0 + np.exp(np.minimum((u**2 + v**2 - 1.0) * 8.0, 60.0)))  # soft-edged ellipse, (T, H, W)
        frames += inside[..., None] * colour
    return (np.clip(frames, 0, 1) * 255).astype(np.uint8)


def write_video(path: str | Path, frames: np.ndarray, fps: int = 25) -> Path:
    """Write (T, H, W, 3) uint8 ``frames`` as lossless H.264 MP4 (H and W even), atomically."""
    import av  # PyAV: only writing videos needs it

    path = Path(path)
    with atomic_write(path) as tmp:
        # bitexact: no muxer version string or timestamps that differ between builds and runs
        with av.open(str(tmp), mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
            stream = container.add_stream("libx264", rate=fps, options={"qp": "0", "threads": "1"})
            stream.height, stream.width = frames.shape[1], frames.shape[2]
            stream.pix_fmt = "yuv420p"
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())  # flush the encoder
    return path


def write_synthetic_videos(
    folder: str | Path, count: int, n_frames: int = 48, height: int = 64, width: int = 64, seed: int = 0
) -> list[Path]:
    """``count`` synthetic videos ``video_000.mp4`` … in ``folder``; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    return [
        write_video(folder / f"video_{i:03d}.mp4", shape_frames(n_frames, height, width, rng)) for i in range(count)
    ]
