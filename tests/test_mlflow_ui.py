"""The MLflow UI, as a user sees it: headless Chromium on `mlflow ui` over a finished study.

- the study's last line is the `mlflow ui` command this module runs, and the page it names is the
  study run's;
- the study run is listed, and expanding its row shows its trial runs nested under it;
- a trial's metric charts have samples seen on the step axis (and so does the REST API the
  page reads them from);
- the study run's report figures are among its artifacts, and one opens in the preview.

Screenshots go to tests/artifacts/ (or $SCALING_TEST_ARTIFACTS). Needs chromium and
chromium-driver (cluster/install-system-deps.sh) and selenium (the dev extra).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cluster_procs import BIN, MlflowServer, is_loopback, listeners
from records import study_records

from scaling.tracking import UI_COMMAND

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SHOTS = Path(os.environ.get("SCALING_TEST_ARTIFACTS", Path(__file__).resolve().parent / "artifacts"))
TINY = ["epochs=1", "eval_every=0.25", "data.n_samples=3000", "model.width=32", "threads=1",
        "hydra.sweeper.asha.grace_period=0.25"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A finished two-trial study with its report, recorded in a SQLite store: (folder, study run, trial runs)."""
    cwd = tmp_path_factory.mktemp("ui-study")
    proc = subprocess.run([str(BIN / "scaling-train"), "-m", "batch_size=32,64", *TINY,
                           "hydra.sweeper.report=true", "hydra.sweeper.study_name=ui-study",
                           f"mlflow.tracking_uri=sqlite:///{cwd / 'mlflow.db'}"],
                          cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client, studies, trials = study_records(f"sqlite:///{cwd / 'mlflow.db'}")
    assert len(studies) == 1 and len(trials) == 2
    return cwd, studies[0].info.experiment_id, studies[0], trials, proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def ui(study):
    cwd = study[0]
    server = MlflowServer(cwd, command="ui", backend=f"sqlite:///{cwd / 'mlflow.db'}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not CHROMIUM or not CHROMEDRIVER:
        pytest.skip("chromium and chromium-driver are not installed: run cluster/install-system-deps.sh")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (dev extra)")
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager look for drivers online
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1600,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()  # chromedriver and the browser it started


def wait(driver, condition, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.3).until(condition)


def shot(driver, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / name
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


def row_ids(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [r.get_attribute("row-id") for r in driver.find_elements(By.CSS_SELECTOR, "div[role=row][row-id]")]


def test_ui_listens_on_loopback_only(ui):
    addresses = listeners(ui.pids())
    assert addresses and all(is_loopback(a) for a in addresses), addresses


def test_the_page_the_study_prints_opens_its_run(ui, study, browser):
    from selenium.webdriver.common.by import By

    _, exp_id, study_run, _, hint = study
    command, page = hint.split("   # then open ")
    assert command == f"{UI_COMMAND} --backend-store-uri {ui.backend}"
    local = "http://127.0.0.1:5000/"
    assert page == f"{local}#/experiments/{exp_id}/runs/{study_run.info.run_id}"
    browser.get(f"{ui.url}/{page.removeprefix(local)}")  # this module's server listens on another port
    wait(browser, lambda d: all(w in d.find_element(By.TAG_NAME, "body").text for w in ("ui-study", study_run.info.run_id)))
    shot(browser, "mlflow-ui-study-run.png")


def test_study_row_expands_to_its_trial_runs(ui, study, browser):
    from selenium.webdriver.common.by import By

    _, exp_id, study_run, trials, _ = study
    sid = study_run.info.run_id
    browser.get(f"{ui.url}/#/experiments/{exp_id}/runs")
    row = wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, f"div[role=row][row-id='{sid}']"))
    assert "ui-study" in row.text
    collapsed = set(row_ids(browser))
    assert not collapsed & {t.info.run_id for t in trials}, "trial runs must be nested under the study, not listed"
    row.find_element(By.CSS_SELECTOR, "button[data-component-id*='runnamecellrenderer']").click()
    wanted = {t.info.run_id for t in trials}
    wait(browser, lambda d: wanted <= set(row_ids(d)))
    shot(browser, "mlflow-ui-study-expanded.png")
    names = browser.find_element(By.CSS_SELECTOR, "div[role=grid], div[role=treegrid]").get_attribute("textContent")
    assert all(t.info.run_name in names for t in trials), names[:2000]


def test_trial_metric_charts_use_samples_as_step(ui, study, browser):
    from selenium.webdriver.common.by import By

    _, exp_id, _, trials, _ = study
    trial = next(t for t in trials if t.data.params["batch_size"] == "64")
    rid = trial.info.run_id
    browser.get(f"{ui.url}/#/experiments/{exp_id}/runs/{rid}/model-metrics")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "g.xtick text"))
    titles = {e.text for e in browser.find_elements(By.CSS_SELECTOR, ".g-xtitle text, text.xtitle")}
    assert "Step" in titles, titles
    ticks = [float(e.text.replace(",", "").replace("k", "e3")) for e in
             browser.find_elements(By.CSS_SELECTOR, "g.xtick text") if e.text]
    assert max(ticks) >= 1000, f"the step axis should count samples (up to 2,400 here), not steps: {ticks}"
    shot(browser, "mlflow-ui-trial-metrics.png")
    # the REST API the page draws from: every step is a sample count (a multiple of the batch size)
    history = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        f"fetch('ajax-api/2.0/mlflow/metrics/get-history?run_id={rid}&metric_key=val/loss')"
        ".then(r => r.json()).then(j => done(JSON.stringify(j))).catch(e => done(String(e)));")
    steps = [int(m["step"]) for m in json.loads(history)["metrics"]]
    assert steps and all(s % 64 == 0 for s in steps) and max(steps) >= 1000, steps


def test_study_run_has_the_report_figures(ui, study, browser):
    from selenium.webdriver.common.by import By

    _, exp_id, study_run, _, _ = study
    browser.get(f"{ui.url}/#/experiments/{exp_id}/runs/{study_run.info.run_id}/artifacts")
    folder = wait(browser, lambda d: next((e for e in d.find_elements(By.XPATH, "//*[text()='report']")), None))
    folder.click()
    pngs = wait(browser, lambda d: [e for e in d.find_elements(By.XPATH, "//*[substring(text(), "
                                                                        "string-length(text()) - 3) = '.png']")])
    assert len(pngs) >= 2, [p.text for p in pngs]
    name = pngs[0].text
    pngs[0].click()
    # the preview: the header names the file, and the figure is decoded (the UI fetches it as a blob)
    wait(browser, lambda d: f"report/{name}" in d.find_element(By.TAG_NAME, "body").text)
    wait(browser, lambda d: [i for i in d.find_elements(By.TAG_NAME, "img")
                             if (i.get_attribute("src") or "").startswith(("blob:", "http"))
                             and int(i.get_attribute("naturalWidth") or 0) > 300])
    shot(browser, "mlflow-ui-study-report.png")
