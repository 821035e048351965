"""Screenshot of notebook 04_fe_maps's ipywidgets explorer in a real browser (JupyterLab in headless Chromium).

    apt-get install -y chromium chromium-driver          # Debian's browser and its WebDriver
    python3 -m venv /tmp/shot && /tmp/shot/bin/pip install selenium
    .venv/bin/pip install -e ".[dev,lab]"                # what `make lab` installs
    /tmp/shot/bin/python docs/screenshot_fe_explorer.py [--profile smoke] [--out docs/fe_explorer_jupyterlab.png]

Starts ``.venv/bin/jupyter lab`` on a *copy* of the notebook in a temp folder (JupyterLab autosaves; the
committed notebook stays without outputs), opens it in Chromium (headless, no sandbox, no GPU, no network
services, a fresh profile), runs all cells through JupyterLab's own command (``notebook:run-all-cells``),
waits for the explorer's sliders and figure, moves the example slider one step (the figure must redraw),
and saves a screenshot. Needs the profile's data and FE run (``make reproduce PROFILE=smoke ONLY=04`` or any
earlier execution); the kernel is the project's (``.venv``'s python3).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(driver, script: str, timeout: float, what: str):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = driver.execute_script(script)
        if v:
            return v
        time.sleep(1.0)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "fe_explorer_jupyterlab.png")
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cmbfe-shot-"))
    nb = json.loads((ROOT / "notebooks" / "04_fe_maps.ipynb").read_text())
    for cell in nb["cells"]:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            cell["source"] = [f"profile = {args.profile!r}\n", "size = None\n", "seed = 0\n", "n_images = 3\n"]
    (tmp / "nb").mkdir()
    (tmp / "nb" / "04_fe_maps.ipynb").write_text(json.dumps(nb))
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "CMBFE_THREADS": "1", "OMP_NUM_THREADS": "1", "JUPYTER_CONFIG_DIR": str(tmp / "cfg"),
           "JUPYTER_RUNTIME_DIR": str(tmp / "rt")}
    lab = subprocess.Popen(
        [str(ROOT / ".venv" / "bin" / "jupyter"), "lab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp / 'nb'}",
         "--LabApp.expose_app_in_browser=True", "--ServerApp.open_browser=False", "--allow-root"],
        env=env, stdout=open(tmp / "lab.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
              f"--user-data-dir={tmp / 'chrome'}", "--window-size=1500,1150", "--hide-scrollbars"):
        opts.add_argument(a)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    driver = None
    try:
        for _ in range(120):  # the server is up when its port answers
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if lab.poll() is not None:
                raise RuntimeError(f"jupyter lab exited:\n{(tmp / 'lab.log').read_text()[-3000:]}")
            time.sleep(1)
        driver = webdriver.Chrome(options=opts, service=service)
        driver.get(f"http://127.0.0.1:{port}/lab/tree/04_fe_maps.ipynb?token={token}")
        wait(driver, "return window.jupyterapp && document.querySelector('.jp-Notebook .jp-Cell') !== null", 120,
             "JupyterLab and the notebook")
        wait(driver, "const w = window.jupyterapp.shell.currentWidget; return w && w.sessionContext && "
                     "w.sessionContext.session && w.sessionContext.session.kernel && "
                     "w.sessionContext.session.kernel.status === 'idle'", 120, "the kernel")
        driver.execute_script("window.jupyterapp.commands.execute('application:toggle-left-area');"
                              "window.jupyterapp.commands.execute('notebook:run-all-cells');")
        t0 = time.time()
        wait(driver, "return document.querySelectorAll('.widget-interact .widget-slider').length >= 2 && "
                     "document.querySelector('.widget-interact .jp-OutputArea-output img') !== null",
             args.timeout, "the explorer's sliders and figure")
        print(f"notebook executed in the browser in {time.time() - t0:.0f} s")
        before = driver.execute_script("return document.querySelector('.widget-interact .jp-OutputArea-output img').src")
        handle = driver.find_elements(By.CSS_SELECTOR, ".widget-interact .noUi-handle")[0]
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", handle)
        handle.click()
        handle.send_keys(Keys.ARROW_RIGHT)
        wait(driver, "const i = document.querySelector('.widget-interact .jp-OutputArea-output img'); "
                     f"return i && i.src !== {json.dumps(before)};", 120, "the figure to redraw after the slider moved")
        driver.execute_script(  # the "Jupyter news?" toast: answer No
            "for (const b of document.querySelectorAll('.Toastify button, .jp-toast-button')) "
            "{ if (b.textContent.trim() === 'No') b.click(); }")
        box = driver.find_element(By.CSS_SELECTOR, ".widget-interact")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
        time.sleep(2)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out))
        print(f"screenshot -> {args.out}")
        return 0
    finally:
        if driver is not None:
            driver.quit()
        lab.terminate()
        try:
            lab.wait(20)
        except subprocess.TimeoutExpired:
            lab.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
