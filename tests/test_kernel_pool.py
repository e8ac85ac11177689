"""The kernel pool: one kernel per key, the least recently used idle one closed first and one in
use never, temporary workspaces removed with their kernel, leases that make a kernel only for code."""

import tempfile

import pytest

from glmkit.errors import GlmkitError
from glmkit.sandbox import CellResult, KernelPool

KEYS = [f"{i:032x}" for i in range(4)]


class FakeKernel:
    closed: list = []

    def __init__(self, workspace):
        self.workspace, self.cells = workspace, []

    def run(self, code):
        self.cells.append(code)
        return CellResult("ran")

    def interrupt(self):
        return False

    def close(self, final=False):
        FakeKernel.closed.append(self.workspace.name)


@pytest.fixture
def pool(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))    # where temporary workspaces go
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(FakeKernel, "closed", [])
    return KernelPool(FakeKernel, max_kernels=2)


def test_kernels_in_use_are_never_evicted(pool, tmp_path):
    busy = pool.acquire(KEYS[0], tmp_path / KEYS[0])        # a long cell is running here
    for k in KEYS[1:]:                                      # three more conversations each run a cell
        pool.acquire(k, tmp_path / k)
        pool.release(k)
    # at most 2 stay up: the idle ones go, oldest first; the busy one stays although oldest
    assert FakeKernel.closed == [KEYS[1], KEYS[2]]
    last = pool.acquire(KEYS[3])
    pool.release(KEYS[3])
    assert last.workspace.name == KEYS[3] and FakeKernel.closed == [KEYS[1], KEYS[2]]
    pool.release(KEYS[0])
    assert pool.acquire(KEYS[0]) is busy                    # same kernel, variables kept
    pool.close(KEYS[0])                                     # e.g. the conversation is deleted: not under the turn...
    assert KEYS[0] not in FakeKernel.closed
    pool.release(KEYS[0])                                   # ...but as soon as the turn lets go
    assert FakeKernel.closed[-1] == KEYS[0] and pool.acquire(KEYS[0], tmp_path / KEYS[0]) is not busy


def test_a_temporary_workspace_goes_with_its_kernel_and_a_given_one_stays(pool, tmp_path):
    mine = pool.acquire("request")
    assert mine.workspace.is_dir() and mine.workspace.parent == tmp_path / "tmp"
    given = pool.acquire("conversation", tmp_path / "ws")
    (tmp_path / "ws").mkdir()
    pool.release("request")
    pool.close("request")
    pool.close_all()
    assert not mine.workspace.exists() and (tmp_path / "ws").is_dir()
    assert FakeKernel.closed == [mine.workspace.name, given.workspace.name]


def test_a_kernel_that_cannot_be_made_leaves_no_workspace(pool, tmp_path):
    def no_sandbox(workspace):
        raise GlmkitError("the code interpreter needs a sandbox")
    pool.make_kernel = no_sandbox
    with pytest.raises(GlmkitError):
        pool.acquire("request")
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_lease_makes_its_kernel_at_the_first_cell_and_closes_it_with_its_workspace(pool, tmp_path):
    unused = pool.lease("tools-only")
    unused.close()
    assert FakeKernel.closed == [] and list((tmp_path / "tmp").iterdir()) == []   # no code: no kernel
    lease = pool.lease("request")
    assert lease.run("print(1)").text == "ran"
    (workspace,) = (tmp_path / "tmp").iterdir()
    lease.close()
    assert FakeKernel.closed == [workspace.name] and not workspace.exists()


def test_a_stopped_lease_runs_no_further_cell(pool, tmp_path):
    lease = pool.lease(KEYS[0], tmp_path / KEYS[0])
    lease.run("x = 1")
    lease.interrupt()                                        # the browser pressed Stop
    assert lease.run("x").error
    lease.release()
    again = pool.lease(KEYS[0], tmp_path / KEYS[0])          # the conversation's next turn: same kernel
    again.run("x")
    assert pool.acquire(KEYS[0]).cells == ["x = 1", "x"]
