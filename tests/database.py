"""The test run's databases: one migrated template per run, and a reset to it after each test
that commits.

**The template.** The migrations take ~25 s of CPU. Each xdist worker used to run them for its
own database, and each benchmark smoke test for its scratch database, all at once on a 2-core
machine. Now the first worker to need a database migrates one template (under an advisory lock;
the others wait for it), and every database of the run is a copy of it (``CREATE DATABASE …
TEMPLATE``, a block copy). Django still runs ``migrate`` on the copy, which finds nothing to do.
The run's controller drops the template at its end (``drop_template``).

**The pristine snapshot.** The template also keeps, in its schema ``test_pristine``, a copy of
every table the migrations left rows in (content types, permissions, groups, VAT rates, antifraud
rules …). After a test that commits, ``reset`` (one PL/pgSQL call) puts the database back as the
migrations left it: it truncates every table that has rows and should not, and every seeded
table whose rows differ from its snapshot, then copies the snapshot back into the seeded tables
that are now empty (their triggers off, so the copy writes no audit rows). Django's flush instead
truncated all ~270 tables and re-created content types and permissions after every such test
(~2 s each on a quiet machine, 5-9 s under load, for 144 tests), and emptied the seeded tables,
which fixtures then had to seed again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import psycopg
from django.conf import settings
from django.db import connections

SCHEMA = "test_pristine"  # spelled out in RESET_FUNCTION too
READY = "billing test template: migrated"

# The reset, installed in the template. ``_manifest`` lists the seeded tables, parents before
# children; every other table of the public schema (not a partition) must be empty.
RESET_FUNCTION = """
CREATE FUNCTION test_pristine.reset() RETURNS integer LANGUAGE plpgsql AS $fn$
DECLARE
    t text;
    kind "char";
    leaf text;
    rel text;
    cols text;
    has_rows boolean;
    differs boolean;
    n integer;
    dirty text[] := '{}';
    large text[] := '{}';
    -- A superuser (the usual test server) deletes with triggers and foreign-key checks off:
    -- a DELETE of a few rows is ~30x cheaper than a TRUNCATE (new files for a table and each
    -- of its indexes). Anyone else truncates.
    replica boolean := (SELECT rolsuper FROM pg_roles WHERE rolname = current_user);
BEGIN
    FOR t, kind IN
        SELECT c.relname, c.relkind FROM pg_class c
        WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p') AND NOT c.relispartition
          AND c.relname <> 'django_migrations'
          AND c.relname NOT IN (SELECT relname FROM test_pristine._manifest)
    LOOP
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM public.%I)', t) INTO has_rows;
        CONTINUE WHEN NOT has_rows;
        IF kind = 'r' THEN
            dirty := dirty || format('public.%I', t);
            CONTINUE;
        END IF;
        -- A partitioned table: only the partitions with rows (the hourly usage has ~80).
        FOR leaf IN SELECT relid::regclass::text FROM pg_partition_tree(format('public.%I', t)::regclass) WHERE isleaf
        LOOP
            EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s)', leaf) INTO has_rows;
            IF has_rows THEN dirty := dirty || leaf; END IF;
        END LOOP;
    END LOOP;
    FOR t IN SELECT relname FROM test_pristine._manifest ORDER BY position LOOP
        EXECUTE format(
            'SELECT (SELECT count(*) FROM public.%1$I) <> (SELECT count(*) FROM test_pristine.%1$I) '
            'OR EXISTS (SELECT x::text FROM public.%1$I x EXCEPT SELECT p::text FROM test_pristine.%1$I p)', t
        ) INTO differs;
        IF differs THEN dirty := dirty || format('public.%I', t); END IF;
    END LOOP;
    IF cardinality(dirty) = 0 THEN
        RETURN 0;
    END IF;
    IF replica THEN
        SET LOCAL session_replication_role = replica;
        FOREACH rel IN ARRAY dirty LOOP
            EXECUTE format('SELECT count(*) FROM (SELECT 1 FROM %s LIMIT 5001) s', rel) INTO n;
            IF n > 5000 THEN large := large || rel; ELSE EXECUTE 'DELETE FROM ' || rel; END IF;
        END LOOP;
    ELSE
        large := dirty;
    END IF;
    IF cardinality(large) > 0 THEN
        EXECUTE 'TRUNCATE ' || array_to_string(large, ', ') || ' CASCADE';
    END IF;
    -- A seeded table is now either as its snapshot or empty (emptied, or by CASCADE).
    FOR t IN SELECT relname FROM test_pristine._manifest ORDER BY position LOOP
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM public.%I)', t) INTO has_rows;
        CONTINUE WHEN has_rows;
        SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum) INTO cols
        FROM pg_attribute a
        WHERE a.attrelid = format('public.%I', t)::regclass AND a.attnum > 0 AND NOT a.attisdropped
          AND a.attgenerated = '';
        IF NOT replica THEN  -- the copy writes no audit rows
            EXECUTE format('ALTER TABLE public.%I DISABLE TRIGGER USER', t);
        END IF;
        EXECUTE format(
            'INSERT INTO public.%1$I (%2$s) OVERRIDING SYSTEM VALUE SELECT %2$s FROM test_pristine.%1$I', t, cols
        );
        IF NOT replica THEN
            EXECUTE format('ALTER TABLE public.%I ENABLE TRIGGER USER', t);
        END IF;
    END LOOP;
    RETURN cardinality(dirty);
END
$fn$
"""


def template_name() -> str:
    """The run's template: one per run (``BILLING_TEST_RUN``, set once by the run's controller)."""
    return f"test_billing_{settings.TEST_RUN_ID}_template"


def _server_url() -> str:
    database = settings.DATABASES["default"]
    host, port = database["HOST"] or "localhost", database["PORT"] or 5432
    password = f":{quote(database['PASSWORD'], safe='')}" if database.get("PASSWORD") else ""
    return f"postgresql://{quote(database['USER'], safe='')}{password}@{quote(host, safe='')}:{port}/postgres"


@contextlib.contextmanager
def server() -> Iterator[psycopg.Connection[Any]]:
    """A connection to the server's maintenance database, for creating and dropping databases."""
    with psycopg.connect(_server_url(), autocommit=True) as conn:
        yield conn


def _is_ready(conn: psycopg.Connection[Any], name: str) -> bool:
    row = conn.execute(
        "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s", [name]
    ).fetchone()
    return row is not None and row[0] == READY


def ensure_template() -> str:
    """The run's migrated template, built by the first caller (the others wait on the lock)."""
    name = template_name()
    with server() as conn:
        conn.execute("SELECT pg_advisory_lock(hashtext(%s))", [name])
        try:
            if not _is_ready(conn, name):
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                conn.execute(f'CREATE DATABASE "{name}"')
                _migrate_and_snapshot(name)
                conn.execute(f"COMMENT ON DATABASE \"{name}\" IS '{READY}'")
        finally:
            conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", [name])
    return name


def _migrate_and_snapshot(name: str) -> None:
    """Migrate the template in this process (as Django migrates a test database, under the
    session's clock), then snapshot what the migrations seeded."""
    from django.core.management import call_command

    connection = connections["default"]
    original = connection.settings_dict["NAME"]
    connection.close()
    connection.settings_dict["NAME"] = name
    try:
        call_command("migrate", verbosity=0, interactive=False, run_syncdb=True)
        with connection.cursor() as cursor:
            _snapshot(cursor)
    finally:
        connection.close()  # a template must have no session open when it is copied
        connection.settings_dict["NAME"] = original


def _snapshot(cursor: Any) -> None:
    cursor.execute(
        "SELECT c.relname FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace "
        "AND c.relkind IN ('r', 'p') AND NOT c.relispartition AND c.relname <> 'django_migrations' ORDER BY 1"
    )
    seeded = []
    for (table,) in cursor.fetchall():
        cursor.execute(f'SELECT EXISTS (SELECT 1 FROM public."{table}")')  # noqa: S608 (a name from pg_class)
        if cursor.fetchone()[0]:
            seeded.append(table)
    cursor.execute(
        "SELECT child.relname, parent.relname FROM pg_constraint k "
        "JOIN pg_class child ON child.oid = k.conrelid JOIN pg_class parent ON parent.oid = k.confrelid "
        "WHERE k.contype = 'f' AND child.relname = ANY(%s) AND parent.relname = ANY(%s) "
        "AND child.oid <> parent.oid",
        [seeded, seeded],
    )
    parents: dict[str, set[str]] = {table: set() for table in seeded}
    for child, parent in cursor.fetchall():
        parents[child].add(parent)
    ordered: list[str] = []
    while parents:
        ready = sorted(table for table, waits in parents.items() if not waits - set(ordered))
        if not ready:
            raise RuntimeError(f"seeded tables reference each other in a cycle: {sorted(parents)}")
        ordered += ready
        for table in ready:
            del parents[table]
    cursor.execute(f"CREATE SCHEMA {SCHEMA}")
    cursor.execute(f"CREATE TABLE {SCHEMA}._manifest (position integer PRIMARY KEY, relname text NOT NULL UNIQUE)")
    for position, table in enumerate(ordered):
        cursor.execute(f'CREATE TABLE {SCHEMA}."{table}" AS SELECT * FROM public."{table}"')  # noqa: S608
        cursor.execute(f"INSERT INTO {SCHEMA}._manifest VALUES (%s, %s)", [position, table])  # noqa: S608
    cursor.execute(RESET_FUNCTION)


def use_template() -> None:
    """Make the run's test databases copies of the template (before Django creates them)."""
    connections["default"].settings_dict["TEST"]["TEMPLATE"] = ensure_template()


def reset(alias: str = "default") -> int:
    """Put a committed-to test database back as the migrations left it; returns how many tables
    were truncated."""
    with connections[alias].cursor() as cursor:
        cursor.execute(f"SELECT {SCHEMA}.reset()")
        return int(cursor.fetchone()[0])


def create_copy(name: str) -> None:
    """A database of the run's own on the test server, as the migrations leave it."""
    with server() as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{ensure_template()}"')


def drop(name: str) -> None:
    with server() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def drop_template() -> None:
    drop(template_name())
