#!/usr/bin/env python
import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "billing_site.settings.base")
    import django
    from django.core.management import execute_from_command_line

    if len(sys.argv) > 1 and sys.argv[1] not in ("runserver", "help", "--help", "-h"):
        # Changes a command writes are in the audit trail as made by ``command:<name>`` (a
        # command may name its own actor and reason inside: billing_site/common/audit.py).
        django.setup()
        from billing_site.common.actors import Actor
        from billing_site.common.audit import audit_context

        with audit_context(actor=Actor.system(f"command:{sys.argv[1]}"), command=sys.argv[1]):
            execute_from_command_line(sys.argv)
        return
    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
