"""Reading written videos back (shared by the animation tests): frame count and size, decoded."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

MP4_BRAND = b"ftyp"  # bytes 4..8 of an MP4 file
GIF_MAGIC = b"GIF89a"


def video_frames(path: Path) -> tuple[int, tuple[int, int]]:
    """``(frames, (width, height))`` of an MP4 (decoded by imageio-ffmpeg) or a GIF (by Pillow)."""
    data = path.read_bytes()
    if path.suffix == ".gif":
        assert data.startswith(GIF_MAGIC), path
        with Image.open(path) as image:
            return image.n_frames, image.size
    assert path.suffix == ".mp4" and data[4:8] == MP4_BRAND, path
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    frames = 0
    for frame in reader:
        assert len(frame) == width * height * 3
        frames += 1
    return frames, (width, height)
