"""Cluster lifecycle: start, shutdown, driver death, worker output, token, fork server."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import grpc
import psutil
import pytest

import rayx
from rayx.protocol import rayx_pb2 as pb
from rayx.protocol import rayx_pb2_grpc

from .conftest import REPO, rayx_processes, rayx_segments, wait_for


def _session_processes(session_dir: str) -> list[psutil.Process]:
    return rayx_processes(session_dir)


def _run_driver(code: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def test_shutdown_leaves_no_process_or_segment(fresh_cluster):
    import numpy as np

    info = fresh_cluster(num_cpus=2)

    @rayx.remote
    class A:
        def ping(self):
            return "pong"

    a = A.remote()
    ref = rayx.put(np.zeros(1_000_000))
    assert rayx.get(a.ping.remote()) == "pong"
    procs = _session_processes(info.session_dir)
    assert len(procs) >= 3  # node, fork server, workers
    store = rayx.nodes()[0]["StoreDir"]
    assert os.listdir(store)
    sockets = os.path.join(info.session_dir, "sockets")
    assert any(name.startswith("w-") for name in os.listdir(sockets))
    del ref
    rayx.shutdown()
    wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                             for p in procs), 10, what="cluster processes to exit")
    assert not os.path.exists(store)
    assert os.listdir(sockets) == []  # the session's logs stay; its socket files go


def test_workers_are_forked_from_the_template_process(fresh_cluster):
    fresh_cluster(num_cpus=1)

    @rayx.remote
    def parent_cmdline():
        return " ".join(psutil.Process(os.getppid()).cmdline())

    assert "rayx.fork_server" in rayx.get(parent_cmdline.remote())


@pytest.mark.parametrize("driver_imports", ["", "pandas"])
def test_workers_start_with_the_libraries_the_driver_imported(driver_imports):
    """A local cluster's fork server imports numpy and pandas only if the driver has: they
    are then shared by every worker, and a driver that uses neither starts faster."""
    driver = _run_driver(f"""
        import sys
        {"import " + driver_imports if driver_imports else ""}
        import rayx
        rayx.init(num_cpus=1)
        @rayx.remote
        def loaded():
            import sys
            return sorted(name for name in ("numpy", "pandas") if name in sys.modules)
        import json
        print("LOADED", json.dumps([rayx.get(loaded.remote()),
              sorted(name for name in ("numpy", "pandas") if name in sys.modules)]))
        rayx.shutdown()
    """)
    out, _ = driver.communicate(timeout=60)
    assert driver.returncode == 0, out
    line = next(line for line in out.splitlines() if line.startswith("LOADED"))
    in_worker, in_driver = json.loads(line.removeprefix("LOADED "))
    assert in_worker == in_driver  # pandas brings numpy with it
    assert ("pandas" in in_worker) == (driver_imports == "pandas")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


IGNORES_SIGTERM = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                   "print('ready', flush=True); time.sleep(600)")


def _whereabouts(pids: list[int]) -> str:
    """For a failure message: what is left of each child, and in which process group."""
    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            out.append(f"pid {pid} {p.status()} ppid {p.ppid()} pgid {os.getpgid(pid)}")
        except (psutil.Error, OSError):
            out.append(f"pid {pid} gone")
    return "; ".join(out)


def _start_children() -> dict:
    """In a task: one child that exits on SIGTERM and one that ignores it."""
    plain = subprocess.Popen(["sleep", "600"])
    stubborn = subprocess.Popen([sys.executable, "-c", IGNORES_SIGTERM], stdout=subprocess.PIPE)
    stubborn.stdout.readline()  # its handler is set
    return {"worker": os.getpid(), "children": [plain.pid, stubborn.pid]}


def test_processes_a_task_started_end_at_shutdown(fresh_cluster):
    fresh_cluster(num_cpus=1)
    out = rayx.get(rayx.remote(_start_children).remote())
    assert not any(_gone(pid) for pid in out["children"])
    node, began = rayx.api._node.process, time.monotonic()
    rayx.shutdown()
    try:
        wait_for(lambda: all(_gone(pid) for pid in out["children"]), 10,
                 what="the task's child processes to end with its worker")
    except BaseException:
        print(f"shutdown took {time.monotonic() - began:.1f} s, node exit code {node.returncode}"
              f"; worker {out['worker']}; children: {_whereabouts(out['children'])}")
        raise


def test_processes_a_task_started_end_when_its_worker_retires(fresh_cluster):
    """The worker ends itself (max_calls): SIGTERM to its group, SIGKILL for what ignores it."""
    fresh_cluster(num_cpus=1)
    out = rayx.get(rayx.remote(max_calls=1)(_start_children).remote())
    wait_for(lambda: all(_gone(pid) for pid in out["children"]), 10,
             what="the children of a retired worker to end")
    assert rayx.get(rayx.remote(lambda: 1).remote()) == 1  # the node goes on


def _pid_and_worker_id() -> tuple[int, str]:
    return os.getpid(), rayx.get_runtime_context().get_worker_id()


def test_a_worker_that_ends_leaves_no_socket_file(fresh_cluster):
    info = fresh_cluster(num_cpus=1)
    pid, worker_id = rayx.get(rayx.remote(max_calls=1)(_pid_and_worker_id).remote())
    path = os.path.join(info.session_dir, "sockets", f"w-{worker_id}.sock")
    wait_for(lambda: _gone(pid) and not os.path.exists(path), 10,
             what="the retired worker to exit and its socket file to go")
    assert rayx.get(rayx.remote(_pid_and_worker_id).remote())[1] != worker_id


class _ChildStarter:
    def start(self) -> dict:
        return _start_children()


def test_processes_an_actor_started_end_when_it_is_killed(fresh_cluster):
    fresh_cluster(num_cpus=1)
    actor = rayx.remote(_ChildStarter).remote()
    out = rayx.get(actor.start.remote())
    rayx.kill(actor)
    wait_for(lambda: all(_gone(pid) for pid in out["children"]), 10,
             what="the children of a killed actor to end")


@pytest.mark.timeout(120)
def test_loky_inside_a_task_leaves_no_process_or_semaphore(fresh_cluster):
    fresh_cluster(num_cpus=1)

    @rayx.remote
    def use_loky():
        from joblib import Parallel, delayed

        pids = Parallel(n_jobs=2, backend="loky")(delayed(os.getpid)() for _ in range(4))
        return os.getpid(), sorted(set(pids))

    worker, loky_pids = rayx.get(use_loky.remote())
    assert loky_pids and worker not in loky_pids

    def loky_files():
        return [n for n in os.listdir("/dev/shm")
                if n.startswith((f"sem.loky-{worker}-", f"joblib_memmapping_folder_{worker}_"))]

    assert loky_files()  # loky made its semaphores: the check below can fail
    rayx.shutdown()
    wait_for(lambda: all(_gone(pid) for pid in loky_pids), 10, what="loky's workers to end")
    wait_for(lambda: not loky_files(), 10, what="loky's semaphores and folders to be removed")


def test_node_stops_on_sigterm_whichever_thread_takes_it(fresh_cluster):
    """kill() of a thread id sends the process its signal with that thread first in line, as
    happens by chance when the main thread waits: the node must still stop, not wait for the
    SIGKILL that follows 10 s later."""
    fresh_cluster(num_cpus=1)
    assert rayx.get(rayx.remote(lambda: 1).remote()) == 1
    node = rayx.api._node.process
    others = [t.id for t in psutil.Process(node.pid).threads() if t.id != node.pid]
    assert others
    os.kill(others[-1], signal.SIGTERM)
    try:
        assert node.wait(5) == 0
    finally:
        rayx.shutdown()


def test_driver_killed_with_sigkill_takes_the_cluster_down():
    driver = _run_driver("""
        import numpy as np, rayx, time
        info = rayx.init(num_cpus=2)
        @rayx.remote
        class A:
            def ping(self): return 1
        a = A.remote(); rayx.get(a.ping.remote())
        ref = rayx.put(np.zeros(2_000_000))
        print("SESSION", info.session_dir, rayx.nodes()[0]["StoreDir"], flush=True)
        time.sleep(120)
    """)
    try:
        line = ""
        while not line.startswith("SESSION"):
            line = driver.stdout.readline()
            assert line, "the driver exited early"
        _, session_dir, store = line.split()
        assert _session_processes(session_dir) and os.path.exists(store)
        driver.send_signal(signal.SIGKILL)
        driver.wait(10)
        wait_for(lambda: not _session_processes(session_dir), 15,
                 what="the orphaned cluster to exit")
        wait_for(lambda: not os.path.exists(store), 10, what="the store to be removed")
        assert not [s for s in rayx_segments() if os.path.basename(store) == s]
    finally:
        driver.kill()
        driver.wait()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ending, code", [("return", 0), ("raise", 1)])
def test_driver_exiting_without_shutdown_takes_the_cluster_down(ending, code):
    driver = _run_driver(f"""
        import numpy as np, rayx
        info = rayx.init(num_cpus=1)
        @rayx.remote
        def square(x): return x * x
        assert rayx.get(square.remote(7)) == 49
        ref = rayx.put(np.zeros(2_000_000))
        print("SESSION", info.session_dir, rayx.nodes()[0]["StoreDir"], flush=True)
        if "{ending}" == "raise":
            raise SystemError("the driver fails without calling shutdown")
    """)
    try:
        out, _ = driver.communicate(timeout=60)
    finally:
        driver.kill()
        driver.wait()
    assert driver.returncode == code, out
    line = next((ln for ln in out.splitlines() if ln.startswith("SESSION")), None)
    assert line is not None, out
    _, session_dir, store = line.split()
    wait_for(lambda: not _session_processes(session_dir), 15,
             what="the cluster to exit with its driver")
    wait_for(lambda: not os.path.exists(store), 10, what="the store to be removed")
    assert os.path.basename(store) not in rayx_segments()


def test_worker_output_reaches_the_driver_with_a_pid_prefix():
    driver = _run_driver("""
        import rayx
        rayx.init(num_cpus=1)
        @rayx.remote
        def speak():
            import os, sys
            print("hello from a task")
            print("to stderr", file=sys.stderr)
            return os.getpid()
        print("WORKER", rayx.get(speak.remote()))
        rayx.shutdown()
    """)
    out, _ = driver.communicate(timeout=60)
    assert driver.returncode == 0, out
    pid = next(line.split()[1] for line in out.splitlines() if line.startswith("WORKER"))
    assert f"(pid={pid}" in out
    assert any(line.startswith(f"(pid={pid}") and line.endswith("hello from a task")
               for line in out.splitlines()), out
    assert any(line.endswith("to stderr") and "(pid=" in line for line in out.splitlines())


def test_token_file_is_private_and_calls_without_it_are_refused(fresh_cluster):
    info = fresh_cluster(num_cpus=1)
    mode = stat.S_IMODE(os.stat(os.path.join(info.session_dir, "token")).st_mode)
    assert mode == 0o600
    with grpc.insecure_channel(info.address) as ch:
        stub = rayx_pb2_grpc.NodeManagerStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.GetResources(pb.Empty(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        bad = (("rayx-token", "wrong"),)
        with pytest.raises(grpc.RpcError) as err:
            stub.GetResources(pb.Empty(), timeout=5, metadata=bad)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert info.address.startswith("127.0.0.1:")


def test_init_twice_is_an_error_unless_asked(fresh_cluster):
    fresh_cluster(num_cpus=1)
    with pytest.raises(RuntimeError):
        rayx.init()
    rayx.init(ignore_reinit_error=True)
