"""Study tracking: a study is complete after a quiet period without new instances.

DICOM has no "end of study" message. Each receiving study has a deadline in
the index; an APScheduler date job per study fires at that deadline and makes
the study ``stable`` if the deadline has not moved since (an instance that
arrived in between moved it: the job re-arms itself for the new deadline).
Because the deadline lives in the database, a restart (or ``kill -9``) only
has to re-arm one job per receiving study; stable studies stay stable.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading

from apscheduler.schedulers.background import BackgroundScheduler

from storage.index import Index, RecordOutcome

log = logging.getLogger("dicom_node.tracker")


def _aware(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value


class StudyTracker:
    """Arms one timer per receiving study; calls ``on_stable(study_id, StudyInstanceUID)``."""

    def __init__(self, index: Index, scheduler: BackgroundScheduler, on_stable=None, sweep_seconds: float = 30.0):
        self.index = index
        self.scheduler = scheduler
        self.on_stable = on_stable
        self.sweep_seconds = sweep_seconds
        self._armed: set[int] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        """Re-arm a timer for every study that was receiving (after a start or a crash)."""
        recovered = self.index.receiving_deadlines()
        for study_id, uid, deadline in recovered:
            self._arm(study_id, uid, deadline)
        if recovered:
            log.info("re-armed quiet-period timers of %d receiving stud%s", len(recovered),
                     "y" if len(recovered) == 1 else "ies")
        # a safety net: a study whose timer was lost (it cannot be, but nothing is lost if it were)
        self.scheduler.add_job(self._sweep, "interval", seconds=self.sweep_seconds, id="tracker-sweep",
                               replace_existing=True, coalesce=True, max_instances=1)

    def instance_recorded(self, outcome: RecordOutcome) -> None:
        self._arm(outcome.study_id, outcome.StudyInstanceUID, outcome.deadline)

    def _arm(self, study_id: int, uid: str, deadline: dt.datetime) -> None:
        with self._lock:
            if study_id in self._armed:
                return  # the armed job re-arms itself if the deadline moved
            self._armed.add(study_id)
        self.scheduler.add_job(self._fire, "date", run_date=_aware(deadline), args=[study_id, uid],
                               id=f"stable-{study_id}", replace_existing=True, misfire_grace_time=None,
                               coalesce=True)

    def _fire(self, study_id: int, uid: str) -> None:
        with self._lock:
            self._armed.discard(study_id)
        try:
            became_stable, later = self.index.mark_stable_if_due(study_id)
        except Exception:
            log.exception("could not check study %s; retrying at the next sweep", uid)
            return
        if became_stable:
            log.info("study %s: stable", uid)
            if self.on_stable is not None:
                try:
                    self.on_stable(study_id, uid)
                except Exception:
                    log.exception("stable-study hook failed for %s", uid)
        elif later is not None:
            self._arm(study_id, uid, later)

    def _sweep(self) -> None:
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        for study_id, uid, deadline in self.index.receiving_deadlines():
            with self._lock:
                armed = study_id in self._armed
            if not armed and deadline <= now:
                self._fire(study_id, uid)
            elif not armed:
                self._arm(study_id, uid, deadline)
