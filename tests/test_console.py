"""The web console in a real browser (Debian's headless Chromium under selenium) against a real
server: a repository `mnist-vae` of two really trained versions labelled stable and canary."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import servers
from PIL import Image

from vaeserve import sandbox
from vaeserve.client import VaeClient
from vaeserve.export.exporter import ExportRequest, export_model
from vaeserve.repository import LABELS, labels_text

CANARY = {"hidden_sizes": [64], "latent_size": 8, "epochs": 1, "limit": 3000, "batch_size": 64, "seed": 7}
TOKEN = "console-test-token"
MARKUP = "<b id=injected>canary</b>"  # a manifest string that must show as text, never as markup


@pytest.fixture(scope="module")
def console_repo(tmp_path_factory, tiny_run: Path, mnist, mnist_dir: Path) -> Path:
    """mnist-vae/1 (the tiny run) and mnist-vae/2 (another run), labelled stable and canary."""
    from vaeserve.training.config import resolve_config
    from vaeserve.training.trainer import start_or_resume

    canary = tmp_path_factory.mktemp("canary_run")
    start_or_resume(resolve_config("seed", None, CANARY), mnist, canary, resume=False, progress=False).run()
    repo = tmp_path_factory.mktemp("console") / "models"
    for run in (tiny_run, canary):
        export_model(ExportRequest(run, repo, "mnist-vae", iw_samples=10, data_dir=mnist_dir))
    (repo / "mnist-vae" / LABELS).write_text(labels_text({"stable": 1, "canary": 2}))
    manifest = repo / "mnist-vae" / "2" / "manifest.json"
    raw = json.loads(manifest.read_text())
    raw["training"]["preset"] = MARKUP
    manifest.write_text(json.dumps(raw))
    return repo


@pytest.fixture(scope="module")
def browser():
    missing = sandbox.chromium_missing()
    if missing:
        pytest.skip(missing)
    driver = sandbox.start_chromium()
    yield Page(driver)
    driver.quit()


@pytest.fixture(scope="module")
def server(console_repo: Path, tmp_path_factory):
    with servers.running(console_repo, tmp_path_factory.mktemp("console-serve") / "serve.log") as running:
        yield running


class Page:
    """The driver, and what the page did: its console messages and the URLs it requested."""

    def __init__(self, driver) -> None:
        self.driver = driver

    def open(self, url: str) -> None:
        self.drain()
        self.origin = url.rstrip("/")
        self.driver.get(url)

    def load(self, server) -> None:
        """The console of ``server``, once it has drawn its first sample grid."""
        self.open(f"http://{server.http}/")
        self.wait(lambda: self.count("#sample-grid canvas") == 16)

    def drain(self) -> None:
        self.driver.get_log("browser")
        sandbox.requested_urls(self.driver)

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def wait(self, check, timeout: float = 30):
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(lambda _: check())

    def count(self, selector: str) -> int:
        return self.js("return document.querySelectorAll(arguments[0]).length", selector)

    def set(self, element_id: str, value: str) -> None:
        self.js(
            "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
            "e.dispatchEvent(new Event('change'))",
            element_id,
            value,
        )

    def submit(self, form_id: str) -> None:
        self.js("document.getElementById(arguments[0]).requestSubmit()", form_id)

    def pictures(self, selector: str) -> list[str]:
        return self.js(
            "return [...document.querySelectorAll(arguments[0])].map(c => c.toDataURL())", selector
        )

    def status(self) -> str:
        return self.js("return document.getElementById('status').textContent")

    def assert_clean(self, allowed_status: tuple[int, ...] = ()) -> None:
        """No console message above info (a network answer of an ``allowed_status`` aside), and
        no request to another origin."""
        problems = [
            entry
            for entry in self.driver.get_log("browser")
            if entry["level"] in ("SEVERE", "WARNING")
            and not any(f"status of {code}" in entry["message"] for code in allowed_status)
        ]
        assert not problems, problems
        urls = sandbox.requested_urls(self.driver)
        foreign = [u for u in urls if not u.startswith((self.origin + "/", "data:", "blob:"))]
        assert not foreign, foreign


def http(server, path: str, token: str | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(f"http://{server.http}{path}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


# -- in the browser ---------------------------------------------------------------------------------
def test_page_names_the_model_and_draws_samples_by_seed(browser: Page, server) -> None:
    browser.load(server)
    assert browser.js("return document.getElementById('model').value") == "mnist-vae"
    assert "mnist-vae" in browser.driver.find_element("id", "model-table").text
    sizes = browser.js(
        "return [...document.querySelectorAll('#sample-grid canvas')].map(c => [c.width, c.height])"
    )
    assert sizes == [[28, 28]] * 16
    first = browser.pictures("#sample-grid canvas")
    assert len(set(first)) > 1  # 16 different samples, not one image repeated

    def draw(seed: int, count: int) -> list[str]:
        browser.set("sample-seed", str(seed))
        browser.set("sample-count", str(count))
        browser.js("document.getElementById('sample-grid').replaceChildren()")
        browser.submit("sample-form")
        browser.wait(lambda: browser.count("#sample-grid canvas") == count)
        return browser.pictures("#sample-grid canvas")

    assert draw(0, 16) == first  # the same seed, the same grid
    other = draw(5, 9)
    assert len(other) == 9 and other != first[:9]
    assert draw(5, 9) == other
    browser.assert_clean()


def test_model_table_shows_versions_labels_and_escapes_manifest_strings(browser: Page, server) -> None:
    browser.open(f"http://{server.http}/")
    browser.wait(lambda: browser.count("#model-table tbody tr") == 2)
    rows = browser.js(
        "return [...document.querySelectorAll('#model-table tbody tr')]"
        ".map(r => [...r.cells].map(c => c.textContent))"
    )
    assert [r[:4] for r in rows] == [
        ["mnist-vae", "1", "READY", "stable"],
        ["mnist-vae", "2", "READY", "canary, latest"],
    ]
    assert rows[1][5] == MARKUP  # shown as the text it is
    assert browser.count("#injected") == 0
    assert [r[9] for r in rows] == ["standard-normal", "standard-normal"]  # versions without a prior file
    assert all(r[10].startswith("-") and "±" in r[10] for r in rows)  # test ELBO ± its standard error
    browser.assert_clean()


def test_an_uploaded_png_scores_as_the_score_rpc_does(browser: Page, server, mnist, tmp_path: Path) -> None:
    pixels = mnist.split("test")[0][3].reshape(28, 28).astype(np.uint8)
    png = tmp_path / "digit.png"
    Image.fromarray(pixels, "L").save(png)
    browser.load(server)
    browser.set("input-version", "canary")
    browser.driver.find_element("id", "input-file").send_keys(str(png))
    browser.wait(lambda: browser.count("#input-image canvas") == 1)
    seen = browser.js(
        "const c = document.querySelector('#input-image canvas');"
        "return Array.from(c.getContext('2d').getImageData(0, 0, 28, 28).data.filter((_, i) => i % 4 == 0))"
    )
    assert np.array_equal(np.array(seen, np.uint8), pixels.ravel())  # converted exactly
    browser.submit("input-form")
    browser.wait(lambda: browser.count("#input-scores td[data-score]") == 4)
    shown = browser.js(
        "return Object.fromEntries([...document.querySelectorAll('#input-scores td[data-score]')]"
        ".map(td => [td.dataset.score, Number(td.dataset.value)]))"
    )
    k = int(browser.js("return document.getElementById('input-scores').dataset.k"))
    assert k == 10  # the test set's reference was scored with k = 10: the page defaults to it
    with VaeClient(server.target, model="mnist-vae", version="2") as client:
        expected = client.score(pixels.reshape(1, 784), iw_samples=k, seed=0)
    for name, value in shown.items():
        assert np.float32(value) == expected[name][0], (name, value, expected[name][0])
    assert browser.count("#input-reconstruction canvas") == 1
    verdicts = browser.js(
        "return [...document.querySelectorAll('#input-scores td.typical, #input-scores td.unusual')].length"
    )
    assert verdicts == 4  # each score placed against the test set's percentiles
    browser.assert_clean()


def test_a_drawn_digit_is_the_input(browser: Page, server) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    browser.load(server)
    pad = browser.driver.find_element("id", "input-pad")
    browser.js("arguments[0].scrollIntoView()", pad)
    stroke = ActionChains(browser.driver).move_to_element_with_offset(pad, -30, -60).click_and_hold()
    stroke.move_by_offset(20, 50).move_by_offset(20, 50).release().perform()
    browser.driver.find_element("id", "pad-use").click()
    browser.wait(lambda: browser.count("#input-image canvas") == 1)
    inked = browser.js(
        "const c = document.querySelector('#input-image canvas');"
        "const red = c.getContext('2d').getImageData(0, 0, 28, 28).data.filter((_, i) => i % 4 == 0);"
        "return red.filter(v => v > 0).length"
    )
    assert 5 < inked < 28 * 28 // 2  # a stroke, at the model's shape
    browser.submit("input-form")
    browser.wait(lambda: browser.count("#input-scores td[data-score]") == 4)
    browser.assert_clean()


def test_latent_interpolation_and_traversal(browser: Page, server) -> None:
    browser.load(server)
    browser.submit("latent-form")
    browser.wait(lambda: browser.count("#latent-strip canvas") == 10)
    strip = browser.pictures("#latent-strip canvas")
    assert strip[0] != strip[-1]
    dims = browser.js("return [...document.getElementById('latent-dim').options].map(o => o.value)")
    activity = json.loads(http(server, "/v2/console/models")[2])["models"][0]["versions"][1]["manifest"]
    order = sorted(range(8), key=lambda d: -activity["unit_activity"][d])
    assert [int(d) for d in dims] == order  # the most active dimension first
    browser.submit("traverse-form")
    browser.wait(lambda: browser.count("#latent-traversal canvas") == 11)
    browser.assert_clean()


def test_two_versions_side_by_side(browser: Page, server) -> None:
    browser.load(server)
    browser.set("compare-a", "stable")
    browser.set("compare-b", "canary")
    browser.submit("compare-form")
    browser.wait(
        lambda: browser.count("#compare-a-side canvas") == 8 and browser.count("#compare-b-side canvas") == 8
    )
    titles = browser.js("return [...document.querySelectorAll('.side h3')].map(h => h.textContent)")
    assert titles == ["stable (version 1)", "canary (version 2)"]
    a, b = browser.pictures("#compare-a-side canvas"), browser.pictures("#compare-b-side canvas")
    assert a != b  # two models, the same seeds
    browser.submit("compare-form")
    browser.wait(lambda: browser.count("#compare-a-side canvas") == 8)
    assert browser.pictures("#compare-a-side canvas") == a
    browser.assert_clean()


def test_live_counters_move_after_a_burst_of_calls(browser: Page, server) -> None:
    browser.open(f"http://{server.http}/")
    browser.wait(lambda: browser.count("#live-table tbody tr") > 0)

    def v1_calls() -> int:
        row = '#live-table tr[data-model="mnist-vae"][data-protocol="v1"]'
        script = "const r = document.querySelector(arguments[0]); return r ? Number(r.dataset.calls) : 0"
        found = browser.js(script, row)
        return int(found)

    before = v1_calls()
    with VaeClient(server.target, model="mnist-vae") as client:
        for _ in range(25):
            client.encode(np.zeros((1, 784), np.uint8))
    browser.wait(lambda: v1_calls() >= before + 25, timeout=20)
    browser.wait(lambda: browser.count("#live-chart canvas") > 0, timeout=20)
    browser.assert_clean()


def test_token_flow(browser: Page, console_repo: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    with servers.running(
        console_repo, tmp_path / "serve.log", "--token-file", str(token_file), client={"token": TOKEN}
    ) as guarded:
        browser.open(f"http://{guarded.http}/")
        browser.wait(lambda: browser.js("return !document.getElementById('token-panel').hidden"))
        assert browser.js("return document.getElementById('token').type") == "password"
        assert browser.js("return document.getElementById('console').hidden")
        assert http(guarded, "/v2/console/models")[0] == 401  # as any client without it
        browser.set("token", "not-the-token")
        browser.submit("token-form")
        browser.wait(
            lambda: "refused" in browser.js("return document.getElementById('token-error').textContent")
        )
        browser.set("token", TOKEN)
        browser.submit("token-form")
        browser.wait(lambda: browser.count("#sample-grid canvas") == 16)
        assert browser.js("return sessionStorage.getItem('vaeserve-token')") == TOKEN
        browser.driver.refresh()  # the tab keeps it
        browser.wait(lambda: browser.count("#sample-grid canvas") == 16)
        browser.assert_clean(allowed_status=(401,))
        browser.js("sessionStorage.clear()")


def test_a_flat_feature_model_is_drawn_as_a_heat_map(browser: Page, tmp_path: Path) -> None:
    from test_own_data import SMALL, ok, vae

    features = np.random.default_rng(0).beta(2, 5, size=(240, 20)).astype(np.float32)
    np.savez(tmp_path / "flat.npz", x_train=features[:200], x_test=features[200:])
    flags = ["--dataset", str(tmp_path / "flat.npz"), "--binarization", "none", "--no-progress", *SMALL]
    ok(vae("train", "--out", str(tmp_path / "run"), "--likelihood", "continuous-bernoulli", *flags))
    models = tmp_path / "models"
    ok(vae("export", "--checkpoint", str(tmp_path / "run"), "--repo", str(models), "--name", "flat"))
    with servers.running(models, tmp_path / "serve.log") as flat:
        browser.open(f"http://{flat.http}/")
        browser.wait(lambda: browser.count("#sample-grid canvas.heat") == 1)
        canvas = "document.querySelector('#sample-grid canvas')"
        size = browser.js(f"return [{canvas}.width, {canvas}.height]")
        assert size == [20, 16]  # a row of 20 features per sample
        assert browser.js("return document.getElementById('pad-box').hidden")
        browser.assert_clean()


# -- without a browser -----------------------------------------------------------------------------
class Scripts(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.inline, self.sources, self.handlers = 0, [], []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attributes = dict(attrs)
        self.handlers += [name for name in attributes if name.startswith("on")]
        if tag == "script":
            self.sources.append(attributes.get("src"))


def test_page_is_served_with_a_policy_against_inline_scripts(server) -> None:
    status, headers, body = http(server, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    policy = dict(part.strip().split(" ", 1) for part in headers["Content-Security-Policy"].split(";"))
    assert policy["script-src"] == "'self'" and policy["connect-src"] == "'self'"
    parser = Scripts()
    parser.feed(body.decode())
    assert parser.sources and all(src and src.startswith("/console/") for src in parser.sources)
    assert parser.handlers == []
    assert not re.search(rb"https?://", body)
    for source in parser.sources:
        status, asset_headers, _ = http(server, source)
        assert (
            status == 200 and asset_headers["Content-Security-Policy"] == headers["Content-Security-Policy"]
        )
    licence = http(server, "/console/vendor/LICENSE.dygraphs.txt")
    assert licence[0] == 200 and b"MIT" in licence[2]
    assert http(server, "/console/../settings.py")[0] == 404
    again = urllib.request.Request(f"http://{server.http}/", headers={"If-None-Match": headers["ETag"]})
    with pytest.raises(urllib.error.HTTPError) as not_modified:
        urllib.request.urlopen(again, timeout=10)
    assert not_modified.value.code == 304


def test_no_console_leaves_the_json_endpoints(console_repo: Path, tmp_path: Path) -> None:
    with servers.running(console_repo, tmp_path / "serve.log", env={"VAESERVE_CONSOLE": "false"}) as plain:
        status, _, body = http(plain, "/")
        assert status == 404 and "no such path" in json.loads(body)["error"]
        assert http(plain, "/v2/console/models")[0] == 200
        document = json.loads(http(plain, "/v2/openapi.json")[2])
        assert "/" not in document["paths"] and "/v2/console/live" in document["paths"]
        assert "web console off" in plain.output()


def test_every_worker_serves_the_page_and_the_live_view_counts_them_all(
    console_repo: Path, tmp_path: Path
) -> None:
    with servers.running(console_repo, tmp_path / "serve.log", "--workers", "2") as pool:
        for _ in range(8):  # a fresh connection each: SO_REUSEPORT spreads them over the workers
            assert http(pool, "/")[0] == 200
        calls = 30
        for _ in range(calls):
            assert http(pool, "/v2/models/mnist-vae-encoder")[0] == 200
        live = json.loads(http(pool, "/v2/console/live")[2])
        series = {(s["model"], s["protocol"]): s for s in live["series"]}
        assert series["mnist-vae", "oip-http"]["calls"] == calls
        assert series["mnist-vae", "oip-http"]["latency"]["+Inf"] == calls
        text = pool.metrics()
        labels = 'code="200",method="ModelMetadata",model="mnist-vae",protocol="oip-http"'
        assert f"vaeserve_requests_total{{{labels}}} 30.0" in text
    workers = {line.split("[worker ")[1][:3] for line in pool.output().splitlines() if "[worker " in line}
    assert workers == {"1/2", "2/2"}


def test_console_models_names_every_version_with_its_manifest_in_brief(server) -> None:
    body = http(server, "/v2/console/models")[2]
    (model,) = json.loads(body)["models"]
    assert (model["name"], model["latest"], model["labels"]) == ("mnist-vae", 2, {"stable": 1, "canary": 2})
    first = model["versions"][0]["manifest"]
    assert first["image_shape"] == [28, 28] and first["latent_size"] == 8
    assert len(first["unit_activity"]) == 8 and first["test"]["active_units"] <= 8
    reference = first["score_reference"]
    assert reference["iw_samples"] == 10 and set(reference["percentiles"]) >= {"elbo", "log_px", "ood_score"}
    assert len(first["sha256"]["encoder"]) == 12


def test_every_file_of_the_page_ships_in_the_package() -> None:
    """pyproject's package-data names every file under static/: none is left out of a wheel."""
    import fnmatch

    import tomllib

    from vaeserve.service.console.routes import STATIC, load_assets

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = patterns["vaeserve.service.console"]
    files = [p.relative_to(STATIC.parent).as_posix() for p in STATIC.rglob("*") if p.is_file()]
    assert files and all(any(fnmatch.fnmatch(f, pattern) for pattern in shipped) for f in files), files
    assert {"index.html", "console.js", "console.css", "vendor/dygraph.min.js"} <= set(load_assets())
