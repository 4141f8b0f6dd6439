from django.db import migrations

import openopen8.core.crypto
from openopen8.core.crypto import decrypt


def encrypt_keys(apps, schema_editor):
    # Rows written before this migration hold plaintext, which the field reads as is; saving writes it encrypted.
    Channel = apps.get_model("channels", "Channel")
    for channel in Channel.objects.only("pk", "api_key"):
        channel.save(update_fields=["api_key"])


def decrypt_keys(apps, schema_editor):
    # Going back to a plain column: write the plaintext past the field, which would encrypt it again.
    with schema_editor.connection.cursor() as cursor:
        cursor.execute("SELECT id, api_key FROM channels_channel")
        for pk, stored in cursor.fetchall():
            cursor.execute("UPDATE channels_channel SET api_key = %s WHERE id = %s", [decrypt(stored or ""), pk])


class Migration(migrations.Migration):

    dependencies = [
        ('channels', '0005_kind_choices_on_the_form'),
    ]

    operations = [
        migrations.AlterField(
            model_name='channel',
            name='api_key',
            field=openopen8.core.crypto.EncryptedTextField(blank=True, help_text='One per line; used in turn. For sd-webui with --api-auth, user:password.', verbose_name='API keys'),
        ),
        migrations.RunPython(encrypt_keys, decrypt_keys),
    ]
