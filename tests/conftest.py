from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(autouse=True)
def images_in_tmp(settings: Any, tmp_path: Path) -> Path:
    """Every test hosts its images in its own folder."""
    location = tmp_path / "images"
    settings.STORAGES = {**settings.STORAGES, "images": {
        "BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": location}}}
    return location
