"""The download path against a real HTTP server on 127.0.0.1: good, corrupted, gone."""

import hashlib
import http.server
import threading
from functools import partial
from pathlib import Path

import pytest

from vaeserve.download import RemoteFile, fetch
from vaeserve.errors import DatasetUnavailableError


@pytest.fixture
def server(tmp_path: Path):
    served = tmp_path / "served"
    served.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def test_good_file_is_verified_and_cached(server, tmp_path: Path, mnist_dir: Path) -> None:
    served, url = server
    content = (mnist_dir / "t10k-labels-idx1-ubyte.gz").read_bytes()
    (served / "labels.gz").write_bytes(content)
    file = RemoteFile("labels.gz", hashlib.sha256(content).hexdigest())
    cache = tmp_path / "cache"
    path = fetch(file, (url,), cache, progress=False)
    assert path == cache / "labels.gz" and path.read_bytes() == content
    (served / "labels.gz").unlink()  # a second use is served from the cache
    assert fetch(file, (url,), cache, progress=False).read_bytes() == content


def test_corrupted_file_never_reaches_the_cache(server, tmp_path: Path) -> None:
    served, url = server
    (served / "labels.gz").write_bytes(b"not what was published")
    file = RemoteFile("labels.gz", hashlib.sha256(b"the published bytes").hexdigest())
    cache = tmp_path / "cache"
    with pytest.raises(DatasetUnavailableError, match="checksum mismatch"):
        fetch(file, (url,), cache, progress=False)
    assert not any(cache.glob("*")) if cache.exists() else True


def test_falls_back_to_the_next_mirror(server, tmp_path: Path) -> None:
    served, url = server
    (served / "f").write_bytes(b"payload")
    file = RemoteFile("f", hashlib.sha256(b"payload").hexdigest())
    dead = "http://127.0.0.1:9/"  # discard port: nothing listens
    assert fetch(file, (dead, url), tmp_path / "c", progress=False).read_bytes() == b"payload"


def test_server_gone_says_offline(tmp_path: Path) -> None:
    file = RemoteFile("f", "0" * 64)
    with pytest.raises(DatasetUnavailableError, match=r"offline or mirrors unreachable.*--data-dir"):
        fetch(file, ("http://127.0.0.1:9/",), tmp_path / "c", progress=False)
