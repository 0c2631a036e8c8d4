"""The README's first command end to end: download, md5 check and extraction of the CIFAR-10 archive,
against a small archive in the official layout served from 127.0.0.1 by the test itself."""
import hashlib
import http.server
import io
import shutil
import tarfile
import threading

import pytest
import torch

import cifar10

import utils
from conftest import assert_one_line_error, run_script

FILE = cifar10.CIFAR10_ARCHIVE


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """cifar-10-python.tar.gz in the official layout (100 train + 50 test synthetic images, plus the
    readme.html the real one has) with one more member whose name points outside the folder."""
    root = tmp_path_factory.mktemp("archive")
    train = cifar10.make_synthetic_images(100, seed=20)
    test = cifar10.make_synthetic_images(50, seed=21)
    folder = cifar10.write_cifar10_folder(root / "src", *train, *test, [f"kind-{k}" for k in range(10)])
    (folder / "readme.html").write_text("<html>not read</html>")
    with tarfile.open(root / FILE, "w:gz") as tar:
        tar.add(folder, arcname=cifar10.CIFAR10_FOLDER)
        escape = tarfile.TarInfo(f"{cifar10.CIFAR10_FOLDER}/../escaped.txt")
        escape.size = 3
        tar.addfile(escape, io.BytesIO(b"out"))
    return root / FILE, folder


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    requests = 0
    cut = False  # send a Content-Length of the whole archive, write half of it, close
    body = b""


class Handler(http.server.BaseHTTPRequestHandler):
    timeout = 10  # a stuck client cannot hold the server

    def do_GET(self):
        self.server.requests += 1
        if self.path != f"/{FILE}":
            self.send_error(404)
            return
        body = self.server.body
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:len(body) // 2] if self.server.cut else body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(archive, monkeypatch):
    """A local HTTP server of the archive, counting requests; data.py is pointed at it."""
    srv = Server(("127.0.0.1", 0), Handler)
    srv.body = archive[0].read_bytes()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    env = {cifar10.URL_FOR_TESTS: f"http://127.0.0.1:{srv.server_address[1]}/{FILE}",
           cifar10.MD5_FOR_TESTS: hashlib.md5(srv.body).hexdigest(), "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # for data.py in this process
    srv.env = env  # for train.py in a subprocess
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)


def assert_extracted_exactly(data_dir, source):
    folder = data_dir / cifar10.CIFAR10_FOLDER
    assert sorted(p.name for p in folder.iterdir()) == sorted(cifar10.DATASET_FILES)
    for name in cifar10.DATASET_FILES:
        assert (folder / name).read_bytes() == (source / name).read_bytes()
    assert sorted(p.name for p in data_dir.iterdir()) == sorted([FILE, cifar10.CIFAR10_FOLDER])  # no leftovers


def test_an_empty_data_dir_downloads_verifies_extracts_and_trains(server, archive, tmp_path):
    data_dir = tmp_path / "data"
    proc = run_script("train.py", "--data-dir", data_dir, "--width", 4, "--batch-size", 32, "--iterations", 2,
                      "--checkpoint", tmp_path / "c.pt", "--figures-dir", tmp_path / "f", env=server.env)
    assert proc.returncode == 0, proc.stderr
    assert server.requests == 1
    assert_extracted_exactly(data_dir, archive[1])
    assert not (tmp_path / "escaped.txt").exists()
    # the extracted files are not the official ones, so the run does not call them CIFAR-10
    name = torch.load(tmp_path / "c.pt", weights_only=True)["config"]["data_name"]
    assert name == f"{data_dir} (not the official CIFAR-10; classes {', '.join(f'kind-{k}' for k in range(10))})"
    assert f"on {name}: 100 train / 50 test images" in proc.stdout


def test_a_second_run_reads_the_extracted_folder_without_a_request(server, archive, tmp_path):
    data_dir = tmp_path / "data"
    first = cifar10.load_cifar10(data_dir, train=True)
    assert server.requests == 1
    proc = run_script("train.py", "--data-dir", data_dir, "--width", 4, "--batch-size", 32, "--iterations", 2,
                      "--checkpoint", tmp_path / "c.pt", "--figures-dir", tmp_path / "f", env=server.env)
    assert proc.returncode == 0, proc.stderr
    assert server.requests == 1
    assert torch.equal(cifar10.load_cifar10(data_dir, train=True)[0], first[0]) and server.requests == 1


def test_an_archive_with_the_wrong_md5_is_refused_and_leaves_nothing(server, archive, tmp_path):
    data_dir = tmp_path / "data"
    proc = run_script("train.py", "--data-dir", data_dir, "--checkpoint", tmp_path / "c.pt",
                      env={**server.env, cifar10.MD5_FOR_TESTS: "0" * 32})
    line = assert_one_line_error(proc, "has md5 " + server.env[cifar10.MD5_FOR_TESTS], "not " + "0" * 32, "deleted")
    assert server.requests == 1 and "127.0.0.1" in line
    assert list(data_dir.iterdir()) == [] and not (tmp_path / "c.pt").exists()
    cifar10.load_cifar10(data_dir, train=False)  # a later run (right md5) downloads it anew
    assert server.requests == 2
    assert_extracted_exactly(data_dir, archive[1])


def test_a_download_cut_off_mid_file_is_refused_and_leaves_nothing(server, archive, tmp_path):
    data_dir = tmp_path / "data"
    server.cut = True
    with pytest.raises(utils.UserError) as err:
        cifar10.load_cifar10(data_dir, train=True)
    size = len(server.body)
    assert f"stopped after {size // 2:,} of {size:,} bytes" in str(err.value) and "\n" not in str(err.value)
    assert server.requests == 1 and list(data_dir.iterdir()) == []
    server.cut = False
    cifar10.load_cifar10(data_dir, train=True)
    assert server.requests == 2
    assert_extracted_exactly(data_dir, archive[1])


def test_an_archive_already_in_data_dir_is_verified_and_extracted_without_a_request(server, archive, tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / FILE).write_bytes(archive[0].read_bytes()[:-100] + bytes(100))  # damaged copy
    with pytest.raises(utils.UserError) as err:
        cifar10.load_cifar10(data_dir, train=True)
    assert f"{data_dir / FILE} has md5" in str(err.value) and "delete it" in str(err.value)
    assert sorted(p.name for p in data_dir.iterdir()) == [FILE]  # kept (the user's file), nothing extracted
    shutil.copy(archive[0], data_dir / FILE)
    images, labels, classes = cifar10.load_cifar10(data_dir, train=True)
    assert images.shape == (100, 3, 32, 32) and classes == [f"kind-{k}" for k in range(10)]
    assert server.requests == 0
    assert_extracted_exactly(data_dir, archive[1])
