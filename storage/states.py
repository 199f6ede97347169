"""The owner of ``Study.state``: the allowed transitions, and the one way to write a study's state.

A study is ``receiving`` while instances arrive, ``stable`` once its quiet
period passed, ``inferring`` while a worker holds it, then ``results_ready``
(deliveries queued), ``sent`` (all delivered, or nothing to deliver),
``failed`` (inference failed for good, or deliveries are dead letters) or
``skipped`` (nothing the model can read). Late instances reopen a study from
any state but ``receiving``.

:data:`TRANSITIONS` lists every allowed move with the reason it exists. Every
write of the state in this package goes through this module and is checked
against it:

* :func:`set_state` on a loaded :class:`~storage.models.Study` (inside a write
  transaction);
* :func:`guarded_update` builds the compare-and-set ``UPDATE studies ... WHERE
  state IN (...)`` that claims, finishes and releases use when several
  workers or processes may race for the same row: the ``WHERE`` names only
  states the table allows to move to the target.

Both set ``state``, ``state_reason`` and ``state_changed_at`` together, and
any related columns given; a transition the table does not allow raises
:class:`InvalidTransition` before anything is written.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import ColumnElement, Update, and_, or_, update

from storage.errors import StorageError
from storage.models import Study, StudyState

RECEIVING = StudyState.RECEIVING
STABLE = StudyState.STABLE
INFERRING = StudyState.INFERRING
RESULTS_READY = StudyState.RESULTS_READY
SENT = StudyState.SENT
FAILED = StudyState.FAILED
SKIPPED = StudyState.SKIPPED

#: the state of a study made by its first instance
INITIAL = RECEIVING

_REOPEN = "instances arrived after the study had left receiving: it is processed again when stable"
_FOLLOW = "the study follows the deliveries of its current result version ({})"

#: {from state: {allowed to state: why this transition exists}}
TRANSITIONS: dict[StudyState, dict[StudyState, str]] = {
    RECEIVING: {
        STABLE: "the quiet period passed without a new instance (Index.mark_stable_if_due)",
    },
    STABLE: {
        INFERRING: "a pipeline worker claimed the study (Jobs.claim)",
        RECEIVING: _REOPEN,
    },
    INFERRING: {
        INFERRING: "another worker took over a claim whose lease lapsed (Jobs.claim)",
        STABLE: "the claim was given back: workers restarted (Jobs.release_claims), or inference failed "
                "and will be tried again (Jobs.fail)",
        RESULTS_READY: "results were recorded and their deliveries queued (Jobs.finish)",
        SENT: "results were recorded with no destination to send them to (Jobs.finish)",
        SKIPPED: "nothing the model can read: no processable image, unsupported SOP class, routing rule (Jobs.skip)",
        FAILED: "inference failed max_attempts times, or in a way a retry cannot fix (Jobs.fail)",
        RECEIVING: _REOPEN + "; the running inference's results are discarded (Jobs.finish finds the "
                             "generation changed)",
    },
    RESULTS_READY: {
        SENT: _FOLLOW.format("every delivery sent"),
        FAILED: _FOLLOW.format("some dead letters, none pending or sending"),
        RECEIVING: _REOPEN,
    },
    SENT: {
        RESULTS_READY: _FOLLOW.format("a delivery is pending or sending again"),
        FAILED: _FOLLOW.format("a delivery is a dead letter"),
        RECEIVING: _REOPEN,
    },
    FAILED: {
        FAILED: _FOLLOW.format("another destination's deliveries died: the reason is rewritten"),
        RESULTS_READY: _FOLLOW.format("dead letters were re-queued by `dicom-node retry`"),
        SENT: _FOLLOW.format("the remaining deliveries were sent"),
        STABLE: "`dicom-node retry`: a study whose inference failed is tried again (Jobs.retry_failed_inference)",
        RECEIVING: _REOPEN,
    },
    SKIPPED: {
        RECEIVING: _REOPEN,
    },
}


class InvalidTransition(StorageError):
    """A write would move a study between two states that :data:`TRANSITIONS` does not connect."""

    def __init__(self, from_state: str | None, to_state: str):
        self.from_state = from_state
        self.to_state = to_state
        super().__init__(f"study state cannot go from {from_state} to {to_state}")


def allowed(from_state: str, to_state: str) -> bool:
    """True when :data:`TRANSITIONS` allows ``from_state`` -> ``to_state`` (state names or members)."""
    try:
        return StudyState(to_state) in TRANSITIONS[StudyState(from_state)]
    except ValueError:  # not a state at all
        return False


def _name(state: StudyState | str | None) -> str | None:
    return state.value if isinstance(state, StudyState) else state


def check(from_state: StudyState | str | None, to_state: StudyState | str) -> None:
    """Raise :class:`InvalidTransition` unless ``from_state`` -> ``to_state`` is allowed."""
    if from_state is None or not allowed(from_state, to_state):
        raise InvalidTransition(_name(from_state), _name(to_state) or "")


def initial_values(now: dt.datetime) -> dict[str, Any]:
    """The state columns of a new study (made by its first instance)."""
    return {"state": INITIAL.value, "state_reason": None, "state_changed_at": now}


def _values(to_state: StudyState, now: dt.datetime, reason: str | None, columns: Mapping[str, Any]) -> dict:
    values = {"state": to_state.value, "state_reason": reason, "state_changed_at": now}
    clash = set(values) & set(columns)
    if clash:
        raise TypeError(f"pass {sorted(clash)} as arguments, not as columns")
    values.update(columns)
    return values


def set_state(study: Study, to_state: StudyState | str, *, now: dt.datetime, reason: str | None = None,
              **columns: Any) -> None:
    """Move a loaded ``study`` to ``to_state`` (with ``reason``) and set the related ``columns`` with it.

    Call inside the write transaction that loaded the study; raises :class:`InvalidTransition`
    (nothing changed) when the table does not allow the move.
    """
    to_state = StudyState(to_state)
    check(study.state, to_state)
    for key, value in _values(to_state, now, reason, columns).items():
        setattr(study, key, value)


def guarded_update(to_state: StudyState | str,
                   from_states: Iterable[StudyState | str] | Mapping[StudyState | str, ColumnElement | None],
                   *where: ColumnElement, now: dt.datetime, reason: str | None = None, **columns: Any) -> Update:
    """The compare-and-set ``UPDATE`` moving studies in ``from_states`` (and matching ``where``) to ``to_state``.

    ``from_states`` is a list of states, or a mapping {state: extra condition for studies in that state,
    or None}: e.g. ``{STABLE: None, INFERRING: Study.claimed_at < lapsed}`` claims a stable study or one
    whose lease lapsed. Every from-state must be allowed to move to ``to_state`` (else
    :class:`InvalidTransition` at once). The statement's ``rowcount`` tells how many studies moved.
    """
    to_state = StudyState(to_state)
    if not isinstance(from_states, Mapping):
        from_states = dict.fromkeys(from_states)
    if not from_states:
        raise ValueError("guarded_update needs at least one state to move from")
    guards = []
    for state, extra in from_states.items():
        state = StudyState(state)
        check(state, to_state)
        guard = Study.state == state.value
        guards.append(guard if extra is None else and_(guard, extra))
    return (update(Study)
            .where(or_(*guards), *where)
            .values(**_values(to_state, now, reason, columns))
            .execution_options(synchronize_session=False))
