"""Browser fixtures: one seeded practice and one running service per module, and Debian's headless Chromium
driven by Selenium through Debian's chromium-driver (nothing downloaded).

The browser trusts the service's certificate by pinning its public key
(``--ignore-certificate-errors-spki-list``): the one key our CA signed for the service, not every certificate.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyotp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from core.settings import Settings
from rpmctl import services
from rpmctl.tools.publish import wait_until
from service.accounts import Accounts
from service.server import url
from tests.browser import seed as practice
from tests.conftest import fresh_settings

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[2] / "var" / "test-artifacts" / "browser"  # git-ignored (/var/)
PASSWORD = "correct horse battery staple"
WAIT_S = 15
os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never fetch a driver or a browser


@pytest.fixture(scope="session", autouse=True)
def chromium_installed() -> None:
    """The browser tests are part of the suite: without the browser they fail (never skip) and say why."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: make system installs Debian's chromium and chromium-driver")


@dataclass
class Practice:
    """The seeded practice behind the running service."""
    s: Settings
    url: str
    seeded: practice.Seeded
    totp_uri: str
    last_step: dict[str, int] = field(default_factory=dict)  # TOTP steps used per account (each works once)

    def totp(self, username: str) -> str:
        """A code the service accepts now and has not seen: of this 30-second step or the next (it accepts
        one step either side), else — both spent — of the next step once the clock reaches it."""
        totp = pyotp.parse_uri(self.totp_uri)
        used = self.last_step.get(username, -1)

        def fresh() -> int | None:
            now = int(time.time()) // totp.interval
            return next((step for step in (now, now + 1) if step > used), None)

        wait_until(lambda: fresh() is not None, totp.interval + 1, what="an unused TOTP step")
        step = fresh()
        assert step is not None
        self.last_step[username] = step
        return totp.at(step * totp.interval)

    def age_sessions(self, username: str) -> None:
        """What an idle spell longer than the limit does to the account's stored sessions."""
        with sqlite3.connect(Accounts(self.s).path) as db:
            db.execute("UPDATE sessions SET last_seen = last_seen - ? WHERE username = ?",
                       [(self.s.session_idle_minutes + 1) * 60, username])


@pytest.fixture(scope="module")
def clinic() -> Iterator[Practice]:
    with fresh_settings() as s:
        seeded = practice.seed(s)
        accounts = Accounts(s)
        _, uri = accounts.add(practice.CLINICIAN, "clinician", PASSWORD, clinician_id=practice.CLINICIAN,
                              totp=True)
        accounts.add("audit-1", "auditor", PASSWORD)
        assert uri is not None
        yield Practice(s, url(s), seeded, uri)
        services.down(s)


def spki_pin(cert_path: Path) -> str:
    """base64(SHA-256(SubjectPublicKeyInfo)) of a certificate: what Chromium's pin list takes."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@pytest.fixture(scope="module")
def browser(clinic: Practice) -> Iterator[WebDriver]:
    profile = tempfile.mkdtemp(prefix="rpm-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--user-data-dir={profile}", "--window-size=1360,900", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-default-apps", "--disable-extensions", "--metrics-recording-only",
                f"--ignore-certificate-errors-spki-list={spki_pin(Path(clinic.s.pki_dir) / 'service.crt')}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait(driver: WebDriver, timeout: float = WAIT_S) -> WebDriverWait:
    return WebDriverWait(driver, timeout, poll_frequency=0.05)


def log_in(driver: WebDriver, clinic: Practice, username: str, totp: bool = False, next_path: str = "") -> None:
    """The login form as a person fills it (with the authenticator's code when the account has one)."""
    driver.delete_all_cookies()
    driver.get(f"{clinic.url}/login" + (f"?next={next_path}" if next_path else ""))
    wait(driver).until(EC.presence_of_element_located((By.ID, "username")))
    driver.find_element(By.ID, "username").send_keys(username)
    driver.find_element(By.ID, "password").send_keys(PASSWORD)
    if totp:
        driver.find_element(By.ID, "totp").send_keys(clinic.totp(username))
    driver.find_element(By.ID, "login").click()
    wait(driver).until(EC.presence_of_element_located((By.ID, "logout")))


def csp_violations(driver: WebDriver) -> list[str]:
    """Console messages of refused inline script or style since the last call (the pages must cause none)."""
    return [e["message"] for e in driver.get_log("browser") if "Content Security Policy" in e["message"]]


def screenshot(driver: WebDriver, name: str) -> Path:
    """The whole page (beyond the window) as a PNG under the git-ignored artifacts folder."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = driver.execute_cdp_cmd("Page.captureScreenshot",  # type: ignore[attr-defined]
                                  {"format": "png", "captureBeyondViewport": True})
    path = ARTIFACTS / f"{name}.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    return path
