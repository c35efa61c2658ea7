import pytest

from bench.stack import Stack
from tests.conftest import pg_database, redis_database


def build_stack(root, learner, *, database_url: str, broker_url: str | None, **settings) -> Stack:
    """A :class:`bench.stack.Stack` with its database migrated and ``learner`` registered as the champion."""
    stack = Stack(root, database_url=database_url, broker_url=broker_url, **settings)
    stack.register_champion(learner)
    return stack


@pytest.fixture
def stack_factory(tmp_path, tiny_learner):
    """``stack_factory(**settings)``: PostgreSQL + Redis + a registered champion; the test starts workers."""
    made = []

    def make(**settings) -> Stack:
        pg, rd = pg_database(), redis_database()
        stack = build_stack(tmp_path, tiny_learner, database_url=pg.__enter__(), broker_url=rd.__enter__(), **settings)
        made.append((stack, pg, rd))
        return stack

    yield make
    for stack, pg, rd in made:
        stack.close()
        pg.__exit__(None, None, None)
        rd.__exit__(None, None, None)


@pytest.fixture(scope="module")
def running(tmp_path_factory, tiny_learner):
    """One stack with one running tagging worker, shared by a module's tests (a worker takes ~20 s to start)."""
    root = tmp_path_factory.mktemp("stack")
    with pg_database() as pg, redis_database() as rd:
        stack = build_stack(root, tiny_learner, database_url=pg, broker_url=rd, max_batch=8, max_wait_ms=50)
        stack.worker().wait_ready()
        yield stack
        stack.close()
