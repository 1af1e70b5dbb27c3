from django.apps import AppConfig


class AuditConfig(AppConfig):
    name = "billing_site.audit"
    label = "audit"
    verbose_name = "Audit trail"

    def ready(self) -> None:
        from celery.signals import task_postrun, task_prerun

        from billing_site.audit import tasks

        task_prerun.connect(tasks.task_started, weak=False, dispatch_uid="audit.task_started")
        task_postrun.connect(tasks.task_finished, weak=False, dispatch_uid="audit.task_finished")
