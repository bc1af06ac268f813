"""The full-text index of message bodies, on PostgreSQL only (domain/search.py).

An expression index rather than a stored tsvector column: no column to keep in
step, nothing in the model's state, and the embedded SQLite default (which has no
tsvector) runs the same migrations. Its expression and predicate are the ones
search.py queries with, word for word, or the planner could not use it.
"""

from django.db import migrations

CREATE = (
    "CREATE INDEX IF NOT EXISTS message_body_search ON realtime_message "
    "USING gin (to_tsvector('simple'::regconfig, body)) WHERE deleted_at IS NULL"
)
DROP = "DROP INDEX IF EXISTS message_body_search"


def on_postgresql(sql):
    def run(apps, schema_editor):
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.execute(sql)

    return run


class Migration(migrations.Migration):

    dependencies = [
        ("realtime", "0006_reactions_mentions"),
    ]

    operations = [
        migrations.RunPython(on_postgresql(CREATE), on_postgresql(DROP)),
    ]
