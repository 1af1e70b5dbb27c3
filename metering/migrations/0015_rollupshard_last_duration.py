"""How long each shard's last rollup run took (``RollupShard.last_duration_ms``), for the
rollup-shards page, the staff home page and ``/metrics``. A nullable column: no rewrite."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("metering", "0014_hourlyusage_monthly_partitions"),
    ]

    operations = [
        migrations.AddField(
            model_name="rollupshard",
            name="last_duration_ms",
            field=models.PositiveIntegerField(blank=True, null=True),
        ),
    ]
