import signal
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from metering import pipeline


class Command(BaseCommand):
    help = (
        "The scale path's worker (METERING_EVENT_STORE=clickhouse): drain the event log into the event store and "
        "compute the dirty hours into hourly usage, until stopped (SIGTERM/SIGINT finish the pass in hand)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--seconds", type=float, help="Stop after this many seconds.")
        parser.add_argument(
            "--until-idle", action="store_true", help="Stop once the log is drained and no hour is dirty."
        )
        parser.add_argument("--rollup-every", type=float, default=2.0, help="Seconds between rollups while busy.")
        parser.add_argument("--max-messages", type=int, default=200, help="Log messages (batches) per sink pass.")

    def handle(self, *args: Any, **options: Any) -> None:
        if settings.METERING_EVENT_STORE != "clickhouse":
            raise CommandError("METERING_EVENT_STORE is not clickhouse: events go to PostgreSQL, nothing to drain.")
        stopping = False

        def stop(signum: int, frame: object) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        report = pipeline.run(
            seconds=options["seconds"],
            until_idle=options["until_idle"],
            rollup_every=options["rollup_every"],
            max_messages=options["max_messages"],
            stop=lambda: stopping,
        )
        self.stdout.write(
            f"{report.messages} log messages stored in {report.sink_passes} sink passes; "
            f"{report.rollups} rollups over {report.events_rolled_up} events"
        )
