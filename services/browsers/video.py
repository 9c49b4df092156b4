"""Session videos: CDP screencast frames (JPEG) kept in a bounded buffer, encoded to WebM at the end.

A session created with ``options.recording: "video"`` screencasts its first
page (``Page.startScreencast``; Chromium sends a frame when the page changes,
each acknowledged so the next one comes). :class:`FrameBuffer` keeps the
frames with their timestamps up to :data:`MAX_FRAMES` / :data:`MAX_BYTES`
(later frames are dropped and counted). :func:`encode_webm` turns them into a
VP8 WebM with each frame shown until the next one (PyAV, in a worker thread:
it blocks).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from fractions import Fraction

MAX_FRAMES = 1800
MAX_BYTES = 96 * 1024 * 1024


@dataclass
class FrameBuffer:
    frames: list[tuple[float, bytes]] = field(default_factory=list)
    size: int = 0
    dropped: int = 0

    def add(self, timestamp: float, jpeg: bytes) -> None:
        if len(self.frames) >= MAX_FRAMES or self.size + len(jpeg) > MAX_BYTES:
            self.dropped += 1
            return
        self.frames.append((timestamp, jpeg))
        self.size += len(jpeg)


def encode_webm(frames: list[tuple[float, bytes]], tail_s: float = 0.5) -> bytes:
    """A VP8 WebM of the JPEG frames, each shown from its timestamp (seconds) to the next."""
    import av

    if not frames:
        raise ValueError("no frames")
    frames = sorted(frames, key=lambda f: f[0])
    out = io.BytesIO()
    start = frames[0][0]
    with av.open(out, mode="w", format="webm") as container:
        decoder = av.CodecContext.create("mjpeg", "r")
        stream = None
        last_pts = -1
        for timestamp, jpeg in frames:
            for picture in decoder.decode(av.Packet(jpeg)):
                if stream is None:
                    stream = container.add_stream("libvpx", rate=1000)
                    stream.width = picture.width - picture.width % 2
                    stream.height = picture.height - picture.height % 2
                    stream.pix_fmt = "yuv420p"
                    stream.time_base = Fraction(1, 1000)
                    stream.codec_context.time_base = Fraction(1, 1000)
                    stream.options = {"deadline": "realtime", "cpu-used": "8", "b": "1M"}
                pts = max(last_pts + 1, int((timestamp - start) * 1000))
                frame = picture.reformat(width=stream.width, height=stream.height, format="yuv420p")
                frame.pts = pts
                frame.time_base = Fraction(1, 1000)
                last_pts = pts
                for packet in stream.encode(frame):
                    container.mux(packet)
        if stream is None:
            raise ValueError("no decodable frame")
        # Hold the last picture a little so it is visible.
        if last_pts >= 0:
            for picture in decoder.decode(av.Packet(frames[-1][1])):
                frame = picture.reformat(width=stream.width, height=stream.height, format="yuv420p")
                frame.pts = last_pts + int(tail_s * 1000)
                frame.time_base = Fraction(1, 1000)
                for packet in stream.encode(frame):
                    container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue()
