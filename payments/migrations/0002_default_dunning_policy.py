from django.db import migrations


def create_default(apps, schema_editor):
    DunningPolicy = apps.get_model("payments", "DunningPolicy")
    DunningPolicy.objects.get_or_create(
        currency="",
        account_kind="",
        is_active=True,
        defaults={
            "name": "Default",
            "retry_days": [1, 3, 5],
            "email_on_failure": True,
            "warn_days_before_suspension": 2,
            "suspend_after_days": 7,
            "write_off_after_days": 60,
        },
    )


class Migration(migrations.Migration):
    dependencies = [("payments", "0001_initial")]
    operations = [migrations.RunPython(create_default, migrations.RunPython.noop)]
