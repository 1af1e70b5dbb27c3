"""Every change a Celery task writes is in the trail as made by ``task:<name>`` with the task's
id (connected to Celery's ``task_prerun``/``task_postrun`` by ``AuditConfig.ready``); a service
inside the task that names its own actor and reason adds them (``audit_context``)."""

from __future__ import annotations

import contextlib
from typing import Any

from billing_site.common.actors import Actor
from billing_site.common.audit import audit_context

# The audit context of each running task (by task id), entered at prerun and left at postrun.
_running: dict[str, contextlib.ExitStack] = {}


def task_started(task_id: str | None = None, task: Any = None, **_: object) -> None:
    if task_id is None or task is None:
        return
    stack = contextlib.ExitStack()
    stack.enter_context(audit_context(actor=Actor.system(f"task:{task.name}"), task=task.name, task_id=task_id))
    _running[task_id] = stack


def task_finished(task_id: str | None = None, **_: object) -> None:
    stack = _running.pop(task_id or "", None)
    if stack is not None:
        stack.close()
