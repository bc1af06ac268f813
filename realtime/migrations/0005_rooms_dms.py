# Rooms people make (kind, topic) and direct messages (dm_key: one room per set of people).

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('realtime', '0004_room_epoch'),
    ]

    operations = [
        migrations.AddField(
            model_name='room',
            name='dm_key',
            field=models.CharField(blank=True, editable=False, max_length=200, null=True, unique=True),
        ),
        migrations.AddField(
            model_name='room',
            name='kind',
            field=models.CharField(choices=[('room', 'Room'), ('dm', 'Direct message')], default='room', max_length=8),
        ),
        migrations.AddField(
            model_name='room',
            name='topic',
            field=models.CharField(blank=True, default='', max_length=250),
        ),
    ]
