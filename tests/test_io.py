"""Frame sources, resize rules, masks and the palette."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
from PIL import Image

from dino_vos.errors import InputError
from dino_vos.masks import (
    ObjectIds,
    davis_palette,
    encode_indexed_png,
    read_mask,
    write_indexed_png,
)
from dino_vos.sources import (
    DecordVideoSource,
    FolderSource,
    OpenCVVideoSource,
    natural_key,
    open_source,
)
from dino_vos.spec import resized_frame_size
from dino_vos.synthetic import make_clip


def test_reference_resize_rule():
    assert resized_frame_size(480, 854) == (480, 832)  # DAVIS 480p -> 60 x 104 patches at p=8
    assert resized_frame_size(854, 480) == (832, 480)
    assert resized_frame_size(500, 500) == (480, 448)  # square: the frame reader's rule
    assert resized_frame_size(240, 427, short_side=240) == (240, 384)


def test_patch_resize_rule():
    assert resized_frame_size(480, 854, 480, "patch", 8) == (480, 856)
    assert resized_frame_size(480, 854, 480, "patch", 14) == (476, 854)
    assert resized_frame_size(100, 130, None, "patch", 16) == (96, 128)


def test_natural_sort_and_folder_source(tmp_path):
    for name in ["frame10.png", "frame2.png", "frame1.png", "notes.txt"]:
        if name.endswith(".png"):
            cv2.imwrite(str(tmp_path / name), np.full((8, 12, 3), int(name[5:-4]), np.uint8))
        else:
            (tmp_path / name).write_text("x")
    assert sorted(["a10", "a2", "a1"], key=natural_key) == ["a1", "a2", "a10"]
    source = FolderSource(tmp_path)
    frames = list(source)
    assert [f.name for f in frames] == ["frame1", "frame2", "frame10"]
    assert [int(f.image[0, 0, 0]) for f in frames] == [1, 2, 10]
    assert source.frame_size == (8, 12) and len(source) == 3


def test_video_sources_agree_and_stream(clip_dir):
    video = clip_dir / "clip.mp4"
    decoded = [f.image for f in DecordVideoSource(video)]
    fallback = [f.image for f in OpenCVVideoSource(video)]
    assert len(decoded) == len(fallback) == 6
    assert [f.name for f in open_source(video)] == [f"{i:05d}" for i in range(6)]
    # both decoders see the same frames (up to decoder rounding)
    pairs = zip(decoded, fallback, strict=True)
    assert max(np.abs(a.astype(int) - b.astype(int)).mean() for a, b in pairs) < 2
    assert len(open_source(video, limit=4)) == 4


def test_source_errors(tmp_path):
    with pytest.raises(InputError, match="input not found"):
        open_source(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image frames"):
        open_source(tmp_path / "empty")
    bad_video = tmp_path / "broken.mp4"
    bad_video.write_bytes(b"\x00" * 1000)
    with pytest.raises(InputError, match="cannot decode video"):
        open_source(bad_video)
    with pytest.raises(InputError, match="cannot decode video"):
        OpenCVVideoSource(bad_video)
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "00000.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(InputError, match="corrupt or not an image"):
        list(open_source(tmp_path / "frames"))
    with pytest.raises(InputError, match="unsupported input"):
        open_source(tmp_path / "frames" / "00000.jpg")


def test_palette_is_the_voc_colour_map():
    palette = davis_palette()
    assert palette[0].tolist() == [0, 0, 0]
    assert palette[1].tolist() == [128, 0, 0]
    assert palette[2].tolist() == [0, 128, 0]
    assert palette[3].tolist() == [128, 128, 0]
    assert palette[15].tolist() == [192, 128, 128]
    assert palette[255].tolist() == [224, 224, 192]


def test_read_mask_formats(tmp_path):
    labels = np.zeros((6, 8), np.uint8)
    labels[1:3, 1:4] = 3
    labels[4:, 5:] = 7
    labels[0, 0] = 255
    indexed = tmp_path / "indexed.png"
    indexed.write_bytes(encode_indexed_png(labels))
    assert np.array_equal(read_mask(indexed), labels)  # ids kept, 255 stays void

    gray = tmp_path / "davis2016.png"
    Image.fromarray(((labels == 3) * 255).astype(np.uint8), mode="L").save(gray)
    assert set(np.unique(read_mask(gray)).tolist()) == {0, 1}

    plain = tmp_path / "labels.png"
    Image.fromarray(labels, mode="L").save(plain)
    assert np.array_equal(read_mask(plain), labels)

    colour = tmp_path / "colour.png"
    Image.fromarray(davis_palette()[labels]).save(colour)
    with pytest.raises(InputError, match="colour image"):
        read_mask(colour)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG broken")
    with pytest.raises(InputError, match="cannot read mask"):
        read_mask(corrupt)


def test_object_ids_channels_and_void():
    mask = np.array([[0, 3, 7], [255, 7, 3]], np.uint8)
    ids = ObjectIds.from_mask(mask)
    assert ids.ids == (0, 3, 7)
    assert ids.to_channels(mask).tolist() == [[0, 1, 2], [-1, 2, 1]]
    onehot = ids.one_hot(mask)
    assert onehot.shape == (3, 2, 3)
    assert onehot[:, 1, 0].sum() == 0 and onehot[2, 0, 2] == 1
    assert ids.to_ids(np.array([[2, 0, 1]])).tolist() == [[7, 0, 3]]


def test_video_widths_decord_misdecodes_fall_back_to_opencv(tmp_path):
    clip = make_clip(3, (48, 72), 1, seed=0)  # decord returns 4 garbled channels at width 72
    clip.write(tmp_path, video=tmp_path / "clip.mp4")
    frames = [frame.image for frame in open_source(tmp_path / "clip.mp4")]
    assert frames[0].shape == (48, 72, 3)
    assert np.abs(frames[0].astype(int) - clip.frames[0]).mean() < 10


def test_outputs_get_ordinary_file_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        write_indexed_png(tmp_path / "mask.png", np.zeros((4, 4), np.uint8))
    finally:
        os.umask(umask)
    assert (tmp_path / "mask.png").stat().st_mode & 0o777 == 0o644
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_decord_source_streams_the_pixels_it_reads_at_random(tmp_path):
    """A decord source streams through OpenCV (decord decodes about a thousand frames ahead of a
    sequential reader) and reads at random through decord: both must give the same pixels, or
    backward propagation would decode every chunk twice."""
    pytest.importorskip("decord")
    from dino_vos.sources import DecordVideoSource

    clip = make_clip(12, (96, 128), 2, seed=1)
    clip.write(tmp_path, video=tmp_path / "clip.mp4")
    source = open_source(tmp_path / "clip.mp4")
    assert isinstance(source, DecordVideoSource)
    streamed = [frame.image for frame in source]
    assert len(streamed) == 12
    for start, stop in ((0, 12), (5, 9), (11, 12)):
        assert all(
            np.array_equal(image, streamed[start + i])
            for i, image in enumerate(source.read_frames(start, stop))
        )
