import django.db.models
from django.db import migrations

import realtime.models


def distinct_epochs(apps, schema_editor):
    # AddField fills existing rows with one value: give each room its own.
    Room = apps.get_model("realtime", "Room")
    for room in Room.objects.only("pk"):
        Room.objects.filter(pk=room.pk).update(epoch=realtime.models.new_epoch())


class Migration(migrations.Migration):

    dependencies = [
        ("realtime", "0003_read_state"),
    ]

    operations = [
        migrations.AddField(
            model_name="room",
            name="epoch",
            field=django.db.models.CharField(default=realtime.models.new_epoch, editable=False, max_length=16),
        ),
        migrations.RunPython(distinct_epochs, migrations.RunPython.noop),
    ]
