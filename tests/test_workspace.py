"""Console workspaces: files that sandboxed code can also write.  The code runs as the server's
own user on the host, so it may plant symlinks, FIFOs and renamed files at any moment; the
server must neither follow them nor hang on them."""

import os

import pytest

from glmkit.server.workspace import Workspaces

CID = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def ws(tmp_path):
    w = Workspaces(tmp_path / "workspaces")
    w.path(CID).mkdir(parents=True)
    return w


def read(ws, name):
    fd, size = ws.open(CID, name)
    with os.fdopen(fd, "rb") as f:
        return f.read(), size


def test_upload_replaces_a_planted_symlink_instead_of_writing_through_it(ws, tmp_path):
    secret = tmp_path / "server-file.txt"
    secret.write_text("precious")
    os.symlink(secret, ws.path(CID) / "data.csv")
    ws.save(CID, "data.csv", b"a,1\n")
    assert secret.read_text() == "precious"
    assert not os.path.islink(ws.path(CID) / "data.csv") and read(ws, "data.csv") == (b"a,1\n", 4)
    assert [f["name"] for f in ws.list(CID)] == ["data.csv"]       # no temporary file left behind


def test_download_never_follows_symlinks_or_opens_fifos(ws, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "id_rsa").write_text("key")
    base = ws.path(CID)
    os.symlink(outside / "id_rsa", base / "out.csv")
    os.symlink(outside, base / "linked_dir")
    os.mkfifo(base / "pipe")
    (base / "sub").mkdir()
    (base / "sub" / "ok.txt").write_text("fine")
    for name in ("out.csv", "linked_dir/id_rsa", "pipe", "../outside/id_rsa", "sub/../out.csv", "sub", ""):
        with pytest.raises(FileNotFoundError):
            ws.open(CID, name)
    assert read(ws, "sub/ok.txt") == (b"fine", 4)
    assert [f["name"] for f in ws.list(CID)] == ["sub/ok.txt"]


@pytest.mark.parametrize("name", [".hidden", "a/b", "..", "x" * 201, "bad\nname"])
def test_upload_names_are_plain(ws, name):
    from glmkit.errors import GlmkitError
    with pytest.raises(GlmkitError):
        ws.save(CID, name, b"x")


def test_listing_is_bounded_and_errors_are_plain(ws):
    from glmkit.errors import GlmkitError
    deep = ws.path(CID)
    for i in range(40):
        deep = deep / f"d{i}"
    deep.mkdir(parents=True)
    (deep / "bottom.txt").write_text("x")
    (ws.path(CID) / "top.txt").write_text("y")
    assert [f["name"] for f in ws.list(CID)] == ["top.txt"]         # below max_depth is not walked
    (ws.path(CID) / "adir").mkdir()
    with pytest.raises(GlmkitError):
        ws.save(CID, "adir", b"x")                                  # a directory of that name: a clear error
    with pytest.raises(FileNotFoundError):
        ws.open(CID, "top.txt\0")


def test_uploads_respect_the_workspace_quota(tmp_path):
    """The sandbox stops code that fills the workspace past its quota; uploads obey the same one."""
    from glmkit.errors import GlmkitError
    w = Workspaces(tmp_path / "workspaces", quota_bytes=64 * 1024)
    w.save(CID, "a.bin", b"x" * 40_000)
    w.save(CID, "a.bin", b"y" * 50_000)                 # replacing a file counts only the new bytes
    with pytest.raises(GlmkitError, match="workspace is full"):
        w.save(CID, "b.bin", b"z" * 30_000)
    assert sorted(f["name"] for f in w.list(CID)) == ["a.bin"]
    assert read(w, "a.bin")[1] == 50_000
