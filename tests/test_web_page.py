"""The web worklist page in a real browser: Debian's ``chromium`` driven by Playwright (its
sync API, the system executable: no browser download) against a ``cxr-worker serve``
subprocess fed by dcmtk ``storescu``.

What a reader sees: sign-in (and nothing, neither page nor API, without a token), the
suspected study above the normal one, the NOT SCORED reason, a study stored while the page is
open shown within 5 s without a reload (keeping the selection and the scroll position),
keyboard navigation that opens a study with its heatmap and a toggle, filters, "mark read".
What an admin sees: a dead letter (a PACS that does not answer, ``max_attempts = 1``) retried
once the PACS is up, sending paused and resumed, the PACS link's last C-ECHO, a study
replayed. Each view passes axe-core (injected by the test) with no serious or critical
violation, and the page throws no script error.

Screenshots are saved under the test's ``tmp_path`` (``screenshots/``). With
``CXR_WORKER_WEB_SCREENSHOT=PATH`` the worklist is also saved to ``PATH`` (how
``docs/worklist.png`` is made)::

    CXR_WORKER_WEB_SCREENSHOT=docs/worklist.png .venv/bin/python -m pytest \\
        tests/test_web_page.py -k reader
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import SAMPLES, free_port, storescu, wait_until

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(),
                       reason=f"{CHROMIUM} is absent (Debian package chromium: apt-get install "
                       "chromium); the browser tests drive the system browser"),
]

SUSPECTED_FILE = SAMPLES / "cr_pa_pneumonia_12bit_rescale.dcm"
NORMAL_FILE = SAMPLES / "dx_pa_normal_8bit.dcm"
REFUSED_FILE = SAMPLES / "dx_lateral_refused.dcm"
LATER_FILE = SAMPLES / "cr_pa_normal_12bit.dcm"
SERIOUS = ("serious", "critical")


def accession(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).AccessionNumber)


def api_get(base: str, token: str, path: str) -> tuple[int, Any]:
    req = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read() or b"null")


def studies(base: str, token: str, query: str = "") -> list[dict[str, Any]]:
    status, body = api_get(base, token, f"/api/v1/studies?limit=500{query}")
    assert status == 200, body
    return list(body["studies"])


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield b
        b.close()


class Page:
    """A browser page on the worker's web server, with its script errors collected and
    screenshots saved as artifacts."""

    def __init__(self, browser: Any, base: str, shots: Path) -> None:
        self.base = base
        self.shots = shots
        shots.mkdir(exist_ok=True)
        self.context = browser.new_context(viewport={"width": 1280, "height": 800})
        self.page = self.context.new_page()
        self.page.set_default_timeout(15000)
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path

    def axe(self, what: str) -> None:
        """axe-core in the page: no serious or critical violation."""
        from axe_playwright_python.sync_playwright import Axe

        found = Axe().run(self.page).response["violations"]
        bad = [f"{v['id']} ({v['impact']}): {v['help']} at "
               f"{[n['target'] for n in v['nodes']][:5]}"
               for v in found if v["impact"] in SERIOUS]
        assert not bad, f"axe-core on {what}:\n" + "\n".join(bad)

    def sign_in(self, token: str) -> None:
        from playwright.sync_api import expect

        page = self.page
        page.goto(self.base + "/")
        page.get_by_label("API token").fill(token)
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("#worklist")).to_be_visible()

    def row(self, acc: str) -> Any:
        return self.page.locator("#studies tr.row").filter(
            has=self.page.get_by_role("button", name=acc, exact=True))

    def accessions(self) -> list[str]:
        return list(self.page.locator("#studies tr.row button.open").all_inner_texts())

    def selected_uid(self) -> str | None:
        return self.page.evaluate(
            "document.querySelector('#studies tr.row[aria-current=true]')?.dataset.uid ?? null")

    def focused_uid(self) -> str | None:
        return self.page.evaluate("document.activeElement?.dataset?.uid ?? null")

    def close(self) -> None:
        self.context.close()
        assert not self.errors, f"script errors in the page: {self.errors}"


def base_of(worker: Any) -> str:
    return f"http://127.0.0.1:{worker.env['CXR_WORKER__HTTP__PORT']}"


def token(worker: Any, name: str, role: str) -> str:
    return str(worker.cli("token", "create", "--name", name, "--role", role).stdout.strip())


class Pacs:
    """A PACS that is down until :meth:`start` (a pynetdicom storage SCP)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[str] = []
        self._server: Any = None
        self._lock = threading.Lock()

    def start(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title="PACS")
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)

        def on_store(event: Any) -> int:
            with self._lock:
                self.received.append(str(event.request.AffectedSOPInstanceUID))
            return 0x0000

        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, on_store)])

    def env(self) -> dict[str, str]:
        """The worker's settings for this PACS."""
        return {"CXR_WORKER__PACS__AE_TITLE": "PACS", "CXR_WORKER__PACS__HOST": "127.0.0.1",
                "CXR_WORKER__PACS__PORT": str(self.port),
                "CXR_WORKER__PACS__TIMEOUT_SECONDS": "5",
                "CXR_WORKER__PACS__CONNECT_TIMEOUT_SECONDS": "2"}

    def count(self) -> int:
        with self._lock:
            return len(self.received)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()


@pytest.fixture
def pacs() -> Iterator[Pacs]:
    p = Pacs()
    yield p
    p.stop()


@dataclass
class Studies:
    """The reader scenario's studies by accession number, as the API lists them."""

    base: str
    token: str
    susp: str = field(default_factory=lambda: accession(SUSPECTED_FILE))
    normal: str = field(default_factory=lambda: accession(NORMAL_FILE))
    refused: str = field(default_factory=lambda: accession(REFUSED_FILE))
    later: str = field(default_factory=lambda: accession(LATER_FILE))
    by_acc: dict[str, dict[str, Any]] = field(default_factory=dict)

    def uid(self, acc: str) -> str:
        return str(self.by_acc[acc]["study_instance_uid"])


def test_reader_worklist_in_a_browser(make_worker, browser, pacs, tmp_path):
    pacs.start()
    worker = make_worker(**pacs.env())
    base = base_of(worker)
    st = Studies(base, token(worker, "dr-reader", "reader"))
    shots = tmp_path / "screenshots"
    without_a_token_the_page_and_the_api_refuse(browser, base, shots)

    # three studies: suspected, normal, refused by the gate
    storescu(worker.port, SUSPECTED_FILE, NORMAL_FILE, REFUSED_FILE)

    def all_done() -> bool:
        rows = studies(base, st.token)
        return len(rows) == 3 and all(r["status"] in ("sent", "not_scored") for r in rows)

    wait_until(all_done, 60, "the three studies scored and their results sent")
    st.by_acc = {r["accession_number"]: r for r in studies(base, st.token)}
    assert st.by_acc[st.susp]["label"] == "SUSPECTED PNEUMONIA"
    assert st.by_acc[st.normal]["label"] == "NO PNEUMONIA DETECTED"
    assert st.by_acc[st.refused]["label"] == "NOT SCORED"

    ui = Page(browser, base, shots)
    ui.sign_in(st.token)
    the_list_in_bands(ui, st)
    keyboard_opens_a_study(ui, st)
    a_new_study_shows_without_a_reload(ui, st, worker.port)
    filters(ui, st)
    mark_read(ui, st)
    sign_out(ui, base)
    ui.close()


def without_a_token_the_page_and_the_api_refuse(browser: Any, base: str, shots: Path) -> None:
    from playwright.sync_api import expect

    anon = Page(browser, base, shots)
    page = anon.page
    page.goto(base + "/")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    expect(page.locator("#worklist")).to_be_hidden()
    assert page.request.get(base + "/api/v1/studies").status == 401
    assert page.request.get(base + "/api/v1/events").status == 401
    page.get_by_label("API token").fill("cxr_" + "A" * 43)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("not valid")
    expect(page.locator("#worklist")).to_be_hidden()
    anon.axe("the sign-in")
    anon.shot("01-sign-in")
    anon.close()


def the_list_in_bands(ui: Page, st: Studies) -> None:
    from playwright.sync_api import expect

    page = ui.page
    expect(page.locator("#studies tr.row")).to_have_count(3)
    listed = ui.accessions()
    assert listed.index(st.susp) < listed.index(st.normal) < listed.index(st.refused), listed
    # the bands, the label, the probability (two decimals and a bar), the delivery
    expect(page.locator("tbody.band-suspected")).to_contain_text("Suspected pneumonia")
    expect(page.locator("tbody.band-suspected")).to_contain_text(st.susp)
    expect(page.locator("tbody.band-routine")).to_contain_text(st.normal)
    srow = ui.row(st.susp)
    expect(srow.locator(".label")).to_have_text("SUSPECTED PNEUMONIA")
    p = st.by_acc[st.susp]["probability"]
    expect(srow.locator(".prob .num")).to_have_text("> 0.99" if p > 0.99 else f"{p:.2f}")
    width = srow.locator(".bar .fill").evaluate("e => e.style.width")
    assert width == f"{round(min(1, p) * 100)}%"
    expect(srow.locator(".dlv")).to_have_text("Sent")
    expect(srow.locator(".kinds")).to_contain_text("SC sent")
    assert re.fullmatch(r"(< 0\.01|0\.\d\d)",
                        ui.row(st.normal).locator(".prob .num").inner_text())
    # the NOT SCORED reason
    rrow = ui.row(st.refused)
    expect(rrow.locator(".label")).to_have_text("NOT SCORED")
    expect(rrow.locator(".reason")).to_contain_text("view_position")
    expect(rrow.locator(".reason")).to_have_text(st.by_acc[st.refused]["reason"])
    # the thumbnail with the heatmap (a scored study), the plain one (not scored)
    img = srow.locator("td.thumb img")
    expect(img).to_have_attribute("src", re.compile(r"/heatmap\.png\?size=\d+$"))
    wait_until(lambda: img.evaluate("i => i.complete && i.naturalWidth > 0"), 15,
               "the heatmap thumbnail")
    expect(rrow.locator("td.thumb img")).to_have_attribute(
        "src", re.compile(r"/thumbnail\.png\?size=\d+$"))
    # a reader has no admin view, even asked for by its address
    expect(page.get_by_role("button", name="Admin")).to_be_hidden()
    page.evaluate("location.hash = '#admin'")
    expect(page.locator("#worklist")).to_be_visible()
    expect(page.locator("#admin")).to_be_hidden()
    page.evaluate("history.replaceState(null, '', location.pathname)")
    expect(page.locator("#live")).to_have_text(re.compile("^Live"))
    ui.axe("the worklist")
    ui.shot("02-worklist")


def keyboard_opens_a_study(ui: Page, st: Studies) -> None:
    """j/k and the arrows move, Enter opens, Esc closes (the focus back on the row)."""
    from playwright.sync_api import expect

    page = ui.page
    page.locator("#main").focus()
    page.keyboard.press("j")
    assert ui.selected_uid() == ui.focused_uid() == st.uid(st.susp)
    page.keyboard.press("j")
    assert ui.selected_uid() == st.uid(st.normal)
    page.keyboard.press("k")
    assert ui.selected_uid() == st.uid(st.susp)
    page.keyboard.press("ArrowDown")
    assert ui.selected_uid() == ui.focused_uid() == st.uid(st.normal)
    page.keyboard.press("Enter")
    dialog = page.locator("dialog#study")
    expect(dialog).to_be_visible()
    expect(dialog.get_by_role("heading")).to_have_text(f"Study {st.normal}")
    facts = dialog.locator("#study-facts")
    expect(facts).to_contain_text(st.by_acc[st.normal]["model_version"])
    expect(facts.locator(".fact", has_text="Threshold")).to_contain_text(
        f"{st.by_acc[st.normal]['threshold']:.2f}")
    for term in ("Study time", "Received", "Scored", "Sent"):
        expect(facts.locator("dt", has_text=re.compile(f"^{term}$"))).to_have_count(1)
    # the modality's Study Date + Time, as written in the sample (no zone conversion)
    expect(facts.locator(".fact", has_text="Study time")).to_contain_text("2026-01-01 12:00")
    picture = dialog.locator("figure img.radiograph")
    expect(picture).to_have_attribute("src", re.compile(r"/heatmap\.png\?size=\d+$"))
    wait_until(lambda: picture.evaluate("i => i.complete && i.naturalWidth > 0"), 15,
               "the study's image")
    toggle = dialog.get_by_label("Show the heatmap")
    expect(toggle).to_be_checked()
    ui.axe("a study")
    ui.shot("03-study")
    toggle.uncheck()
    expect(picture).to_have_attribute("src", re.compile(r"/thumbnail\.png\?size=\d+$"))
    toggle.check()
    expect(picture).to_have_attribute("src", re.compile(r"/heatmap\.png\?size=\d+$"))
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    assert ui.focused_uid() == st.uid(st.normal)


def a_new_study_shows_without_a_reload(ui: Page, st: Studies, dicom_port: int) -> None:
    """Stored while the page is open: listed within 5 s, without a reload, keeping the
    selection and the scroll position (a short window, so that the list scrolls)."""
    from playwright.sync_api import expect

    page = ui.page
    page.set_viewport_size({"width": 1280, "height": 420})
    page.keyboard.press("j")  # the NOT SCORED study, at the bottom
    assert ui.selected_uid() == st.uid(st.refused)
    rrow = ui.row(st.refused)
    page.evaluate("window.__sameDocument = true")
    top_before = rrow.evaluate("r => r.getBoundingClientRect().top")
    scroll_before = page.evaluate("window.scrollY")
    assert scroll_before > 0
    storescu(dicom_port, LATER_FILE)
    t0 = time.monotonic()
    expect(ui.row(st.later)).to_be_visible(timeout=5000)
    assert time.monotonic() - t0 < 5
    # scored in a moment; then the rows stand still
    expect(ui.row(st.later).locator(".label")).to_have_text("NO PNEUMONIA DETECTED",
                                                            timeout=60000)
    assert page.evaluate("window.__sameDocument") is True  # no reload
    assert ui.selected_uid() == ui.focused_uid() == st.uid(st.refused)
    assert page.evaluate("window.scrollY") > scroll_before  # the new row is above it ...
    assert abs(rrow.evaluate("r => r.getBoundingClientRect().top") - top_before) <= 2  # held
    listed = ui.accessions()
    assert listed.index(st.normal) < listed.index(st.later) < listed.index(st.refused), listed
    page.set_viewport_size({"width": 1280, "height": 800})
    page.evaluate("window.scrollTo(0, 0)")
    assert ui.shot("04-worklist-live").stat().st_size > 0
    if os.environ.get("CXR_WORKER_WEB_SCREENSHOT"):  # the README's picture
        page.locator("#main").focus()  # no focus ring in the picture
        page.screenshot(path=os.environ["CXR_WORKER_WEB_SCREENSHOT"])


def filters(ui: Page, st: Studies) -> None:
    from playwright.sync_api import expect

    page = ui.page
    rows = page.locator("#studies tr.row")
    page.get_by_label("Accession number").fill(st.normal)
    page.get_by_role("button", name="Apply").click()
    expect(rows).to_have_count(1)
    assert ui.accessions() == [st.normal]
    assert f"accession={st.normal}" in page.url
    page.get_by_role("button", name="Clear").click()
    expect(rows).to_have_count(4)
    page.get_by_label("Status").select_option("suspected")
    page.get_by_role("button", name="Apply").click()
    expect(rows).to_have_count(1)
    assert ui.accessions() == [st.susp]
    page.get_by_role("button", name="Clear").click()
    expect(rows).to_have_count(4)


def mark_read(ui: Page, st: Studies) -> None:
    """The study leaves the list (who and when are recorded); put back from "Marked read"."""
    from playwright.sync_api import expect

    page = ui.page
    ui.row(st.susp).get_by_role("button", name=f"Mark read {st.susp}").click()
    expect(ui.row(st.susp)).to_have_count(0)
    expect(page.locator("#toast")).to_contain_text(f"{st.susp} marked read")
    [read] = studies(st.base, st.token, "&read=read")
    assert (read["accession_number"], read["read_by"]) == (st.susp, "dr-reader")
    assert st.susp not in [r["accession_number"] for r in studies(st.base, st.token)]
    page.get_by_label("Show").select_option("read")
    page.get_by_role("button", name="Apply").click()
    expect(page.locator("#studies tr.row")).to_have_count(1)
    expect(ui.row(st.susp)).to_contain_text("Read by dr-reader")
    ui.row(st.susp).get_by_role("button", name=f"Put back {st.susp}").click()
    expect(ui.row(st.susp)).to_have_count(0)
    assert st.susp in [r["accession_number"] for r in studies(st.base, st.token)]


def sign_out(ui: Page, base: str) -> None:
    """The sign-in again, and the cookie no longer opens the API."""
    from playwright.sync_api import expect

    page = ui.page
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    assert page.request.get(base + "/api/v1/studies").status == 401
    page.reload()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()


def test_admin_retries_a_dead_letter_in_a_browser(make_worker, browser, pacs, tmp_path):
    # the PACS is down and a result gets one try: a dead letter
    worker = make_worker(**pacs.env(), CXR_WORKER__JOBS__MAX_ATTEMPTS="1")
    base = base_of(worker)
    admin = token(worker, "ops", "admin")
    storescu(worker.port, SUSPECTED_FILE)
    susp = accession(SUSPECTED_FILE)
    [study] = wait_until(lambda: [r for r in studies(base, admin)
                                  if r["status"] == "undelivered"],
                         60, "the result's delivery to fail")
    # it keeps its result and its place
    assert study["label"] == "SUSPECTED PNEUMONIA" and study["band"] == "suspected"

    ui = Page(browser, base, tmp_path / "screenshots")
    ui.sign_in(admin)
    the_dead_letter_is_retried(ui, pacs, susp)
    sending_is_paused_and_resumed(ui, admin)
    a_study_is_replayed(ui, pacs, susp)
    ui.close()


def the_dead_letter_is_retried(ui: Page, pacs: Pacs, susp: str) -> None:
    """The admin view shows the dead letter, the PACS link's failed C-ECHO; once the PACS is
    up, retry sends the result again."""
    from playwright.sync_api import expect

    page = ui.page
    expect(ui.row(susp).locator(".dlv")).to_have_text("Undelivered: sending failed")
    expect(ui.row(susp).locator(".kinds")).to_have_text("SC failed")
    page.get_by_role("button", name="Admin").click()
    expect(page.locator("#admin")).to_be_visible()
    assert page.url.endswith("#admin")
    dead = page.locator("#dead tbody tr")
    expect(dead).to_have_count(1)
    expect(dead).to_contain_text(susp)
    # why: the send failed, and the PACS's error
    expect(dead.locator(".why")).to_contain_text("failed")
    expect(dead.locator(".why")).to_contain_text(f"PACS@127.0.0.1:{pacs.port}")
    queue = page.locator("#queue")
    expect(queue.locator(".fact", has_text="Dead letters")).to_contain_text("1")
    pacs_card = page.locator("#pacs")
    expect(pacs_card).to_contain_text(f"127.0.0.1:{pacs.port}")
    expect(pacs_card).to_contain_text("PACS")
    expect(pacs_card.locator(".fact", has_text="Last C-ECHO")).to_contain_text("failed")
    expect(page.locator("#sending-state")).to_contain_text("Active")
    ui.axe("the admin view")
    ui.shot("05-admin-dead-letter")

    # the PACS is back: retry sends the result again; the dead letter is gone
    pacs.start()
    dead.get_by_role("button", name=re.compile(f"^Retry {susp}")).click()
    expect(page.locator("#toast")).to_contain_text("sent again")
    wait_until(lambda: pacs.count() >= 1, 60, "the PACS to receive the result")
    expect(page.locator("#dead-empty")).to_be_visible(timeout=30000)
    expect(dead).to_have_count(0)
    expect(queue.locator(".fact", has_text="Dead letters")).to_contain_text("0")
    ui.shot("06-admin-retried")
    page.get_by_role("button", name="Worklist").click()
    expect(ui.row(susp).locator(".dlv")).to_have_text("Sent")
    expect(ui.row(susp).locator(".kinds")).to_have_text("SC sent")


def sending_is_paused_and_resumed(ui: Page, admin: str) -> None:
    """Kept in the database: the API says so too."""
    from playwright.sync_api import expect

    page = ui.page
    page.get_by_role("button", name="Admin").click()
    page.get_by_role("button", name="Pause sending").click()
    expect(page.locator("#sending-state")).to_contain_text("Paused")
    expect(page.locator("#sending-state")).to_contain_text("ops")
    status, summary = api_get(ui.base, admin, "/api/v1/admin/summary")
    assert status == 200 and summary["sending"]["sending_paused"] is True
    page.get_by_role("button", name="Resume sending").click()
    expect(page.locator("#sending-state")).to_contain_text("Active")
    status, summary = api_get(ui.base, admin, "/api/v1/admin/summary")
    assert status == 200 and summary["sending"]["sending_paused"] is False


def a_study_is_replayed(ui: Page, pacs: Pacs, susp: str) -> None:
    """From the study's view (admins only): its result reaches the PACS once more."""
    from playwright.sync_api import expect

    page = ui.page
    page.get_by_role("button", name="Worklist").click()
    ui.row(susp).get_by_role("button", name=susp, exact=True).click()
    dialog = page.locator("dialog#study")
    expect(dialog).to_be_visible()
    sent_before = pacs.count()
    dialog.get_by_role("button", name="Replay study…").click()
    expect(dialog).to_contain_text(f"Replay the image of {susp} through the pipeline?")
    dialog.get_by_role("button", name="Replay", exact=True).click()
    expect(page.locator("#toast")).to_contain_text(f"Replay of {susp}: 1 image queued")
    wait_until(lambda: pacs.count() > sent_before, 60, "the replayed result at the PACS")
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
