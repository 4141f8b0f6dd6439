"""A real browser for the console's tests: Debian's Chromium driven by its ChromeDriver through selenium, headless,
against a live server that serves the static files too. ``make test`` installs both where it can; where they are
missing the tests skip and say so."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import SkipTest

from django.contrib.auth.models import User
from django.contrib.staticfiles.testing import StaticLiveServerTestCase

CHROMIUM = os.environ.get("OPENOPEN8_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("OPENOPEN8_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")
MISSING = ("Chromium and ChromeDriver are not installed (Debian packages chromium and chromium-driver; make test "
           "installs them where apt-get may run): the browser tests are skipped")
PASSWORD = "console-pw-4821"
_profiles: dict[int, str] = {}  # each browser's profile folder, removed when it stops


def start_browser(*, language: str = "en-US", width: int = 1440, height: int = 900, downloads: Path | None = None
                  ) -> Any:
    """A headless Chromium asking for pages in ``language``, with a window of that size, saving downloads in
    ``downloads``. Raises ``SkipTest`` where there is none."""
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        raise SkipTest(MISSING)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="oo8-chromium-")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={profile}",
                 f"--window-size={width},{height}", f"--lang={language}"):
        options.add_argument(flag)
    prefs: dict[str, Any] = {"intl.accept_languages": language}
    if downloads is not None:
        prefs.update({"download.default_directory": str(downloads), "download.prompt_for_download": False})
    options.add_experimental_option("prefs", prefs)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    # The page gets exactly that size (a headless window's would lose some to the window's own frame).
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                                  "deviceScaleFactor": 1, "mobile": width < 600})
    _profiles[id(driver)] = profile
    return driver


def stop_browser(driver: Any) -> None:
    try:
        driver.quit()
    finally:
        shutil.rmtree(_profiles.pop(id(driver)), ignore_errors=True)


def wait_for(check: Callable[[], Any], *, within: float = 10.0) -> Any:
    """``check()``'s first true answer, tried until ``within`` seconds have passed."""
    deadline = time.monotonic() + within
    while True:
        try:
            answer = check()
        except Exception:  # an element not there yet, a page still loading
            answer = None
        if answer:
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"not so within {within} s: {check}")
        time.sleep(0.1)


class BrowserTestCase(StaticLiveServerTestCase):
    """A live console and a browser (one per class) that logs in as a staff operator through the login form."""

    language = "en-US"
    width, height = 1440, 900
    browser: Any
    downloads: Path

    @classmethod
    def setUpClass(cls) -> None:
        cls.downloads = Path(tempfile.mkdtemp(prefix="oo8-downloads-"))
        cls.browser = start_browser(language=cls.language, width=cls.width, height=cls.height,
                                    downloads=cls.downloads)
        super().setUpClass()

    @classmethod
    def tearDownClass(cls) -> None:
        super().tearDownClass()
        stop_browser(cls.browser)
        shutil.rmtree(cls.downloads, ignore_errors=True)

    def setUp(self) -> None:
        super().setUp()
        self.browser.delete_all_cookies()
        self.operator = User.objects.create_superuser("operator", "ops@example.com", PASSWORD)

    def open(self, path: str) -> Any:
        self.browser.get(f"{self.live_server_url}{path}")
        return self.browser

    def log_in(self, then: str = "/") -> None:
        """Through the login form, as an operator does; lands on ``then``."""
        from selenium.webdriver.common.by import By

        self.open(f"/admin/login/?next={then}")
        self.browser.find_element(By.NAME, "username").send_keys("operator")
        self.browser.find_element(By.NAME, "password").send_keys(PASSWORD)
        self.browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
        wait_for(lambda: "/admin/login/" not in self.browser.current_url)

    def text(self, css: str = "body") -> str:
        from selenium.webdriver.common.by import By

        return str(self.browser.find_element(By.CSS_SELECTOR, css).text)

    def downloaded(self, suffix: str = ".csv", *, within: float = 10.0) -> Path:
        """The file the browser finished downloading (and takes it away, for the next download)."""
        def done() -> Path | None:
            files = [p for p in self.downloads.iterdir() if p.name.endswith(suffix)]
            return files[0] if files else None

        path: Path = wait_for(done, within=within)
        moved = Path(tempfile.mkdtemp(prefix="oo8-download-")) / path.name
        shutil.move(path, moved)
        return moved
