"""Video clips as volumes: D frames at a stride, grey-scale, resized to H×W, so time becomes the depth axis.

Read with decord (as VideoMAE does), PyAV where decord is not installed. Decoding runs in DataLoader workers.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.errors import ConfigError, DataError
from pretrain.corpora.stream import file_at

VIDEO_READERS = ("auto", "decord", "pyav")  # auto: decord when installed, PyAV where it is not or fails
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601 grey


def find_videos(paths: Sequence[str | Path], extensions: Sequence[str]) -> list[Path]:
    """Video files among ``paths`` (files, or directories searched recursively), sorted."""
    exts = {e.lower() for e in extensions}
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += [f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in exts]
        elif p.is_file():
            found.append(p)
        else:
            raise DataError(p, "video path does not exist")
    if not found:
        raise DataError(
            None,
            f"no video files ({', '.join(sorted(exts))}) under {', '.join(map(str, paths))}; set data.video.paths",
        )
    return sorted(set(found))


def _resolve_reader(reader: str) -> str:
    if reader not in VIDEO_READERS:
        raise ConfigError(f"data.video.reader must be one of {VIDEO_READERS}, got {reader!r}")
    has_decord = importlib.util.find_spec("decord") is not None
    if reader == "auto":
        return "decord" if has_decord else "pyav"
    if reader == "decord" and not has_decord:
        raise ConfigError("data.video.reader=decord but decord is not installed; use reader=pyav (pip install av)")
    if reader == "pyav" and importlib.util.find_spec("av") is None:
        raise ConfigError("data.video.reader=pyav but PyAV is not installed: pip install av")
    return reader


def _clip_start(path: Path, n_frames: int, need: int, rng: np.random.Generator) -> int:
    if n_frames < need:
        raise DataError(path, f"too short: {n_frames} frames, a clip needs {need}")
    return int(rng.integers(0, n_frames - need + 1))


def read_clip_decord(path: Path, frames: int, stride: int, rng: np.random.Generator) -> np.ndarray:
    """(frames, h, w, 3) uint8 of a random clip at the file's resolution, decoded by decord."""
    import decord  # optional: PyAV decodes where decord is not installed

    try:
        # decord's own width/height scaling returns mis-sized frames for some sizes, so torch resizes instead
        vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        start = _clip_start(path, len(vr), (frames - 1) * stride + 1, rng)
        return vr.get_batch(list(range(start, start + (frames - 1) * stride + 1, stride))).asnumpy()
    except DataError:
        raise
    except Exception as e:  # decord raises its own DECORDError / RuntimeError for broken files
        raise DataError(path, f"cannot be decoded by decord ({type(e).__name__}: {e})") from e


def read_clip_pyav(path: Path, frames: int, stride: int, rng: np.random.Generator) -> np.ndarray:
    """(frames, h, w, 3) uint8 of a random clip at the file's resolution, decoded by PyAV."""
    import av  # loaded only by the workers that decode with PyAV

    need = (frames - 1) * stride + 1
    try:
        with av.open(str(path)) as container:
            video = container.streams.video[0]
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video)]
    except Exception as e:
        raise DataError(path, f"cannot be decoded by PyAV ({type(e).__name__}: {e})") from e
    start = _clip_start(path, len(decoded), need, rng)
    return np.stack(decoded[start : start + need : stride])


class VideoSource:
    """Grey-scale clips ``(1, frames, H, W)`` in [0, 1] from the files under ``paths``."""

    name = "video"

    def __init__(
        self,
        paths: Sequence[str],
        input_size: Sequence[int],
        stride: int = 2,
        reader: str = "auto",
        extensions: Sequence[str] = (".mp4",),
        seed: int = 0,
    ):
        if stride < 1:
            raise ConfigError(f"data.video.stride must be >= 1, got {stride}")
        if not paths:
            raise ConfigError("corpus video needs data.video.paths (video files or directories)")
        self.files = find_videos(paths, extensions)
        self.frames, self.size = int(input_size[0]), (int(input_size[1]), int(input_size[2]))
        self.stride = stride
        self.reader = _resolve_reader(reader)
        self.fallback = reader == "auto" and importlib.util.find_spec("av") is not None
        self.seed = seed

    def read(self, path: Path, rng: np.random.Generator) -> np.ndarray:
        """(D, h, w, 3) uint8; with reader "auto", a file decord fails on is retried with PyAV when installed
        (decord mis-sizes frames whose width is not a multiple of its alignment, e.g. 24 px)."""
        if self.reader == "pyav":
            return read_clip_pyav(path, self.frames, self.stride, rng)
        state = rng.bit_generator.state
        try:
            return read_clip_decord(path, self.frames, self.stride, rng)
        except DataError as e:
            if not self.fallback or "too short" in e.problem:
                raise
            rng.bit_generator.state = state  # the same clip as decord would have taken
            try:
                return read_clip_pyav(path, self.frames, self.stride, rng)
            except DataError as e2:
                raise DataError(path, f"{e.problem}; {e2.problem}") from e2

    def item(self, position: int, rng: np.random.Generator) -> torch.Tensor:
        path = self.files[file_at(position, len(self.files), self.seed)]
        clip = self.read(path, rng)  # (D, h, w, 3) uint8
        grey = torch.from_numpy(clip.astype(np.float32) @ _LUMA / 255.0)  # (D, h, w) in [0, 1]
        grey = F.interpolate(grey[:, None], size=self.size, mode="bilinear", antialias=True, align_corners=False)
        return grey[:, 0].clamp(0, 1)[None].contiguous()  # (1, D, H, W)
