"""The beat schedule: STILLTAG_RETRAIN_SCHEDULE parsed as cron, picked up by ``celery beat``."""

from __future__ import annotations

import datetime as dt

import pytest
from celery.beat import Scheduler

from shared.celery_app import create_app
from shared.constants import RETRAIN_TASK, TRAINING_QUEUE
from shared.schedule import retrain_crontab

ENTRY = "retrain-on-schedule"


def beat_entry(settings):
    # What `celery -A shared.celery_app beat` builds at start: the app's beat_schedule merged in.
    scheduler = Scheduler(app=create_app(settings), lazy=False)
    return scheduler.schedule[ENTRY]


def test_monthly_by_default(make_settings):
    entry = beat_entry(make_settings())
    assert entry.task == RETRAIN_TASK and entry.options["queue"] == TRAINING_QUEUE
    cron = entry.schedule
    assert (cron.minute, cron.hour, cron.day_of_month) == ({0}, {3}, {1})
    assert cron.month_of_year == set(range(1, 13)) and cron.day_of_week == set(range(7))


def test_next_run_is_the_first_of_next_month_at_three(make_settings):
    cron = beat_entry(make_settings()).schedule
    last = dt.datetime(2025, 1, 1, 3, 0, tzinfo=dt.UTC)
    now = dt.datetime(2025, 1, 15, 12, 0, tzinfo=dt.UTC)
    cron.nowfun = lambda: now
    assert now + cron.remaining_estimate(last) == dt.datetime(2025, 2, 1, 3, 0, tzinfo=dt.UTC)
    assert not cron.is_due(last).is_due
    cron.nowfun = lambda: dt.datetime(2025, 2, 1, 3, 0, 30, tzinfo=dt.UTC)
    assert cron.is_due(last).is_due


def test_fields_are_in_cron_order(make_settings):
    # minute hour day-of-month month day-of-week, as in crontab(5), not celery's positional order
    cron = beat_entry(make_settings(retrain_schedule="*/15 2 * 6 1-5")).schedule
    assert cron.minute == {0, 15, 30, 45} and cron.hour == {2}
    assert cron.month_of_year == {6} and cron.day_of_week == {1, 2, 3, 4, 5}


def test_validation_and_beat_read_the_schedule_through_one_parser(make_settings):
    value = " 30\t4  * * mon,fri "  # any whitespace between the fields, as cron allows
    settings = make_settings(retrain_schedule=value)
    assert beat_entry(settings).schedule == retrain_crontab(value)
    cron = retrain_crontab(value)
    assert (cron.minute, cron.hour, cron.day_of_week) == ({30}, {4}, {1, 5})


@pytest.mark.parametrize(("value", "message"), [
    ("0 3 1 *", "five cron fields"),
    ("0 3 1 * * 2025", "five cron fields"),
    ("0 25 1 * *", "not a valid cron schedule"),
    ("0 3 1 13 *", "not a valid cron schedule"),
    ("0 3 32 * *", "not a valid cron schedule"),
    ("*/0 3 1 * *", "not a valid cron schedule"),
    ("0 3 1 * someday", "not a valid cron schedule"),
])
def test_a_bad_schedule_is_refused_at_start(make_settings, value, message):
    with pytest.raises(ValueError, match=message):
        make_settings(retrain_schedule=value)
