"""A real browser for the UI tests: Debian's headless Chromium driven by Selenium through Debian's chromium-driver
(no browser downloads; `.ci/run` installs both). Pages are checked by what they show; every check that fails
keeps a screenshot and names it."""

import contextlib
import shutil
import time
from pathlib import Path

NEEDS = "Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver; .ci/run installs them)"


class Browser:
    def __init__(self, driver, shots: Path):
        self.driver = driver
        self.shots = shots

    def open(self, url: str) -> None:
        self.driver.get(url)

    def text(self) -> str:
        """What the page shows (the body's rendered text)."""
        try:
            return self.driver.execute_script("return document.body ? document.body.innerText : ''") or ""
        except Exception:  # the page is being replaced
            return ""

    def rows(self) -> list[str]:
        """The text of each table row on the page (HTML tables and grids)."""
        return self.driver.execute_script(
            "return Array.from(document.querySelectorAll('tr, [role=row]'), r => r.innerText)") or []

    def scroll_to(self, text: str) -> None:
        """Scroll the first element whose own text is ``text`` to the top of the window."""
        self.driver.execute_script("""const it = document.evaluate(`//*[normalize-space(text())='${arguments[0]}']`,
            document, null, XPathResult.FIRST_ORDERED_NODE_TYPE, null).singleNodeValue;
            if (it) it.scrollIntoView({block: 'start'});""", text)

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def fail(self, name: str, why: str) -> None:
        path = self.shot(f"{name}-failed")
        raise AssertionError(f"{why} (at {self.driver.current_url}; screenshot {path}); the page shows:\n"
                             f"{self.text()[:3000]}")

    def wait_for(self, name: str, *texts: str, seconds: float = 60) -> str:
        """Wait until the page shows every one of ``texts``; return its text. ``name``: the screenshot's."""
        deadline = time.monotonic() + seconds
        while True:
            text = self.text()
            missing = [t for t in texts if t not in text]
            if not missing:
                return text
            if time.monotonic() > deadline:
                self.fail(name, f"the page did not show {missing} within {seconds:g} s")
            time.sleep(0.5)

    def find(self, name: str, css: str, seconds: float = 30, where=None):
        """Wait for the visible elements matching ``css`` (those ``where`` accepts, if given); return them."""
        from selenium.webdriver.common.by import By

        deadline = time.monotonic() + seconds
        while True:
            try:
                found = [e for e in self.driver.find_elements(By.CSS_SELECTOR, css)
                         if e.is_displayed() and (where is None or where(e))]
            except Exception:  # an element went stale while the page redraws
                found = []
            if found:
                return found
            if time.monotonic() > deadline:
                self.fail(name, f"no visible {css!r} within {seconds:g} s")
            time.sleep(0.5)

    def click(self, name: str, text: str, seconds: float = 30) -> None:
        """Click the first visible element whose own text is ``text``, in any case (a tab, a file, a button)."""
        from selenium.webdriver.common.by import By

        upper = "translate(normalize-space(text()), 'abcdefghijklmnopqrstuvwxyz', 'ABCDEFGHIJKLMNOPQRSTUVWXYZ')"
        deadline = time.monotonic() + seconds
        while True:
            try:
                found = [e for e in self.driver.find_elements(By.XPATH, f"//*[{upper}='{text.upper()}']")
                         if e.is_displayed()]
                if found:
                    found[0].click()
                    return
            except Exception:  # an element went stale while the page redraws
                pass
            if time.monotonic() > deadline:
                self.fail(name, f"nothing shown as {text!r} to click within {seconds:g} s")
            time.sleep(0.5)


@contextlib.contextmanager
def chromium(shots: Path, width: int = 1600, height: int = 1000):
    """A headless Chromium window; its screenshots go to ``shots``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert binary and driver, f"the browser tests need {NEEDS}"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}",
                "--disable-gpu", "--no-first-run", f"--user-data-dir={shots / 'chromium-profile'}"):
        options.add_argument(arg)
    shots.mkdir(parents=True, exist_ok=True)
    d = webdriver.Chrome(options=options, service=Service(driver))
    try:
        yield Browser(d, shots)
    finally:
        d.quit()
