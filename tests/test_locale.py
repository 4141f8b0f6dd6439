"""The console's Simplified Chinese catalogue (locale/zh_Hans): every string of the project's own console pages is
translated, and the compiled catalogue the gateway loads is the one its .po file says."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib import admin
from django.contrib.auth.models import User
from django.db.models import Field
from django.test import SimpleTestCase, TestCase
from django.utils import translation

from tests.factories import make_channel, make_token

CATALOGUE = Path(settings.BASE_DIR) / "locale" / "zh_Hans" / "LC_MESSAGES"
ZH = {"Accept-Language": "zh-CN,zh;q=0.9"}


def console_strings() -> Iterator[tuple[str, Any]]:
    """(where, lazy string) for what the console shows of the project's models: names, fields, help, choices,
    columns, filters and actions."""
    for model, model_admin in admin.site._registry.items():
        meta = model._meta
        if meta.app_label not in ("gateway", "channels"):
            continue
        yield f"{meta.label} name", meta.verbose_name
        yield f"{meta.label} plural", meta.verbose_name_plural
        for field in meta.get_fields():
            if not isinstance(field, Field) or field.name == "id":
                continue
            yield f"{meta.label}.{field.name}", field.verbose_name
            if field.help_text:
                yield f"{meta.label}.{field.name} help", field.help_text
            for value, label in getattr(field, "flatchoices", None) or ():
                if value:
                    yield f"{meta.label}.{field.name}={value}", label
        for column_name in model_admin.list_display:
            column = getattr(model_admin, str(column_name), None)
            if callable(column) and hasattr(column, "short_description"):
                yield f"{meta.label} column {column_name}", column.short_description
        for filter_ in model_admin.list_filter:
            if isinstance(filter_, type) and hasattr(filter_, "title"):
                yield f"{meta.label} filter {filter_.__name__}", filter_.title
        for action_name in model_admin.actions or ():
            action = getattr(model_admin, str(action_name), None)
            if action is not None and hasattr(action, "short_description"):
                yield f"{meta.label} action {action_name}", action.short_description


class CatalogueTests(SimpleTestCase):
    maxDiff = None

    def test_every_console_string_of_the_projects_models_reads_in_chinese(self) -> None:
        untranslated = []
        for where, text in console_strings():
            with translation.override("en"):
                english = str(text)
            with translation.override("zh-hans"):
                chinese = str(text)
            if chinese == english:
                untranslated.append(f"{where}: {english!r}")
        self.assertEqual(untranslated, [], "mark these with _() and translate them in locale/zh_Hans")

    def test_the_catalogue_has_no_empty_or_fuzzy_entry(self) -> None:
        po = (CATALOGUE / "django.po").read_text()
        entries = po.split("\n\n")[1:]  # past the header
        self.assertGreater(len(entries), 300)
        bad = [e for e in entries if "#, fuzzy" in e or re.search(r'msgstr(\[0\])? ""\Z', e.strip())]
        self.assertEqual(bad, [])

    def test_the_compiled_catalogue_is_the_po_files(self) -> None:
        msgfmt = shutil.which("msgfmt")
        if msgfmt is None:
            self.skipTest("msgfmt (Debian's gettext) is not installed")
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([msgfmt, "--check", "-o", f"{tmp}/django.mo", str(CATALOGUE / "django.po")], check=True)
            self.assertEqual(Path(f"{tmp}/django.mo").read_bytes(), (CATALOGUE / "django.mo").read_bytes(),
                             "run: msgfmt -o locale/zh_Hans/LC_MESSAGES/django.mo locale/zh_Hans/LC_MESSAGES/django.po")


class ChineseConsoleTests(TestCase):
    def setUp(self) -> None:
        self.client.force_login(User.objects.create_superuser("root", "root@example.com", "pw"))

    def test_a_chinese_browser_reads_the_projects_pages_and_messages_in_chinese(self) -> None:
        index = self.client.get("/admin/", headers=ZH).content.decode()
        for text in ("OpenOpen8 控制台", "API 令牌", "上游渠道", "使用记录", "仪表盘", "告警"):
            self.assertIn(text, index)
        form = self.client.get("/admin/gateway/apitoken/add/", headers=ZH).content.decode()
        self.assertIn("允许的模型", form)
        self.assertIn("留空表示不限", form)
        dashboard = self.client.get("/admin/dashboard/", headers=ZH).content.decode()
        self.assertIn("最近 24 小时", dashboard)
        self.assertIn("当前故障渠道", dashboard)
        channel = make_channel(name="east")
        done = self.client.post("/admin/channels/channel/", {"action": "disable", "_selected_action": [channel.pk]},
                                headers=ZH, follow=True).content.decode()
        self.assertIn("已停用 1 个渠道。", done)
        english = self.client.get("/admin/", headers={"Accept-Language": "en"}).content.decode()
        self.assertIn("API tokens", english)
        self.assertNotIn("令牌", english)

    def test_a_price_mistake_is_explained_in_chinese(self) -> None:
        make_token()
        r = self.client.post("/admin/gateway/price/add/", {"model": "gpt-image-2", "size": "1024X1024 ", "quality": "",
                                                           "usd_per_image": "-0.05",
                                                           "effective_from_0": "2026-01-01",
                                                           "effective_from_1": "00:00:00"}, headers=ZH)
        page = r.content.decode()
        self.assertIn("价格不能小于零。", page)

    def test_a_channel_config_mistake_is_explained_in_chinese(self) -> None:
        r = self.client.post("/admin/channels/channel/add/", {
            "name": "x", "kind": "openai", "served_models": "", "model_map": "{}", "endpoints": ["generations"],
            "priority": "0", "weight": "1", "end_user": "client", "config": "[1, 2]"}, headers=ZH)
        page = r.content.decode()
        self.assertIn("配置必须是一个由设置项组成的 JSON 对象", page)
        self.assertIn("请至少填写一个此渠道提供的模型。", page)
