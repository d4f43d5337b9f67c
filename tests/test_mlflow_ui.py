"""The MLflow UI as a user sees it: a real `mlflow server` on loopback, runs logged with hldx's names, the report
logged by `python -m analysis.report`, and headless Chromium (Debian's, driven by Playwright) that groups the runs
table by hldx.hp_key, sorts it by the comparison with KD (vs_kd/eval/val_logppl), finds the summary in the
experiment's note and opens the summary run's figure. Needs tests/install-browser.sh. The screenshots are
kept under each test's tmp_path."""
from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from slurm_cluster import free_port
from test_analysis import scores

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"
FIGURE = "fig1_val_logppl_hist.png"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` on a free loopback port; stopped (its whole process group) at the end."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--workers", "1", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts")]
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start; see {root / 'server.log'}")
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def study(server, tmp_path_factory):
    """A demo-sized study logged by hldx's own tracking (hldx.tracking.Tracker, the trainer's logger):
    KD, HLDC and HLDF at two shared points and NLL at both lrs, then the report."""
    from hldx import config as C
    from hldx.tracking import Tracker

    groups: dict[str, set[str]] = {}
    for i, lr in enumerate(["4e-4", "1.6e-3"]):
        for method, offset in (("kd", 0.0), ("hldc", -0.01), ("hldf", -0.02), ("nll", 0.1)):
            cfg = C.compose([f"method={method}", f"lr={lr}", f"tracking.uri={server}",
                             "tracking.experiment=ui-demo"])
            tracker = Tracker(cfg, C.run_key(cfg))
            tracker.log({f"eval/{k}": v for k, v in scores(3.1 + offset - i / 10).items()}, step=1)
            tracker.finish()
            groups.setdefault(C.hp_key(cfg), set()).add(tracker.run_id)
    client = MlflowClient(server)
    exp = client.get_experiment_by_name("ui-demo").experiment_id
    out = tmp_path_factory.mktemp("report")
    done = subprocess.run([sys.executable, "-m", "analysis.report", "--experiment", "ui-demo", "--tracking-uri",
                           server, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "summary run" in done.stdout
    [summary_run] = client.search_runs([exp], filter_string="tags.`hldx.role` = 'report'")
    return {"exp": exp, "groups": groups, "summary_run": summary_run.info.run_id, "out": out}


@pytest.fixture(scope="module")
def page():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: run tests/install-browser.sh")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run tests/install-browser.sh")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser.new_page(viewport={"width": 1600, "height": 1000})
        browser.close()


def table_groups(page) -> dict[str, set[str]]:
    """The grouped runs table as {group label: run ids}, read from the run-name column in row order."""
    cells = page.evaluate("""() => [...document.querySelectorAll('[role=gridcell][col-id*="Run Name"]')].map(c => [
        Number(c.closest('[role=row]').getAttribute('aria-rowindex')), c.innerText,
        [...c.querySelectorAll('a[href*="/runs/"]')].map(a => a.getAttribute('href'))])""")
    groups: dict[str, set[str]] = {}
    current = None
    for _, text, links in sorted(cells):
        if links and current is not None:
            current.update(link.rsplit("/", 1)[-1] for link in links)
        elif not links:  # a group's header row; "Additional runs" (no hp_key tag) is not a group of ours
            label = re.search(r"^Group: (\S+)$", text, re.MULTILINE)
            current = groups.setdefault(label.group(1), set()) if label else None
    return groups


def test_runs_table_groups_by_hp_key(server, study, page, tmp_path):
    page.goto(f"{server}/#/experiments/{study['exp']}/runs")
    page.get_by_role("button", name="Group by").click()
    page.get_by_role("menuitemcheckbox", name="hldx.hp_key", exact=True).click()
    page.keyboard.press("Escape")
    page.get_by_text(re.compile(r"^Group: ")).nth(len(study["groups"]) - 1).wait_for()
    page.screenshot(path=tmp_path / "grouped.png")
    assert table_groups(page) == study["groups"]


def test_runs_table_sorts_by_the_comparison_with_kd(server, study, page, tmp_path):
    """The runs table ordered by vs_kd/eval/val_logppl (KD's value minus the run's, written by analysis.report),
    that column shown: HLDF (0.02 better than KD at both points), HLDC (0.01), NLL (0.1 worse); runs without a
    comparison (KD itself, the report) last. The experiment's note holds the summary tables."""
    key = "metrics.`vs_kd/eval/val_logppl`"
    page.goto(server)
    page.evaluate("() => localStorage.clear()")  # the UI keeps a table's grouping: start from the defaults
    page.goto(f"{server}/#/experiments/{study['exp']}/runs?orderByKey={urllib.parse.quote(key)}&orderByAsc=false")
    page.get_by_role("button", name="Columns", exact=True).click()
    page.get_by_placeholder("Search columns").fill("vs_kd/eval/val_logppl")
    page.get_by_text("vs_kd/eval/val_logppl", exact=True).last.click()
    page.keyboard.press("Escape")
    page.locator(f'[role=gridcell][col-id="{key}"]').first.wait_for()
    page.screenshot(path=tmp_path / "sorted-by-vs-kd.png")
    cells = page.evaluate("""key => [...document.querySelectorAll('[role=gridcell]')].map(c => [
        Number(c.closest('[role=row]').getAttribute('aria-rowindex')), c.getAttribute('col-id'), c.innerText])
        .filter(c => c[1] === key || c[1] === 'attributes.`Run Name`')""", key)
    rows: dict[int, dict[str, str]] = {}
    for row, col, text in cells:
        rows.setdefault(row, {})[col] = text.splitlines()[-1]
    table = [(r["attributes.`Run Name`"].split("|")[0], r[key]) for _, r in sorted(rows.items())]
    shown = [(method, None if value == "-" else round(float(value), 6)) for method, value in table]
    assert shown == [("hldf", 0.02)] * 2 + [("hldc", 0.01)] * 2 + [("nll", -0.1)] * 2 + [
        (m, None) for m, _ in shown[6:]] and sorted(m for m, _ in shown[6:]) == ["kd", "kd", "report"]
    page.goto(f"{server}/#/experiments/{study['exp']}/runs")
    note = page.get_by_text("Best vs best").first
    note.wait_for()
    page.screenshot(path=tmp_path / "experiment-note.png")
    assert "Best vs best" in MlflowClient(server).get_experiment(study["exp"]).tags["mlflow.note.content"]


def test_summary_run_shows_its_figure(server, study, page, tmp_path):
    page.goto(f"{server}/#/experiments/{study['exp']}/runs/{study['summary_run']}")
    page.get_by_role("tab", name="Artifacts").click()
    page.get_by_text(FIGURE, exact=True).click()
    image = page.locator("img[src^='blob:']").first
    image.wait_for()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    page.screenshot(path=tmp_path / "figure.png")
    shown = image.evaluate("""async img => {
        const bytes = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
        let s = ''; for (const b of bytes) s += String.fromCharCode(b); return btoa(s); }""")
    assert base64.b64decode(shown) == (study["out"] / FIGURE).read_bytes()
