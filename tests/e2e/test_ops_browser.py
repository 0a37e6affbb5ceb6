"""The ops console in Debian's headless Chromium (selenium and the system chromedriver):
sign in, read the per-partner numbers against an independent count, see the no-consumer
alert, replay a dead letter with its button, and keep a screenshot for the README."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from partnerbus.entrypoints.web import create_ops_app
from partnerbus.testing import wait_until

from .ops_scenario import depth, independent_count, scripted_run, serving
from .test_ops_console import OPS_PASSWORD, OPS_USER, console_settings

pytestmark = pytest.mark.rabbitmq

README_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "img" / "ops-console.png"
"""Rewritten only when `PARTNERBUS_SCREENSHOT=1` (`make screenshot`): a test run leaves the
tree as it found it."""


def _browser() -> tuple[str, str]:
    """The machine's Chromium and chromedriver; in CI their absence fails (`.ci/run`
    installs them), elsewhere the test is skipped, saying why."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    if os.environ.get("CI"):
        pytest.fail("Chromium or chromedriver is not installed (CI must install them: .ci/run)")
    pytest.skip(
        "Chromium and chromedriver are not installed: apt-get install chromium chromium-driver"
    )


def _driver(chromium: str, driver: str, profile: Path):  # type: ignore[no-untyped-def]
    # selenium is a dev dependency (pyproject.toml): missing, the test fails, never skips
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1100",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    # The system chromedriver, not selenium's manager (no download is possible here).
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


async def test_the_console_in_headless_chromium(bus, channel, tmp_path):
    chromium, driver_path = _browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    run = await scripted_run(bus, channel)
    count = await independent_count(bus, channel, run.target)
    source = await independent_count(bus, channel, "lmh-recouvrement")
    settings = console_settings(bus, tmp_path, ops_refresh_s=1.0)
    web = create_ops_app(settings, bus.directory, bus.store)
    dlq = bus.topology.dlq_name(bus.topology.signal_queue.name)
    async with serving(web) as url:
        browser = await asyncio.to_thread(_driver, chromium, driver_path, tmp_path / "profile")

        def arrived(by: str, value: str) -> Any:
            """The element once the page that holds it has loaded (15 s at most)."""
            return WebDriverWait(browser, 15).until(
                expected_conditions.presence_of_element_located((by, value))
            )

        try:

            def sign_in() -> str:
                browser.get(url + "/")  # no session: the login form, no figure
                assert browser.current_url.endswith("/login")
                assert not browser.find_elements(By.CSS_SELECTOR, "#partners")
                form = browser.find_element(By.ID, "ops-login")
                form.find_element(By.NAME, "user").clear()
                form.find_element(By.NAME, "user").send_keys(OPS_USER)
                form.find_element(By.NAME, "password").send_keys(OPS_PASSWORD)
                form.find_element(By.ID, "ops-signin").click()
                # the click returns before the redirect's page is loaded: wait for it
                arrived(By.ID, "partners")
                return browser.current_url

            landed = await asyncio.to_thread(sign_in)
            assert landed == url + "/"

            def row_cells(partner: str) -> dict[str, str]:
                # read in one script: htmx may swap the figures in between two reads
                cells: dict[str, str] = browser.execute_script(
                    """
                    const row = document.getElementById('partner-' + arguments[0]);
                    const out = {};
                    for (const td of row.querySelectorAll('td[data-col]')) {
                        out[td.dataset.col] = td.textContent.trim().split(' ')[0];
                    }
                    return out;
                    """,
                    partner,
                )
                return cells

            target = await asyncio.to_thread(row_cells, run.target)
            assert target["queued"] == str(count.queued)
            assert target["consumers"] == str(count.consumers) == "0"
            assert target["accepted"] == str(count.accepted) == "1"
            assert target["rejected"] == str(count.rejected) == "1"
            assert target["awaiting"] == str(count.awaiting) == "1"
            assert target["sent"] == str(count.sent)
            assert (await asyncio.to_thread(row_cells, "lmh-recouvrement"))["received"] == str(
                source.received
            )

            def alert_for(partner: str) -> str:
                text: str = browser.execute_script(
                    "return document.querySelector(arguments[0]).title",
                    f'#alerts [data-kind="no-consumer"][data-partner="{partner}"]',
                )
                return text

            assert "no consumer" in await asyncio.to_thread(alert_for, run.target)

            def htmx_refreshes() -> str:
                # htmx swaps the figures in without a reload: the snapshot time moves on
                stamp = "return document.getElementById('snapshot-at').textContent"
                first = browser.execute_script(stamp)
                browser.execute_script("window.__kept = true")
                for _ in range(100):
                    now: str = browser.execute_script(stamp)
                    if now != first:
                        assert browser.execute_script("return window.__kept === true")
                        return now
                    browser.execute_async_script(
                        "const done = arguments[arguments.length - 1]; setTimeout(done, 100)"
                    )
                raise AssertionError("the figures were not refreshed")

            await asyncio.to_thread(htmx_refreshes)

            shot = (
                README_SCREENSHOT
                if os.environ.get("PARTNERBUS_SCREENSHOT") == "1"
                else tmp_path / "ops-console.png"
            )

            def screenshot() -> None:
                browser.set_window_size(1400, 1500)
                assert browser.save_screenshot(str(shot))

            await asyncio.to_thread(screenshot)
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

            before = len(bus.verdicts)

            def replay() -> str:
                selector = f'tr[data-message-id="{run.bad_message_id}"]'
                for _ in range(100):  # a retention pass may hold it a moment: next snapshot
                    browser.get(url + "/letters")
                    rows = browser.find_elements(By.CSS_SELECTOR, selector)
                    if rows:
                        break
                    browser.execute_async_script(
                        "const done = arguments[arguments.length - 1]; setTimeout(done, 200)"
                    )
                else:
                    raise AssertionError("the dead letter is not listed")
                rows[0].find_element(By.CSS_SELECTOR, "button.replay").click()
                return arrived(By.ID, "notice").text

            notice = await asyncio.to_thread(replay)
            assert notice == f"{run.bad_message_id} replayed"
        finally:
            await asyncio.to_thread(browser.quit)
    # it went back to its intake queue: the service decided it again (still broken, it
    # died again), and the replay is in the audit trail under the ops sign-in
    await bus.wait_verdicts(before + 1)
    assert any(v.outcome == "refused" for _, v in bus.verdicts[before:])

    async def back_in_dead_letters() -> bool:
        return await depth(bus, dlq) == 1

    await wait_until(back_in_dead_letters, timeout=20)
    assert bus.store.count("audit", action="dead-letter-replayed", subject=run.bad_message_id) == 1
    await run.agency_inbox.close()
