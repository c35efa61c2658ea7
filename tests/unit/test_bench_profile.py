"""bench/profile.py: py-spy's raw samples put in stages per thread, and the summary's sums."""

from bench.profile import SAMPLE_HZ, read_raw, render, summarise

ROOT = "Thread.run (threading.py:982)"
STACKS = [  # (thread, frames under the thread's root, samples), as py-spy --threads --format raw writes them
    ("101): inference", "BatchConsumer._inference_loop (worker/consumer.py:420);Tagger.predict (worker/service.py:228);"
     "TaggingModel.predict (worker/model.py:258);TaggingModel.forward (worker/model.py:252)", 300),
    ("101): inference", "Tagger.persist (worker/service.py:240);persist_batch (worker/results.py:80);"
     "Session.execute (sqlalchemy/orm/session.py:2300)", 20),
    ("101): inference", "Tagger.persist (worker/service.py:240);publish_events (worker/results.py:110);"
     "Pipeline.execute (redis/client.py:2233)", 5),
    ("102): prepare_0", "Tagger.prepare (worker/service.py:169);decode_image (worker/preprocess.py:89);"
     "ImageFile.load (PIL/ImageFile.py:425)", 150),
    ("103): prepare_12", "Tagger.prepare (worker/service.py:160);LocalImages.fetch (shared/stores.py:50)", 10),
    ("104): batch-consumer", "Connection.drain_events (kombu/connection.py:399);"
     "Pipeline._execute_transaction (redis/client.py:2025)", 40),
    ("105): MainThread", "<module> (celery/bin/worker.py:1)", 2),
]
RAW = "".join(f"thread ({thread};{ROOT};{frames} {n}\n" for thread, frames, n in STACKS)


def test_samples_are_put_in_stages_per_thread(tmp_path):
    path = tmp_path / "pyspy.txt"
    path.write_text(RAW)
    samples, tids = read_raw(path)
    assert samples == {
        ("inference", "forward pass"): 300,
        ("inference", "commit (database)"): 20,
        ("inference", "events (Redis)"): 5,
        ("prepare (fetch + decode pool)", "decode"): 150,
        ("prepare (fetch + decode pool)", "fetch (image store)"): 10,
        ("batch-consumer", "acks and polling (broker)"): 40,  # a Redis MULTI is not a database commit
        ("MainThread", "other"): 2,
    }
    assert tids == {101: "inference", 102: "prepare (fetch + decode pool)", 103: "prepare (fetch + decode pool)",
                    104: "batch-consumer", 105: "MainThread"}


def test_summary_adds_seconds_and_renders_shares(tmp_path):
    path = tmp_path / "pyspy.txt"
    path.write_text(RAW)
    samples, _ = read_raw(path)
    summary = summarise(samples, {("inference", "forward pass"): 100}, {"inference": 3.5, "torch intra-op (native)": 2.0},
                        wall_s=4.0, cores=2)
    assert summary["stages"]["inference: forward pass"] == {"running_s": 300 / SAMPLE_HZ, "gil_s": 100 / SAMPLE_HZ}
    assert next(iter(summary["stages"])) == "inference: forward pass"  # largest first
    assert summary["cpu_s_by_thread"] == {"inference": 3.5, "torch intra-op (native)": 2.0}
    text = render(summary)
    assert "43.8% of the cores  inference" in text  # 3.5 s of 2 cores x 4 s
    assert "68.8% of the cores  all threads" in text
