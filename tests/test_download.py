"""The real download code against a local HTTP server on 127.0.0.1."""

import gzip
import hashlib
import http.server
import threading

import numpy as np
import pytest

from fastnn import DataError
from fastnn.datasets import IDX_FILES, REGISTRY, load
from fastnn.download import cache_dir, download


def idx_gz(a: np.ndarray) -> bytes:
    raw = bytes([0, 0, 0x08, a.ndim]) + np.array(a.shape, ">u4").tobytes() + a.tobytes()
    return gzip.compress(raw)


class Handler(http.server.BaseHTTPRequestHandler):
    files: dict = {}  # path -> bytes
    drop: set = set()  # paths whose connection is cut halfway

    def do_GET(self):
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in self.drop:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    Handler.files, Handler.drop = {}, set()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTNN_DATA", raising=False)


def md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def test_published_mnist_checksums_are_pinned():
    assert REGISTRY["mnist"]["md5"] == {
        "train_images": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train_labels": "d53e105ee54ea40749a09fcbcd1e9432",
        "test_images": "9fb629c4189551a2d022fa330f9573f3",
        "test_labels": "ec29112dd5afa0611ce80d1b7f02629c",
    }
    assert REGISTRY["mnist"]["mirrors"][0] == "https://ossci-datasets.s3.amazonaws.com/mnist/"
    assert "yann.lecun.com" in REGISTRY["mnist"]["mirrors"][1]


def test_good_download(server, tmp_path):
    body = b"x" * 100_000
    Handler.files["/a.gz"] = body
    dest = tmp_path / "out" / "a.gz"
    download([server + "/a.gz"], dest, md5(body), progress=False)
    assert dest.read_bytes() == body
    assert sorted(p.name for p in dest.parent.iterdir()) == ["a.gz"]


def test_404_then_second_mirror(server, tmp_path):
    body = b"payload"
    Handler.files["/m2/a.gz"] = body
    dest = tmp_path / "a.gz"
    download([server + "/m1/a.gz", server + "/m2/a.gz"], dest, md5(body), progress=False)
    assert dest.read_bytes() == body


def test_md5_mismatch_leaves_nothing(server, tmp_path):
    Handler.files["/a.gz"] = b"tampered"
    dest = tmp_path / "a.gz"
    with pytest.raises(DataError, match="MD5 .* does not match"):
        download([server + "/a.gz"], dest, md5(b"original"), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_dropped_connection_leaves_nothing(server, tmp_path):
    body = b"y" * 200_000
    Handler.files["/a.gz"] = body
    Handler.drop.add("/a.gz")
    dest = tmp_path / "a.gz"
    with pytest.raises(DataError, match="a.gz"):
        download([server + "/a.gz"], dest, md5(body), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_every_mirror_failing_is_one_message(server, tmp_path):
    with pytest.raises(DataError) as info:
        download([server + "/x/a.gz", server + "/y/a.gz"], tmp_path / "a.gz", "0" * 32, progress=False)
    msg = str(info.value)
    assert msg.count("HTTP Error 404") == 2 and "/x/a.gz" in msg and "/y/a.gz" in msg


def test_named_dataset_downloads_into_the_cache_and_reuses_it(server, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    arrays = {"train_images": rng.integers(0, 256, (8, 28, 28), dtype=np.uint8),
              "train_labels": rng.integers(0, 10, 8).astype(np.uint8),
              "test_images": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
              "test_labels": rng.integers(0, 10, 3).astype(np.uint8)}
    bodies = {k: idx_gz(a) for k, a in arrays.items()}
    for k, stem in IDX_FILES.items():
        Handler.files[f"/good/{stem}.gz"] = bodies[k]
    monkeypatch.setitem(REGISTRY["mnist"], "md5", {k: md5(b) for k, b in bodies.items()})
    mirrors = [server + "/missing/", server + "/good/"]
    (tmp_path / "empty").mkdir()  # a data folder without the files: they are downloaded into the cache
    ds = load("mnist", root=tmp_path / "empty", mirrors=mirrors, progress=False)
    np.testing.assert_array_equal(ds.test_labels, arrays["test_labels"])
    cache = cache_dir() / "mnist"
    assert sorted(p.name for p in cache.iterdir()) == sorted(s + ".gz" for s in IDX_FILES.values())
    Handler.files.clear()  # offline now: the verified cache is used
    ds2 = load("mnist", mirrors=mirrors, progress=False)
    np.testing.assert_array_equal(ds2.train_images, ds.train_images)


def test_corrupt_mirror_then_offline_message(server, tmp_path, monkeypatch):
    for stem in IDX_FILES.values():
        Handler.files[f"/bad/{stem}.gz"] = b"<html>oops</html>"
    with pytest.raises(DataError) as info:
        load("mnist", root=tmp_path, mirrors=[server + "/bad/"], progress=False)
    msg = str(info.value)
    assert "MD5" in msg and "not found in" in msg and "FASTNN_DATA" in msg
    assert not (tmp_path / "cache").exists()  # the cache folders it created for the download are gone too


def test_a_failed_download_removes_the_folders_it_created_and_only_those(server, tmp_path):
    (tmp_path / "kept").mkdir()
    dest = tmp_path / "kept" / "new" / "deeper" / "a.gz"
    with pytest.raises(DataError, match="download failed from every mirror"):
        download([server + "/nothing.gz"], dest, "0" * 32, progress=False)
    assert list(tmp_path.iterdir()) == [tmp_path / "kept"] and list((tmp_path / "kept").iterdir()) == []


def test_a_folder_holding_a_good_download_is_kept_when_the_next_fails(server, tmp_path):
    Handler.files["/a.gz"] = b"good"
    folder = tmp_path / "new"
    download([server + "/a.gz"], folder / "a.gz", md5(b"good"), progress=False)
    with pytest.raises(DataError):
        download([server + "/b.gz"], folder / "b.gz", md5(b"other"), progress=False)
    assert [p.name for p in folder.iterdir()] == ["a.gz"]


def test_a_download_folder_that_cannot_be_made_is_a_data_error(server, tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match=r"afile/sub: cannot create the download folder"):
        download([server + "/a.gz"], tmp_path / "afile" / "sub" / "a.gz", "0" * 32, progress=False)
