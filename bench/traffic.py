"""What ``stilltag bench`` sends and how it times it: JPEGs at movie sizes, and the moment each
image's ``stilltag:tagged`` event arrives (the worker publishes it after its batch's transaction
commits)."""

from __future__ import annotations

import io
import json
import threading
import time

import numpy as np

from shared.constants import TAGGED_CHANNEL

# Frame sizes of movie stills: 720p, 2.40:1 at 1920 wide, 4:3 and 4:3 1080p.
MOVIE_SIZES = ((1280, 720), (1920, 800), (1024, 768), (1440, 1080))
JPEG_QUALITY = 90
GRAIN_SIGMA = 6.0  # film grain: generated pictures are flat; real stills have texture (and bigger files)


def movie_jpegs(count: int, *, distinct_per_size: int, seed: int = 0) -> list[bytes]:
    """``count`` JPEGs cycling through the movie sizes, built from a small pool of distinct pictures."""
    from PIL import Image

    from demo.synthetic import make_picture

    rng = np.random.default_rng(seed)
    pool: list[bytes] = []
    for k in range(distinct_per_size):
        for j, size in enumerate(MOVIE_SIZES):
            picture = make_picture(1 + k * len(MOVIE_SIZES) + j, seed=seed, size=size).image
            pixels = np.asarray(picture, dtype=np.float32)
            pixels = np.clip(pixels + rng.normal(0, GRAIN_SIGMA, pixels.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="JPEG", quality=JPEG_QUALITY)
            pool.append(buf.getvalue())
    return [pool[i % len(pool)] for i in range(count)]


class Events:
    """Listens on ``stilltag:tagged`` and records when each image's event arrived."""

    def __init__(self, redis_url: str):
        import redis

        self.client = redis.Redis.from_url(redis_url)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(TAGGED_CHANNEL)
        self.seen: dict[int, tuple[float, str]] = {}
        self.cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="bench-events", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            msg = self.pubsub.get_message(timeout=0.2)
            if msg is None:
                continue
            now = time.perf_counter()
            event = json.loads(msg["data"])
            with self.cond:
                self.seen[int(event["image_id"])] = (now, event["state"])
                self.cond.notify_all()

    def wait(self, image_ids, timeout_s: float) -> dict[int, tuple[float, str]]:
        wanted = set(image_ids)
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while not wanted <= self.seen.keys():
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(wanted - self.seen.keys())
                    raise TimeoutError(f"{len(missing)} image(s) not tagged after {timeout_s:.0f} s: {missing[:10]}…")
                self.cond.wait(min(left, 0.5))
            return {i: self.seen[i] for i in wanted}

    def forget(self, image_ids) -> None:
        """Drop what was seen for these images, so they can be timed again."""
        with self.cond:
            for i in image_ids:
                self.seen.pop(i, None)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.pubsub.close()
        self.client.close()
