from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from metering import eventstore


class Command(BaseCommand):
    help = (
        "Print the event store's DDL: for a ClickHouse cluster (ReplicatedReplacingMergeTree behind a Distributed "
        "table, sharded by the event's shard) with --cluster, else for one ClickHouse (what the embedded engine runs)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--cluster", help="The cluster's name in the servers' remote_servers configuration.")
        parser.add_argument("--database", default="billing", help="The database on the cluster (default: billing).")

    def handle(self, *args: Any, cluster: str | None = None, database: str = "billing", **options: Any) -> None:
        retention = settings.METERING_EVENT_RETENTION_DAYS
        if cluster:
            statements = eventstore.cluster_ddl(cluster=cluster, database=database, retention_days=retention)
        else:
            statements = [eventstore.local_ddl(retention_days=retention)]
        self.stdout.write(";\n\n".join(statements) + ";")
