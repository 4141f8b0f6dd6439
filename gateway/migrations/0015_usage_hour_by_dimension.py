from django.db import migrations, models


def forget_totals(apps, schema_editor):
    # Totals by combination give way to totals by each dimension: the next sweep (or dashboard view) adds the
    # hours up again from the usage rows.
    apps.get_model("gateway", "UsageHour").objects.all().delete()
    apps.get_model("gateway", "RolledHour").objects.all().delete()


class Migration(migrations.Migration):

    dependencies = [
        ("gateway", "0014_verbose_names"),
    ]

    operations = [
        migrations.RunPython(forget_totals, migrations.RunPython.noop),
        migrations.RemoveIndex(model_name="usagehour", name="usagehour_hour"),
        migrations.RemoveField(model_name="usagehour", name="model"),
        migrations.RemoveField(model_name="usagehour", name="channel_id"),
        migrations.RemoveField(model_name="usagehour", name="token_id"),
        migrations.RemoveField(model_name="usagehour", name="group_id"),
        migrations.AddField(model_name="usagehour", name="dimension",
                            field=models.CharField(default="all", max_length=10), preserve_default=False),
        migrations.AddField(model_name="usagehour", name="key",
                            field=models.CharField(blank=True, help_text="Empty: no channel, token or group.",
                                                   max_length=100)),
        migrations.AddIndex(model_name="usagehour",
                            index=models.Index(fields=["dimension", "hour"], name="usagehour_dimension_hour")),
    ]
