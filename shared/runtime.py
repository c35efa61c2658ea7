"""Per-process resources built from settings: engine, session factory, stores, Redis for events.

Made when a process starts (or a command runs), never at import time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from shared.config import Settings
from shared.db import make_engine, session_factory
from shared.stores import ImageSource, Store, open_store


@dataclass
class Runtime:
    settings: Settings
    _closers: list = field(default_factory=list, repr=False)

    @cached_property
    def engine(self) -> Engine:
        engine = make_engine(self.settings.database_url)
        self._closers.append(engine.dispose)
        return engine

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        return session_factory(self.engine)

    @cached_property
    def model_store(self) -> Store:
        return open_store(self.settings.model_store, endpoint_url=self.settings.s3_endpoint_url)

    @cached_property
    def images(self) -> ImageSource:
        return ImageSource(
            self.settings.image_url,
            endpoint_url=self.settings.s3_endpoint_url,
            concurrency=self.settings.fetch_concurrency,
            max_bytes=self.settings.max_image_bytes,
        )

    @cached_property
    def events(self):
        """A Redis client for the ``stilltag:tagged`` channel, or None when no Redis is configured."""
        if not self.settings.events_url:
            return None
        import redis

        client = redis.Redis.from_url(self.settings.events_url, socket_timeout=5, socket_connect_timeout=5)
        self._closers.append(client.close)
        return client

    @property
    def model_cache_dir(self):
        return self.settings.data_dir / "model-cache"

    def close(self) -> None:
        while self._closers:
            self._closers.pop()()
