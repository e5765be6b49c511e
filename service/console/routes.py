"""The console's routes on the REST app: the page and its files, and its two JSON endpoints.

The page and its files need no token (the page asks for one when the API answers 401); the JSON
endpoints need the clients' token like every other call (service.policy). Every file of the
page is read once at start and answered with a Content-Security-Policy that allows scripts,
styles, images and calls from this origin only, and no inline script.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import orjson
from aiohttp import web

from vaeserve.service.manager import ModelManager
from vaeserve.service.metrics import Metrics

STATIC = Path(__file__).parent / "static"
INDEX = "index.html"
TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".txt": "text/plain",
}
# Style attributes are allowed (the vendored chart library sets some); <style> elements, inline
# scripts, eval, plugins, frames and every other origin are not.
CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "style-src-elem 'self'",
        "style-src-attr 'unsafe-inline'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidated by ETag: a new vaeserve's page is never stale
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


def load_assets(folder: Path = STATIC) -> dict[str, Asset]:
    """Every file of the page by its path under ``folder``; only these are ever answered."""
    assets = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in TYPES:
            body = path.read_bytes()
            etag = f'"{hashlib.sha256(body).hexdigest()[:16]}"'
            assets[path.relative_to(folder).as_posix()] = Asset(body, TYPES[path.suffix], etag)
    return assets


class Console:
    """The console on the REST app; ``page`` False (--no-console) leaves the JSON endpoints only."""

    def __init__(self, manager: ModelManager, metrics: Metrics, page: bool) -> None:
        self.manager = manager
        self.metrics = metrics
        self.assets = load_assets() if page else {}

    @property
    def serves_page(self) -> bool:
        return bool(self.assets)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v2/console/models", self.models, name="ConsoleModels")
        app.router.add_get("/v2/console/live", self.live, name="ConsoleLive")
        if self.serves_page:
            app.router.add_get("/", self.index, name="Console")
            # Any name at all (newlines too) reaches asset(): 404 unless it is one of the page's.
            app.router.add_get(r"/console/{file:[\s\S]+}", self.asset, name="ConsoleAsset")

    async def models(self, request: web.Request) -> web.Response:
        return _json({"models": self.manager.overview()})

    async def live(self, request: web.Request) -> web.Response:
        return _json(self.metrics.live())

    async def index(self, request: web.Request) -> web.Response:
        return _answer(request, self.assets[INDEX])

    async def asset(self, request: web.Request) -> web.Response:
        found = self.assets.get(request.match_info["file"])
        if found is None:
            raise web.HTTPNotFound()
        return _answer(request, found)


def _json(body: dict) -> web.Response:
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def _answer(request: web.Request, asset: Asset) -> web.Response:
    headers = {**HEADERS, "ETag": asset.etag}
    if request.headers.get("If-None-Match") == asset.etag:
        return web.Response(status=304, headers=headers)
    return web.Response(body=asset.body, content_type=asset.content_type, charset="utf-8", headers=headers)
