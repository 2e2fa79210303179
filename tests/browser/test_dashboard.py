"""The dashboard in a real browser (headless Chromium, over HTTPS with the pinned service key), on a practice
that went through the broker, ingest and the pipeline: log in with a second factor, triage the panel, read a
CGM and a blood-pressure patient's charts, acknowledge an alert, log time — and the refusals (another team's
patient, a forged form, an idle session). Every page and chart must load without a Content-Security-Policy
violation (no inline script or style anywhere)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, timedelta

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import Select

from tests.browser import seed as practice
from tests.browser.conftest import Practice, csp_violations, log_in, screenshot, wait
from warehouse.audit import AuditLog

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("browser")]


@pytest.fixture(autouse=True)
def no_csp_violations(browser: WebDriver) -> Iterator[None]:
    csp_violations(browser)  # drain what an earlier test left
    yield
    assert csp_violations(browser) == []


@pytest.fixture
def clinician(clinic: Practice, browser: WebDriver) -> WebDriver:
    """The browser with Dr. Okafor logged in (logging in again, with a fresh TOTP code, only if needed)."""
    browser.get(f"{clinic.url}/account")
    if not browser.find_elements(By.ID, "logout") or practice.CLINICIAN not in browser.page_source:
        log_in(browser, clinic, practice.CLINICIAN, totp=True)
    return browser


def rows(driver: WebDriver) -> list[tuple[str, str]]:
    return [(tr.get_attribute("data-patient-id") or "", tr.get_attribute("data-category") or "")
            for tr in driver.find_elements(By.CSS_SELECTOR, "#panel tbody tr")]


def audited(clinic: Practice, **match: object) -> list[dict]:
    """Audit records whose fields (and query fields, as ``query_<name>``) equal ``match``."""
    def fits(r: dict) -> bool:
        for key, want in match.items():
            have = r.get("query", {}).get(key[6:]) if key.startswith("query_") else r.get(key)
            if have != want:
                return False
        return True
    return [r for r in AuditLog(clinic.s).records() if fits(r)]


def charts_loaded(driver: WebDriver) -> None:
    """Every chart image on the page fetched and decoded (an SVG refused or broken has no natural width)."""
    wait(driver).until(lambda d: d.execute_script(
        "const imgs = [...document.querySelectorAll('figure.chart img')];"
        "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);"))


def svg_points(driver: WebDriver, path: str) -> int:
    """Open one chart by its URL and count its drawn points; the image carries no script."""
    driver.get(path)
    wait(driver).until(EC.presence_of_element_located((By.CSS_SELECTOR, "svg.pygal-chart")))
    assert driver.find_elements(By.TAG_NAME, "script") == []
    return len(driver.find_elements(By.CSS_SELECTOR, "circle.dot"))


def test_a_clinician_logs_in_with_a_second_factor_and_sees_the_panel_in_triage_order(clinic, browser):
    browser.delete_all_cookies()
    browser.get(f"{clinic.url}/panel")
    wait(browser).until(EC.url_contains("/login?next=/panel"))
    browser.find_element(By.ID, "username").send_keys(practice.CLINICIAN)
    browser.find_element(By.ID, "password").send_keys("correct horse battery staple")
    browser.find_element(By.ID, "login").click()
    assert "TOTP code" in wait(browser).until(EC.presence_of_element_located((By.ID, "login-error"))).text
    browser.find_element(By.ID, "password").send_keys("correct horse battery staple")
    browser.find_element(By.ID, "totp").send_keys(clinic.totp(practice.CLINICIAN))
    browser.find_element(By.ID, "login").click()
    wait(browser).until(EC.presence_of_element_located((By.ID, "panel")))

    assert browser.current_url.endswith("/panel")
    assert rows(browser) == list(zip(practice.TRIAGE_ORDER, ["alert-1", "no-data-72h", "no-data-24h",
                                                             "glucose-low", "billing", "on-track"], strict=True))
    assert practice.OTHER_TEAM_PATIENT not in browser.page_source
    first = browser.find_element(By.CSS_SELECTOR, "#panel tbody tr")
    assert "Severe BP" in first.text and "Urgent" in first.text
    assert browser.find_element(By.ID, "tile-alerts").text.startswith("1")
    assert screenshot(browser, "panel").stat().st_size > 10_000
    login = audited(clinic, actor=practice.CLINICIAN, action="login", outcome="ok")
    panel = audited(clinic, actor=practice.CLINICIAN, action="panel", query_via="web")
    assert login and panel and set(panel[-1]["patients"]) == set(practice.TRIAGE_ORDER)


def test_the_panel_filters_by_category_and_condition_and_sorts(clinic, clinician):
    clinician.get(f"{clinic.url}/panel")
    Select(clinician.find_element(By.ID, "filter-flag")).select_by_value("no-data")
    clinician.find_element(By.ID, "apply").click()
    wait(clinician).until(EC.url_contains("flag=no-data"))
    assert [pid for pid, _ in rows(clinician)] == ["pt-0103", "pt-0104"]

    clinician.get(f"{clinic.url}/panel?sort=name")
    assert [pid for pid, _ in rows(clinician)] == sorted(
        practice.TRIAGE_ORDER, key=lambda pid: practice.PATIENTS[pid][1])
    clinician.get(f"{clinic.url}/panel?condition=diabetes")
    assert [pid for pid, _ in rows(clinician)] == [practice.CGM_PATIENT]
    clinician.get(f"{clinic.url}/panel")
    clinician.find_element(By.ID, "tile-billing").click()
    wait(clinician).until(EC.url_contains("flag=billing"))
    assert [pid for pid, _ in rows(clinician)] == ["pt-0105"]


def test_a_cgm_patient_shows_the_glucose_profile_time_in_ranges_and_resolved_lows(clinic, clinician):
    clinician.get(f"{clinic.url}/panel")
    clinician.find_element(By.CSS_SELECTOR, f"tr[data-patient-id='{practice.CGM_PATIENT}'] a.patient-link").click()
    wait(clinician).until(EC.presence_of_element_located((By.ID, "glucose")))
    charts_loaded(clinician)
    figures = [f.get_attribute("data-chart") for f in clinician.find_elements(By.CSS_SELECTOR, "figure.chart")]
    assert figures == ["glucose-profile", "time-in-ranges", "blood_glucose"]
    resolved = clinician.find_element(By.ID, "resolved-alerts").text
    assert "Low glucose" in resolved and "back in range" in resolved
    assert clinician.find_elements(By.CSS_SELECTOR, "#open-alerts") == []
    assert "Time in range" in clinician.find_element(By.ID, "glucose-metrics").text
    assert screenshot(clinician, "cgm-patient").stat().st_size > 10_000

    base = f"{clinic.url}/patients/{practice.CGM_PATIENT}/charts"
    # The profile: the median of every hour of the day; the 30 days: each day's lowest, mean and highest.
    assert svg_points(clinician, f"{base}/glucose-profile.svg") == clinic.seeded.cgm_hours == 24
    assert svg_points(clinician, f"{base}/blood_glucose.svg") == 3 * clinic.seeded.cgm_days
    assert len(clinician.find_elements(By.CSS_SELECTOR, "rect.band")) == 4  # very low, low, target, very high
    svg_points(clinician, f"{base}/time-in-ranges.svg")
    assert len(clinician.find_elements(By.CSS_SELECTOR, "g.legend")) == 5  # very low .. very high
    charts = audited(clinic, actor=practice.CLINICIAN, action="chart", patients=[practice.CGM_PATIENT])
    assert {r["query"]["metric"] for r in charts} >= {"glucose-profile", "blood_glucose"}


def test_a_bp_patient_has_threshold_shaded_charts_and_an_alert_is_acknowledged(clinic, clinician):
    clinician.get(f"{clinic.url}/patients/{practice.BP_PATIENT}")
    charts_loaded(clinician)
    resolved = clinician.find_element(By.ID, "resolved-alerts").text
    assert "Stage 2 BP" in resolved and "back in range" in resolved
    assert screenshot(clinician, "bp-patient").stat().st_size > 10_000
    severe = clinician.find_element(By.CSS_SELECTOR, "#open-alerts tr[data-rule='bp_severe']")
    alert_id = severe.get_attribute("data-alert-id")
    severe.find_element(By.NAME, "note").send_keys("Called the patient: repeat reading in 30 min")
    severe.find_element(By.CSS_SELECTOR, "button.ack-button").click()
    wait(clinician).until(EC.presence_of_element_located((By.ID, "done")))
    acked = clinician.find_element(By.CSS_SELECTOR, f"#open-alerts tr[data-alert-id='{alert_id}']")
    assert f"✓ {practice.CLINICIAN}" in acked.text and "repeat reading" in acked.text
    ack = audited(clinic, actor=practice.CLINICIAN, action="ack", query_via="web")
    assert ack and ack[-1]["patients"] == [practice.BP_PATIENT] and ack[-1]["query"]["alert_id"] == alert_id

    counts = clinic.seeded.readings[practice.BP_PATIENT]
    base = f"{clinic.url}/patients/{practice.BP_PATIENT}/charts"
    assert svg_points(clinician, f"{base}/blood_pressure.svg") == 2 * counts["blood_pressure"]  # sys + dia
    assert len(clinician.find_elements(By.CSS_SELECTOR, "rect.band")) == 2          # stage 2, severe
    assert len(clinician.find_elements(By.CSS_SELECTOR, "path.threshold")) == 2     # diastolic 90, 120
    assert svg_points(clinician, f"{base}/heart_rate.svg") == counts["heart_rate"]


def test_billing_evidence_lists_the_readings_behind_each_counted_day(clinic, clinician):
    clinician.get(f"{clinic.url}/patients/pt-0106")
    days = int(clinician.find_element(By.ID, "device-days").text)
    evidence = clinician.find_element(By.CSS_SELECTOR, "details.evidence")
    evidence.find_element(By.TAG_NAME, "summary").click()
    rows = wait(clinician).until(lambda d: [r for r in evidence.find_elements(By.CSS_SELECTOR, "tbody tr")
                                            if r.is_displayed()])
    assert len(rows) == days >= 16
    assert all("bp-0106" in r.text and "Blood pressure" in r.text for r in rows)
    assert clinician.find_element(By.ID, "minutes").text == str(practice.LOGGED_MINUTES["pt-0106"])
    assert audited(clinic, actor=practice.CLINICIAN, action="billing-evidence", patients=["pt-0106"])


def test_time_is_logged_and_can_be_back_dated_into_the_previous_month(clinic, clinician):
    patient = "pt-0105"
    clinician.get(f"{clinic.url}/patients/{patient}")

    def log(minutes: int, on: date | None, interactive: bool) -> None:
        clinician.find_element(By.ID, "time-minutes").send_keys(str(minutes))
        if on is not None:  # a date input's typing order follows the locale: set its value instead
            clinician.execute_script("document.getElementById('time-date').value = arguments[0]", on.isoformat())
        if interactive:
            clinician.find_element(By.ID, "time-interactive").click()
        clinician.find_element(By.ID, "time-submit").click()
        wait(clinician).until(EC.presence_of_element_located((By.ID, "done")))

    log(12, None, interactive=True)
    assert clinician.find_element(By.ID, "minutes").text == "12"
    earlier = (date.today().replace(day=1) - timedelta(days=1)).replace(day=3)
    log(7, earlier, interactive=False)
    assert clinician.find_element(By.ID, "minutes").text == "12"  # counted in the month it happened
    logged = audited(clinic, actor=practice.CLINICIAN, action="log-time", query_via="web")
    assert [(r["query"]["minutes"], r["patients"]) for r in logged[-2:]] == [(12, [patient]), (7, [patient])]
    assert logged[-1]["query"]["date"] == earlier.isoformat()


def test_a_forged_form_without_the_csrf_token_is_refused_and_recorded(clinic, clinician):
    clinician.get(f"{clinic.url}/patients/{practice.BP_PATIENT}")
    before = clinician.find_element(By.ID, "minutes").text
    # What a page elsewhere would post: the same form without this session's token.
    clinician.execute_script("document.querySelector('#time-form input[name=csrf]').remove()")
    clinician.find_element(By.ID, "time-minutes").send_keys("30")
    clinician.find_element(By.ID, "time-submit").click()
    detail = wait(clinician).until(EC.presence_of_element_located((By.ID, "error-detail"))).text
    assert "CSRF token" in detail and clinician.find_element(By.TAG_NAME, "h1").text == "Not allowed"
    clinician.get(f"{clinic.url}/patients/{practice.BP_PATIENT}")
    assert clinician.find_element(By.ID, "minutes").text == before
    assert audited(clinic, actor=practice.CLINICIAN, action="log-time",
                   outcome="denied: missing or wrong CSRF token")


def test_another_teams_patient_is_refused_and_the_refusal_is_audited(clinic, clinician):
    other = practice.OTHER_TEAM_PATIENT
    for path in (f"/patients/{other}", f"/patients/{other}/charts/blood_pressure.svg"):
        clinician.get(f"{clinic.url}{path}")
        detail = wait(clinician).until(EC.presence_of_element_located((By.ID, "error-detail"))).text
        assert "not on the care team" in detail
        assert clinician.find_element(By.TAG_NAME, "h1").text == "Not allowed"
        assert "Hughes" not in clinician.page_source
    denied = audited(clinic, actor=practice.CLINICIAN, outcome="denied: not on care team", patients=[other])
    assert {(r["action"], r["query"]["via"]) for r in denied} == {("patient", "web"), ("chart", "web")}


def test_an_idle_session_ends_and_login_returns_to_the_page(clinic, clinician):
    clinic.age_sessions(practice.CLINICIAN)
    clinician.get(f"{clinic.url}/patients/{practice.CGM_PATIENT}")
    wait(clinician).until(EC.presence_of_element_located((By.ID, "expired")))
    assert "/login?next=/patients/" in clinician.current_url
    clinician.find_element(By.ID, "username").send_keys(practice.CLINICIAN)
    clinician.find_element(By.ID, "password").send_keys("correct horse battery staple")
    clinician.find_element(By.ID, "totp").send_keys(clinic.totp(practice.CLINICIAN))
    clinician.find_element(By.ID, "login").click()
    wait(clinician).until(EC.presence_of_element_located((By.ID, "patient-name")))
    assert clinician.current_url.endswith(f"/patients/{practice.CGM_PATIENT}")


def test_the_auditor_reads_the_log_filtered_with_its_verification_verdict(clinic, browser):
    log_in(browser, clinic, "audit-1")
    assert browser.current_url.endswith("/audit")
    assert "Verified" in browser.find_element(By.ID, "verdict").text
    browser.find_element(By.ID, "filter-actor").send_keys(practice.CLINICIAN)
    Select(browser.find_element(By.ID, "filter-outcome")).select_by_value("denied")
    browser.find_element(By.ID, "apply").click()
    wait(browser).until(EC.url_contains("outcome=denied"))
    records = browser.find_elements(By.CSS_SELECTOR, "#audit tbody tr[data-seq]")
    assert records and all(r.get_attribute("data-actor") == practice.CLINICIAN and
                           (r.get_attribute("data-outcome") or "").startswith("denied") for r in records)
    assert practice.OTHER_TEAM_PATIENT in browser.find_element(By.ID, "audit").text
    browser.get(f"{clinic.url}/panel")  # not an auditor's page
    assert browser.find_element(By.TAG_NAME, "h1").text == "Not allowed"
    assert audited(clinic, actor="audit-1", outcome="denied: role auditor may not panel")

