"""The trail as one queryable model: pghistory's ``Events`` (every event table, aggregated,
with each event's ``pgh_diff``: field → [before, after]) and the context's keys as columns."""

from __future__ import annotations

import pghistory
from django.db import models
from pghistory.models import Events


class AuditEvent(Events):
    """One change to a tracked record: ``pgh_obj_model`` and ``pgh_obj_id`` say which,
    ``pgh_label`` how (insert, update, delete), ``pgh_diff`` what, the proxied context who,
    why and from where (``billing_site.common.audit``)."""

    actor_kind = pghistory.ProxyField("pgh_context__actor_kind", models.TextField(null=True))
    actor = pghistory.ProxyField("pgh_context__actor", models.TextField(null=True))
    reason = pghistory.ProxyField("pgh_context__reason", models.TextField(null=True))
    url = pghistory.ProxyField("pgh_context__url", models.TextField(null=True))
    task = pghistory.ProxyField("pgh_context__task", models.TextField(null=True))

    class Meta:
        proxy = True
        verbose_name = "audit event"
        verbose_name_plural = "audit trail"
