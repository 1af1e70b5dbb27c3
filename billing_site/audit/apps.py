from django.apps import AppConfig


class AuditConfig(AppConfig):
    name = "billing_site.audit"
    label = "audit"
    verbose_name = "Audit trail"
    # Every operator group reads the trail (who changed what is part of answering a customer,
    # checking a refund or a block); read-only gets it as every app's view permissions.
    operator_permissions: dict[str, tuple[str, ...]] = {
        "support": ("view_auditevent",),
        "finance": ("view_auditevent",),
        "fraud": ("view_auditevent",),
    }

    def ready(self) -> None:
        from celery.signals import task_postrun, task_prerun

        from billing_site.audit import tasks

        task_prerun.connect(tasks.task_started, weak=False, dispatch_uid="audit.task_started")
        task_postrun.connect(tasks.task_finished, weak=False, dispatch_uid="audit.task_finished")
