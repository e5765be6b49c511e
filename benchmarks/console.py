"""The web console against a live `vae serve`, in headless Chromium: how long the page takes to
draw its first samples, what it weighs, and the screenshots docs/console.md shows.

    python -m benchmarks.console --repo MODELS --data-dir ../shared/data/mnist --shots docs/images

Every load runs with the browser's cache off, so each one fetches every file again. The
screenshots walk the page as a user would: the model list, samples, an MNIST test digit
uploaded and scored, an interpolation and a traversal, two versions (the first two labels, or
the first and latest versions) side by side, and the live view after a burst of calls.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.cuda_parity import serving
from vaeserve import sandbox
from vaeserve.client import VaeClient
from vaeserve.datasets import load_dataset

FIRST_SAMPLES = "vaeserve:first-samples"  # the mark console.js sets when its first grid is drawn
SECTIONS = ("models", "samples", "input", "latent", "compare", "live")


def first_render(driver, url: str, loads: int) -> dict:
    """Milliseconds from navigation to DOMContentLoaded and to the first sample grid, and the
    bytes the page fetched, over ``loads`` uncached loads."""
    driver.execute_cdp_cmd("Network.setCacheDisabled", {"cacheDisabled": True})
    runs = []
    for _ in range(loads):
        driver.get(url)
        _wait(driver, f"return performance.getEntriesByName('{FIRST_SAMPLES}').length > 0")
        runs.append(
            driver.execute_script(
                "const n = performance.getEntriesByType('navigation')[0];"
                f"const drawn = performance.getEntriesByName('{FIRST_SAMPLES}')[0].startTime;"
                "const files = performance.getEntriesByType('resource')"
                ".filter(r => r.name.includes('/console/'));"
                "return {dom_ms: n.domContentLoadedEventEnd, samples_ms: drawn,"
                " bytes: n.transferSize + files.reduce((s, r) => s + r.transferSize, 0)}"
            )
        )
    return {
        key: {"median": statistics.median(r[key] for r in runs), "max": max(r[key] for r in runs)}
        for key in ("dom_ms", "samples_ms", "bytes")
    }


def _wait(driver, script: str, timeout: float = 60) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout, poll_frequency=0.02).until(lambda d: d.execute_script(script))


def _count(selector: str, count: int) -> str:
    return f"return document.querySelectorAll('{selector}').length >= {count}"


def _submit(driver, form: str) -> None:
    driver.execute_script("document.getElementById(arguments[0]).requestSubmit()", form)


def _choose(driver, select: str, value: str) -> None:
    driver.execute_script(
        "const s = document.getElementById(arguments[0]); s.value = arguments[1];"
        "s.dispatchEvent(new Event('change'))",
        select,
        value,
    )


def screenshots(driver, url: str, target: str, digit: Path, folder: Path) -> list[Path]:
    """The page walked through, one PNG per section and one of the whole page."""
    driver.execute_cdp_cmd("Network.setCacheDisabled", {"cacheDisabled": False})
    driver.get(url)
    _wait(driver, _count("#sample-grid canvas", 16))
    driver.find_element("id", "input-file").send_keys(str(digit))
    _wait(driver, _count("#input-image canvas", 1))
    _submit(driver, "input-form")
    _wait(driver, _count("#input-scores td[data-score]", 4))
    _choose(driver, "latent-b", "input")
    _submit(driver, "latent-form")
    _wait(driver, _count("#latent-strip canvas", 10))
    _submit(driver, "traverse-form")
    _wait(driver, _count("#latent-traversal canvas", 11))
    a, b = _two_versions(driver)
    _choose(driver, "compare-a", a)
    _choose(driver, "compare-b", b)
    _submit(driver, "compare-form")
    _wait(driver, _count("#compare-b-side table td[data-score]", 4))
    _burst(target, seconds=12)
    _wait(driver, _count("#live-chart canvas", 1))
    folder.mkdir(parents=True, exist_ok=True)
    # A window as tall as the page: an element is only captured where the viewport shows it.
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(driver.get_window_size()["width"], height + 100)
    shots = []
    for section in SECTIONS:
        path = folder / f"console-{section}.png"
        driver.find_element("id", section).screenshot(str(path))
        shots.append(path)
    whole = folder / "console.png"
    driver.find_element("tag name", "body").screenshot(str(whole))
    return [*shots, whole]


def _two_versions(driver) -> tuple[str, str]:
    """Two labels (the older version's first: stable, then canary), else the first and latest
    versions."""
    choices = driver.execute_script(
        "return [...document.getElementById('compare-a').options].map(o => [o.value, o.text])"
    )
    labels = sorted((text.rsplit(" ", 1)[-1], value) for value, text in choices if "→" in text)
    if len(labels) >= 2:
        return labels[0][1], labels[-1][1]
    numbers = [value for value, _ in choices if value.isdecimal()]
    return numbers[0], numbers[-1]


def _burst(target: str, seconds: float) -> None:
    """Calls of every kind for ``seconds``, at a rate the chart can show rising and falling."""
    rows = np.zeros((8, 784), np.uint8)
    ends = time.monotonic() + seconds
    with VaeClient(target) as client:
        while time.monotonic() < ends:
            client.encode(rows)
            client.sample_prior(4, seed=1)
            time.sleep(0.01 if time.monotonic() % 4 < 2 else 0.05)


def _digit(data_dir: Path | None, folder: Path) -> Path:
    images, _ = load_dataset("mnist", data_dir=data_dir).split("test")
    path = folder / "digit.png"
    Image.fromarray(images[0].reshape(28, 28).astype(np.uint8), "L").save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, required=True, help="a model repository (vae export's)")
    parser.add_argument("--data-dir", type=Path, help="MNIST's IDX files (the digit uploaded)")
    parser.add_argument("--loads", type=int, default=10, help="uncached page loads timed (default 10)")
    parser.add_argument("--shots", type=Path, help="write the screenshots here (docs/images)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    missing = sandbox.chromium_missing()
    if missing:
        parser.error(missing)
    driver = sandbox.start_chromium(1280, 1000)
    try:
        with serving(args.repo, "cpu") as (target, http):
            url = f"http://{http}/"
            timing = first_render(driver, url, args.loads)
            shots = []
            if args.shots:
                with tempfile.TemporaryDirectory() as work:
                    shots = screenshots(driver, url, target, _digit(args.data_dir, Path(work)), args.shots)
    finally:
        driver.quit()
    print(f"| load ({args.loads}, uncached) | median | max |\n|---|---|---|")
    for key, label in (("dom_ms", "DOMContentLoaded, ms"), ("samples_ms", "16 samples drawn, ms")):
        print(f"| {label} | {timing[key]['median']:.0f} | {timing[key]['max']:.0f} |")
    print(f"| bytes fetched | {timing['bytes']['median']:,.0f} | {timing['bytes']['max']:,.0f} |")
    for shot in shots:
        print(f"wrote {shot}")
    if args.json:
        args.json.write_text(json.dumps(timing, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
