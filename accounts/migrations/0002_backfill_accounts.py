"""An Account, with the skeleton of its name, for every user made before accounts
had one. Of existing users whose names look alike, the oldest keeps the skeleton."""

from django.db import migrations


def backfill(apps, schema_editor):
    from accounts.names import skeleton

    User = apps.get_model("auth", "User")
    Account = apps.get_model("accounts", "Account")
    taken = set(Account.objects.exclude(name_skeleton=None).values_list("name_skeleton", flat=True))
    have = set(Account.objects.values_list("user_id", flat=True))
    for user_id, username in User.objects.order_by("pk").values_list("pk", "username"):
        if user_id in have:
            continue
        shape = skeleton(username)
        Account.objects.create(user_id=user_id, name_skeleton=None if shape in taken else shape)
        taken.add(shape)


class Migration(migrations.Migration):
    dependencies = [("accounts", "0001_account")]
    operations = [migrations.RunPython(backfill, migrations.RunPython.noop)]
