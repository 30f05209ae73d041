"""data.load_video keeps exactly the frames MiniGPT4Qwen's rule picks from a count of decoded frames
(every max(1, total // max_frames)-th), though it counts by demuxing and decodes once, threaded."""
import av
import numpy as np
import pytest

from data import load_video, video_frame_indices


def write(path, codec, n, size=(96, 64), fmt="yuv420p"):
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as out:
        s = out.add_stream(codec, rate=25)
        s.width, s.height, s.pix_fmt = *size, fmt
        for t in range(n):  # a moving bar over noise: every frame differs
            img = rng.integers(0, 40, (size[1], size[0], 3), dtype=np.uint8)
            img[10:40, (3 * t) % size[0]:(3 * t) % size[0] + 12] = (250, 30, 30)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)


def every_frame(path):
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


@pytest.mark.parametrize("codec,ext,fmt", [("libx264", "mp4", "yuv420p"), ("mpeg4", "avi", "yuv420p"),
                                           ("ffv1", "mkv", "bgr0")])
@pytest.mark.parametrize("n,max_frames", [(75, 32), (75, 8), (10, 32), (1, 4)])
def test_frames_are_those_the_rule_picks_from_every_decoded_frame(tmp_path, codec, ext, fmt, n, max_frames):
    if codec not in av.codecs_available:
        pytest.skip(f"PyAV has no {codec} encoder")
    path = tmp_path / f"clip.{ext}"
    write(path, codec, n, fmt=fmt)
    everything = every_frame(path)
    want = [everything[i] for i in video_frame_indices(len(everything), max_frames)]
    got = load_video(path, max_frames)
    assert len(got) == len(want) == min(n, max_frames)
    assert all(np.array_equal(np.asarray(g), w) for g, w in zip(got, want))


def test_frame_rule():
    assert video_frame_indices(250, 32) == list(range(0, 224, 7))
    assert video_frame_indices(10, 32) == list(range(10))
    assert video_frame_indices(64, 32) == list(range(0, 64, 2))
