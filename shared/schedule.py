"""The retrain schedule: ``STILLTAG_RETRAIN_SCHEDULE``, five cron fields parsed by Celery.

Settings validation and the beat schedule both go through ``retrain_crontab``, so a schedule
that starts a process is exactly the one beat runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from celery.schedules import crontab

CRON_FIELDS = ("minute", "hour", "day-of-month", "month", "day-of-week")


def retrain_crontab(schedule: str) -> crontab:
    """``"0 3 1 * *"`` → Celery's ``crontab``, fields in crontab(5) order.

    Raises:
        ValueError: with a message naming the setting, when the string is not five valid fields.
    """
    from celery.schedules import crontab

    fields = schedule.split()
    if len(fields) != len(CRON_FIELDS):
        raise ValueError(
            f"STILLTAG_RETRAIN_SCHEDULE must be five cron fields ({' '.join(CRON_FIELDS)}), "
            f"e.g. '0 3 1 * *' for 03:00 on the 1st of each month; got {schedule!r}"
        )
    try:
        # from_string reads cron order (minute hour day-of-month month day-of-week) and splits on
        # single spaces, hence the join.
        return crontab.from_string(" ".join(fields))
    except ValueError as exc:
        raise ValueError(f"STILLTAG_RETRAIN_SCHEDULE {schedule!r} is not a valid cron schedule: {exc}") from None
