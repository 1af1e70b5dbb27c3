"""Celery tasks of the accounts app (none yet: lifecycle changes come from other apps\x27 tasks)."""
