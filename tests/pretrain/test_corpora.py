"""Corpora: sharding, exact stream resume, bad-item skipping, video decoding (decord and PyAV), NIfTI folders."""

import numpy as np
import pytest
import torch

from common.data import write_nifti
from common.errors import ConfigError, DataError
from pretrain.config import ContrastiveConfig, MedicalConfig
from pretrain.corpora import video
from pretrain.corpora.medical import MedicalSource
from pretrain.corpora.stream import FALLBACK_STRIDE, CorpusStream, StreamPosition, make_loader
from pretrain.corpora.video import VideoSource
from pretrain.views import TwoViews
from synth.video import shape_frames, write_synthetic_videos, write_video


class PositionSource:
    """A volume that encodes its own position; positions divisible by ``bad_every`` are unreadable."""

    name = "positions"

    def __init__(self, bad_every=0):
        self.bad_every = bad_every

    def item(self, position, rng):
        if self.bad_every and position % self.bad_every == 0:
            raise DataError(f"item{position}", "unreadable")
        return torch.full((1, 2, 2, 2), float(position), dtype=torch.float64)  # exact for fallback positions


def positions(batch):
    return batch["image"][:, 0, 0, 0, 0].long().tolist()


def test_ranks_get_disjoint_streams():
    seen = []
    for rank in range(2):
        loader = make_loader(CorpusStream(PositionSource(), 0, rank, 2, batch_size=3), num_workers=2, prefetch_factor=1)
        for _, batch in zip(range(4), loader):
            seen += positions(batch)
    assert len(seen) == len(set(seen)) == 24


def batches(num_workers, n, start=0, rank=1):
    """The first ``n`` batches from batch ``start`` of ``rank`` (of 2) through a DataLoader, and their position."""
    stream = CorpusStream(PositionSource(bad_every=5), 0, rank, 2, batch_size=3, start=start)
    pos = StreamPosition(batches=start)
    out = []
    for _, batch in zip(range(n), make_loader(stream, num_workers=num_workers, prefetch_factor=2)):
        pos.update(batch)
        out.append(positions(batch))
    return out, pos


def test_batches_do_not_depend_on_the_worker_count_and_resume_exactly_with_another():
    reference, _ = batches(num_workers=0, n=7)
    assert batches(num_workers=2, n=7)[0] == batches(num_workers=1, n=7)[0] == reference
    first, pos = batches(num_workers=2, n=3)  # consume 3 batches (the workers prefetched more)
    pos = StreamPosition.from_state(pos.state_dict())
    resumed, _ = batches(num_workers=0, n=4, **pos.stream_kwargs())
    assert first + resumed == reference
    assert batches(num_workers=1, n=4, **pos.stream_kwargs())[0] == reference[3:]
    flat = [p for b in reference for p in b]
    assert all(p % 5 for p in flat)  # unreadable items never reach a batch ...
    assert pos.skipped > 0 and pos.items == 9  # ... but are counted ...
    assert any(p >= FALLBACK_STRIDE for p in flat)  # ... and replaced by their fallback item
    assert [p % FALLBACK_STRIDE for p in reference[0]] == [3, 4, 5]  # batch 0 of rank 1 of 2, batch size 3
    old = {"num_workers": 2, "batches": 3, "items": 6, "skipped": 1, "next_index": {"0": 2, "1": 1}}
    assert StreamPosition.from_state(old) == StreamPosition(batches=3, items=6, skipped=1)  # pre-batch checkpoints


def test_a_corpus_of_only_bad_items_raises_a_clear_error():
    stream = CorpusStream(PositionSource(bad_every=1), 0, max_consecutive_bad=8)
    with pytest.raises(DataError, match="8 items in a row"):
        next(iter(stream))


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    write_synthetic_videos(folder, 2, n_frames=20, height=24, width=32)
    write_video(folder / "short.mp4", shape_frames(3, 24, 32, np.random.default_rng(1)))
    (folder / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    return folder


@pytest.mark.parametrize("reader", ["decord", "pyav"])
def test_video_clips_are_grey_frames_along_depth_and_bad_files_are_data_errors(videos, reader):
    if reader == "decord":
        pytest.importorskip("decord", reason="decord is a dependency on x86-64 Linux only")
    source = VideoSource([str(videos)], [6, 16, 16], stride=3, reader=reader)
    by_name = {p.name: i for i, p in enumerate(source.files)}
    results = {}
    for position in range(len(source.files)):  # epoch 0 visits each file once
        try:
            clip = source.item(position, np.random.default_rng(position))
            assert clip.shape == (1, 6, 16, 16) and clip.dtype == torch.float32
            assert 0 <= clip.min() and clip.max() <= 1 and clip.std() > 0
            results["ok"] = results.get("ok", 0) + 1
        except DataError as e:
            results[e.path.name] = e.problem
    assert results["ok"] == 2 and set(by_name) == {
        "video_000.mp4",
        "video_001.mp4",
        "short.mp4",
        "corrupt.mp4",
    }
    assert "too short" in results["short.mp4"] and "decode" in results["corrupt.mp4"]


def test_decord_and_pyav_decode_the_same_frames(videos):
    pytest.importorskip("decord", reason="decord is a dependency on x86-64 Linux only")
    path = [str(videos / "video_000.mp4")]
    a = VideoSource(path, [4, 24, 32], stride=2, reader="decord").item(0, np.random.default_rng(3))
    b = VideoSource(path, [4, 24, 32], stride=2, reader="pyav").item(0, np.random.default_rng(3))
    assert (a - b).abs().mean() < 0.02


def test_synthetic_clips_are_lossless_and_byte_identical_when_written_again(tmp_path):
    import av

    frames = shape_frames(12, 24, 32, np.random.default_rng(0))
    first, again = write_video(tmp_path / "a.mp4", frames), write_video(tmp_path / "b.mp4", frames)
    assert first.read_bytes() == again.read_bytes()
    # lossless: the decoded luma is the frames' own, so no encoder decision changes what training sees
    own = [av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p").to_ndarray()[:24] for f in frames]
    with av.open(str(first)) as container:
        decoded = [f.to_ndarray(format="yuv420p")[:24] for f in container.decode(video=0)]
    assert len(decoded) == 12 and all(np.array_equal(a, b) for a, b in zip(own, decoded))
    a = VideoSource([str(first)], [4, 24, 32], stride=2, reader="decord").item(0, np.random.default_rng(3))
    b = VideoSource([str(first)], [4, 24, 32], stride=2, reader="pyav").item(0, np.random.default_rng(3))
    assert torch.equal(a, b)  # both readers decode it to the same values


def test_video_paths_are_checked():
    with pytest.raises(ConfigError, match="data.video.paths"):
        VideoSource([], [4, 8, 8])
    with pytest.raises(DataError, match="does not exist"):
        VideoSource(["/nonexistent/clips"], [4, 8, 8])


def test_medical_folder_is_searched_recursively_and_cropped(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "site1" / "sub").mkdir(parents=True)
    for name in ["a.nii.gz", "site1/sub/b.nii"]:
        vol = np.zeros((24, 24, 24), np.float32)
        vol[4:20, 4:20, 4:20] = rng.uniform(1, 2, (16, 16, 16))
        write_nifti(vol, tmp_path / name, spacing=(2.0, 2.0, 2.0))
    (tmp_path / "broken.nii.gz").write_bytes(b"not nifti")
    cfg = MedicalConfig(directory=str(tmp_path), crop_from=[16, 16, 16])
    source = MedicalSource(cfg, [8, 8, 8], [2.0, 2.0, 2.0])
    assert len(source.files) == 3
    out = []
    for position in range(3):
        try:
            out.append(source.item(position, np.random.default_rng(position)))
        except DataError as e:
            assert e.path.name == "broken.nii.gz"
    assert len(out) == 2 and all(v.shape == (1, 8, 8, 8) for v in out)
    with pytest.raises(ConfigError, match="exactly one"):
        MedicalSource(MedicalConfig(), [8, 8, 8], [2.0, 2.0, 2.0])


def test_two_views_differ_and_have_the_input_size():
    views = TwoViews(ContrastiveConfig(), [16, 16, 16])
    volume = torch.rand(1, 24, 28, 20)
    out = views(volume, np.random.default_rng(0))
    assert out["view1"].shape == out["view2"].shape == (1, 16, 16, 16)
    assert not torch.allclose(out["view1"], out["view2"])
    again = views(volume, np.random.default_rng(0))
    assert torch.equal(out["view1"], again["view1"])  # seeded by the item's generator: resumable


def test_auto_reader_falls_back_to_pyav_where_decord_fails(tmp_path, monkeypatch):
    """Where decord fails on a file, "auto" decodes the same clip with PyAV (decord itself is not needed: its
    failure is simulated, so the test does not depend on which files a decord release mis-decodes)."""
    path = write_video(tmp_path / "clip.mp4", shape_frames(10, 32, 32, np.random.default_rng(2)))
    attempts = []

    def failing_decord(path, frames, stride, rng):
        attempts.append(rng.integers(1000))  # draws from the generator, as a real start choice would
        raise DataError(path, "cannot be decoded by decord (simulated)")

    monkeypatch.setattr(video, "read_clip_decord", failing_decord)
    auto = VideoSource([str(path)], [4, 8, 8], reader="auto")
    auto.reader = "decord"  # as where decord is installed
    clip = auto.item(0, np.random.default_rng(0))
    expected = VideoSource([str(path)], [4, 8, 8], reader="pyav").item(0, np.random.default_rng(0))
    assert attempts and torch.equal(clip, expected) and clip.std() > 0  # the clip PyAV alone takes
    strict = VideoSource([str(path)], [4, 8, 8], reader="pyav")
    strict.reader = "decord"  # reader="decord": no fallback
    with pytest.raises(DataError, match="decord"):
        strict.item(0, np.random.default_rng(0))


def test_synthmri_on_the_fly_and_from_a_generated_folder_give_input_sized_volumes(tmp_path):
    import subprocess
    import sys

    from pretrain.config import SynthMRIConfig
    from pretrain.corpora.synthmri import SynthMRISource

    folder = tmp_path / "synth"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "synth",
            "generate",
            "--out",
            str(folder),
            "--n",
            "2",
            "--spacing",
            "4",
            "--workers",
            "1",
            "--no-progress",
        ],
        check=True,
        capture_output=True,
    )
    on_disk = SynthMRISource(SynthMRIConfig(directory=str(folder)), [16, 16, 16], [4.0, 4.0, 4.0])
    live = SynthMRISource(SynthMRIConfig(), [48, 16, 16], [4.0, 4.0, 4.0])  # D: padded, H/W: cropped
    for source in (on_disk, live):
        volume = source.item(0, np.random.default_rng(0))
        assert volume.dtype == torch.float32 and volume.std() > 0
    assert on_disk.item(1, np.random.default_rng(0)).shape == (1, 16, 16, 16)
    padded = live.item(1, np.random.default_rng(0))
    assert padded.shape == (1, 48, 16, 16) and padded[0, :2].abs().max() == 0  # 40 -> 48: zero rows
    with pytest.raises(ConfigError, match="isotropic"):
        SynthMRISource(SynthMRIConfig(), [16, 16, 16], [4.0, 4.0, 2.0])
    # a folder is read as written: pre-training it at another spacing would record one its encoder never saw
    with pytest.raises(
        ConfigError, match=r"holds volumes at \[4.0, 4.0, 4.0\] mm .* data.spacing is \[2.0, 2.0, 2.0\]"
    ):
        SynthMRISource(SynthMRIConfig(directory=str(folder)), [16, 16, 16], [2.0, 2.0, 2.0])
