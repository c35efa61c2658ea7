"""Measure the backfill rate: ``stilltag backfill`` through one real tagging worker, end to end.

    uv run stilltag demo                                   # once: trains the demo's small learner
    uv run python scripts/backfill_rate.py --learner .stilltag/models/v1/export.pkl --images 3000

On a claimed Redis DB and a throw-away PostgreSQL database (bench/stack.py), it writes
``--images`` generated pictures, a ``stills`` table listing them, registers the learner, starts
one tagging worker and runs ``stilltag backfill --query 'SELECT id AS image_id FROM stills'``,
sampling ``LLEN backfill`` meanwhile. It prints the rate (from the command's start to the last
image's commit), the highest queue length seen against the bound, the load average before and
after, and what that rate means for an archive of 243,000 images.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa

from bench.stack import claimed_stack
from demo.synthetic import make_picture
from shared.constants import BACKFILL_QUEUE

ARCHIVE_IMAGES = 243_000  # the seed site's archive
DISTINCT_PICTURES = 50  # pictures cycled over the IDs (decode and inference cost the same)
PICTURE_SIZE = (160, 120)  # as the demo's
QUERY = "SELECT id AS image_id FROM stills"


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--learner", type=Path, required=True, help="An export.pkl (the demo's: "
                        ".stilltag/models/v1/export.pkl after `stilltag demo`).")
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-pending", type=int, default=0, help="0: the default, 10 x max batch.")
    parser.add_argument("--redis", default=os.environ.get("STILLTAG_TEST_REDIS", "redis://127.0.0.1:6379"))
    parser.add_argument("--postgres", default=os.environ.get("STILLTAG_TEST_PG",
                                                            "postgresql://postgres@127.0.0.1:5432/postgres"))
    args = parser.parse_args()
    pictures = [make_picture(i, size=PICTURE_SIZE).jpeg() for i in range(DISTINCT_PICTURES)]
    with tempfile.TemporaryDirectory(prefix="stilltag-backfill-rate-") as tmp, \
            claimed_stack(Path(tmp), redis_host_url=args.redis, pg_admin_url=args.postgres,
                          max_batch=args.max_batch, device="cpu") as stack:
        ids = list(range(1, args.images + 1))
        for i in ids:
            stack.put_image(i, pictures[i % DISTINCT_PICTURES])
        stack.register_champion(args.learner)
        with stack.engine().begin() as c:
            c.execute(sa.text("CREATE TABLE stills (id bigint PRIMARY KEY)"))
            c.execute(sa.text("INSERT INTO stills SELECT generate_series(1, :n)"), {"n": args.images})
        stack.worker().wait_ready()
        highest, stop = [0], threading.Event()

        def sample() -> None:
            while not stop.wait(0.005):
                highest[0] = max(highest[0], stack.redis.llen(BACKFILL_QUEUE))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        before = loadavg()
        command = ["backfill", "--query", QUERY] + (["--max-pending", str(args.max_pending)] if args.max_pending else [])
        t0 = time.perf_counter()
        run = subprocess.Popen([sys.executable, "-m", "stilltag.cli", *command], env=stack.env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        stack.wait_for(ids, timeout_s=3600)
        seconds = time.perf_counter() - t0
        out, _ = run.communicate(timeout=60)
        stop.set()
        sampler.join()
        after = loadavg()
    rate = args.images / seconds
    bound = args.max_pending or 10 * args.max_batch
    print(out.strip().splitlines()[-1])
    print(f"images {args.images}, max_batch {args.max_batch}, {seconds:.1f} s: {rate:.1f} images/s (CPU)")
    print(f"highest LLEN backfill {highest[0]} (bound {bound})")
    print(f"loadavg before {before} | after {after}")
    print(f"{ARCHIVE_IMAGES:,} images at this rate: {timedelta(seconds=round(ARCHIVE_IMAGES / rate))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
