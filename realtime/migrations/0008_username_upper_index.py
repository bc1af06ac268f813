"""An index of usernames without regard to case, on PostgreSQL only, for the @names a
message resolves (domain/mentions.py and roomlog.MENTIONS_CTE compare
UPPER(username), as Django's `iexact` does) and for the people lookup
(selectors.people: UPPER(username) LIKE 'BO%', hence text_pattern_ops, which
serves both the equality and the prefix): without it each send that names someone
reads the whole user table.

On the user model's table (auth's, or a project's own), named by that model's
metadata; an expression index, so nothing in the model's state changes.
"""

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import migrations

NAME = "realtime_username_upper"


def table_and_column():
    # The model itself: a migration's historical model has no USERNAME_FIELD.
    model = get_user_model()
    return model._meta.db_table, model._meta.get_field(model.USERNAME_FIELD).column


def create(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        quote = schema_editor.quote_name
        table, column = table_and_column()
        schema_editor.execute(f"CREATE INDEX IF NOT EXISTS {NAME} ON {quote(table)} (UPPER({quote(column)}::text) text_pattern_ops)")


def drop(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"DROP INDEX IF EXISTS {NAME}")


class Migration(migrations.Migration):

    dependencies = [
        ("realtime", "0007_message_search"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.RunPython(create, drop),
    ]
