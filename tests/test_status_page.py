"""The status page in headless Debian chromium (Playwright) against a node with its inference worker:
the study, its state, the findings and a heatmap thumbnail appear; a dead letter's Retry button re-queues
it and the results arrive; no patient name on the page. On the way: the dead delivery is said once in the
log, `jobs` prints the last error and the next attempt, and /readyz fails while a worker is dead.

Screenshots: var/test-output/status-page/ (look at them)."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pydicom
import pytest

from tests.dicomgen import fracatlas_images, write_dx_study
from tests.nodeproc import REPO
from tests.peers import Storescp, free_port, storescu
from tests.test_ops_http import TOKEN, http, metric

OUT = REPO / "var" / "test-output" / "status-page"
CHROMIUM = "/usr/bin/chromium"
PATIENT_NAME = "DOE^JANE^STATUSPAGE"
PATIENT_ID = "PID-STATUS-4711"


def _jobs(node) -> dict[str, dict]:
    return {j["StudyInstanceUID"]: j for j in json.loads(node.cli("jobs", "--json").stdout)}


def test_status_page_study_thumbnail_dead_letter_retry_in_chromium(make_node, tmp_path):
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium")
    dest_port = free_port()  # nothing listens there yet: the deliveries go dead
    node = make_node(quiet_seconds=1,
                     peers=[{"ae_title": "STORESCU", "host": "127.0.0.1", "port": dest_port}],
                     pipeline={"enabled": True, "batch_size": 4},
                     sending={"max_attempts": 2, "base_delay_seconds": 0.5, "timeout_seconds": 2,
                              "poll_seconds": 0.3},
                     http={"token": TOKEN})
    files = write_dx_study(tmp_path / "study", fracatlas_images(1), patient_id=PATIENT_ID,
                           patient_name=PATIENT_NAME)
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    t0 = time.monotonic()
    assert storescu("127.0.0.1", node.port, files).returncode == 0
    node.wait_for(lambda: _jobs(node).get(uid, {}).get("state") == "failed", timeout=180, interval=1,
                  what="the study failed: its deliveries are dead letters")
    took = time.monotonic() - t0

    # the log says it once, with destination, study, last error and how to retry
    dead_lines = [line for line in node.log().splitlines() if "delivery DEAD" in line]
    assert len(dead_lines) == 1, dead_lines
    assert f"study {uid} to STORESCU" in dead_lines[0] and "after 2 attempt(s)" in dead_lines[0]
    assert "last error: no association with STORESCU at 127.0.0.1" in dead_lines[0]
    assert f"retry --study {uid}" in dead_lines[0]
    jobs_text = node.cli("jobs").stdout
    assert re.search(r"to STORESCU: dead \d+, attempts 2; last error: no association", jobs_text), jobs_text
    assert f"(dead letter: dicom-node retry --study {uid})" in jobs_text

    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.png"):
        old.unlink()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            context = browser.new_context(extra_http_headers={"Authorization": f"Bearer {TOKEN}"},
                                          viewport={"width": 1500, "height": 1000})
            page = context.new_page()
            page.goto(node.http_url + "/")
            row = page.locator("tr.study", has_text=uid)
            assert row.count() == 1
            assert row.locator(".state").inner_text() == "failed"
            assert "Image 1:" in row.inner_text()  # the findings summary of the SR
            thumb = row.locator("img.thumb").first
            thumb.wait_for()
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=thumb.element_handle())
            assert thumb.evaluate("img => img.naturalWidth") > 50
            dead = page.locator("#dead-letters tr.dead", has_text=uid)
            assert dead.count() == 1 and "no association with STORESCU" in dead.inner_text()
            content = page.content()
            for needle in (PATIENT_NAME, "DOE^JANE", "DOE", PATIENT_ID):
                assert needle not in content, needle
            assert TOKEN not in content.replace(f"Bearer {TOKEN}", "")  # the configuration hides it
            page.screenshot(path=str(OUT / "01-dead-letter.png"), full_page=True)

            # the destination comes up; the button re-queues the dead letters and the results arrive
            with Storescp(tmp_path / "received", port=dest_port, aet="STORESCU") as scp:
                dead.locator("button.retry").click()
                page.wait_for_selector("#retried")
                assert re.match(r"Re-queued [1-9]\d* dead deliver", page.inner_text("#retried"))
                page.screenshot(path=str(OUT / "02-after-retry.png"), full_page=True)
                node.wait_for(lambda: _jobs(node)[uid]["state"] == "sent", timeout=60, interval=0.5,
                              what="the results delivered after the retry")
                assert len(scp.files()) == _jobs(node)[uid]["deliveries"][0]["objects"]
            page.goto(node.http_url + "/")
            row = page.locator("tr.study", has_text=uid)
            assert row.locator(".state").inner_text() == "sent"
            assert page.locator("#dead-letters").count() == 0
            page.screenshot(path=str(OUT / "03-sent.png"), full_page=True)
            assert PATIENT_NAME not in page.content()
        finally:
            browser.close()

    # metrics: inference timed, deliveries by state and destination, dead letters counted
    text = http(node.http_url + "/metrics", token=TOKEN)[2].decode()
    assert metric(text, "msknode_inference_study_seconds_count") >= 1
    assert metric(text, "msknode_inference_image_seconds_count") >= 1
    assert metric(text, "msknode_dead_letters_total", destination="STORESCU") >= 1
    assert metric(text, "msknode_deliveries", state="sent", destination="STORESCU") >= 1
    assert metric(text, "msknode_stable_to_sent_seconds_count") == 1
    assert 'pipeline="enabled"' in text

    # readiness: a dead inference worker fails /readyz, and the pool restarts it
    status, _, body = http(node.http_url + "/readyz", token=TOKEN)
    assert status == 200, body
    pid = int(re.findall(r"inference worker 0 started \(pid (\d+)\)", node.log())[-1])
    os.kill(pid, signal.SIGKILL)
    node.wait_for(lambda: http(node.http_url + "/readyz", token=TOKEN)[0] == 503, timeout=10,
                  what="/readyz failing")
    answer = json.loads(http(node.http_url + "/readyz", token=TOKEN)[2])
    assert answer["failed"] == ["workers"] and "inference worker 0" in answer["checks"]["workers"]["detail"]
    node.wait_for(lambda: metric(http(node.http_url + "/metrics", token=TOKEN)[2].decode(),
                                 "msknode_worker_restarts_total") == 1, timeout=60, what="the worker restarted")
    print(f"\nstudy to dead letters in {took:.1f} s; screenshots in {OUT}")
