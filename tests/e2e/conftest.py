import shutil

import pytest

from tests.conftest import pg_database, redis_database
from tests.e2e.stack import Stack


def build_stack(root, learner, *, database_url: str, broker_url: str | None, **settings) -> Stack:
    env = {
        "STILLTAG_DATA_DIR": str(root / "data"),
        "STILLTAG_DATABASE_URL": database_url,
        "STILLTAG_IMAGE_URL": f"file://{root / 'images'}/{{image_id}}.jpg",
        "STILLTAG_MODEL_STORE": f"file://{root / 'models'}",
        **{f"STILLTAG_{k.upper()}": str(v) for k, v in settings.items()},
    }
    if broker_url:
        env["STILLTAG_BROKER_URL"] = broker_url
    stack = Stack(settings_env=env, root=root)
    stack.cli("db", "upgrade")
    artifact = root / "export.pkl"
    shutil.copyfile(learner, artifact)
    stack.cli("models", "register", str(artifact), "--promote")
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
