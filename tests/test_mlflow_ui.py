"""The MLflow UI, as a user opens it, shows a study: headless Chromium (Debian's `chromium`
package) loads the experiment's page from `mlflow ui` and the rendered page is checked."""

import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from glam import tracking

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _render(url: str, out: Path) -> str:
    """The page's text once its scripts ran (and a screenshot at `out`)."""
    common = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu",
              "--virtual-time-budget=20000", "--window-size=1400,900"]
    subprocess.run([*common, f"--screenshot={out}", url], capture_output=True, timeout=120)
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True,
                         timeout=120).stdout
    text = re.sub(r"<script.*?</script>|<style.*?</style>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text))


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt install chromium)")
def test_the_ui_opens_the_study_in_its_model_training_view(tmp_path, free_port):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    experiment = tracking.experiment_id(client, "ui_study")
    parent = client.create_run(experiment, run_name="ui_study",
                               tags={"study_role": "parent"}).info.run_id
    for name in ("dense-156K-1.02Mtok-s0", "moe-E8-156K-1.02Mtok-s0"):
        child = client.create_run(experiment, run_name=name,
                                  tags={"mlflow.parentRunId": parent}).info.run_id
        client.log_metric(child, "val_loss", 1.0)
        client.set_terminated(child)
    client.set_terminated(parent)

    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen([str(mlflow), "ui", "--backend-store-uri", uri, "--host",
                               "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        url = tracking.experiment_url(uri, experiment).replace("127.0.0.1:5000",
                                                               f"127.0.0.1:{port}")
        text = _render(url, tmp_path / "study.png")
        parent_page = _render(url.replace("?", f"/runs/{parent}?"), tmp_path / "parent.png")
    finally:
        server.terminate()
        server.wait(timeout=30)
    # the runs view (not the GenAI overview of traces and token usage)
    assert "Run Name" in text and "Token Usage" not in text, text[:1500]
    assert "ui_study" in text  # the parent run is listed ...
    assert "3 matching runs" in text  # ... with its two child runs under it
    assert "Child runs" in parent_page  # and the parent's page names them
    assert "dense-156K-1.02Mtok-s0" in parent_page and "moe-E8-156K-1.02Mtok-s0" in parent_page
    assert (tmp_path / "study.png").stat().st_size > 10_000
