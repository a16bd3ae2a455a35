"""The command line, and a cluster across two hosts made of network namespaces.

The cross-host test creates two namespaces joined by a veth pair (10.213.7.1 and 10.213.7.2),
starts the head in one and a node in the other with `rayx start`, runs a driver that moves tasks
and objects across, then stops everything and removes the namespaces.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from .conftest import REPO, rayx_processes, wait_for

NS_A, NS_B = "rayxtestA", "rayxtestB"
IP_A, IP_B = "10.213.7.1", "10.213.7.2"


def _env(tmp_path, **extra) -> dict:
    return dict(os.environ, PYTHONPATH=REPO, RAYX_TEMP_DIR=str(tmp_path), PYTHONUNBUFFERED="1",
                **extra)


def _rayx(args, env, ns=None, timeout=60) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rayx.cli", *args]
    if ns:
        cmd = ["ip", "netns", "exec", ns, *cmd]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_help_on_every_command(tmp_path):
    for args in (["--help"], ["start", "--help"], ["stop", "--help"], ["status", "--help"],
                 ["submit", "--help"]):
        out = _rayx(args, _env(tmp_path))
        assert out.returncode == 0 and "usage: rayx" in out.stdout


def test_start_status_submit_stop_on_this_host(tmp_path):
    env = _env(tmp_path)
    short_dirs = set(glob.glob("/tmp/rayx-s-*"))  # sockets of long session paths go there
    started = _rayx(["start", "--head", "--port", "0", "--num-cpus", "1",
                     "--resources", '{"tag": 1}'], env)
    try:
        assert started.returncode == 0, started.stderr
        assert "Connect a driver" in started.stdout
        bad = _rayx(["start", "--address", "nowhere", "--num-cpus", "1"], env)
        assert bad.returncode == 1 and "HOST:PORT" in bad.stderr
        joined = _rayx(["start", "--address", "auto", "--num-cpus", "1"], env)
        assert joined.returncode == 0, joined.stderr
        status = _rayx(["status"], env)
        assert status.returncode == 0 and "2 alive" in status.stdout, status.stdout
        script = tmp_path / "driver.py"
        script.write_text(textwrap.dedent("""
            import sys, rayx
            rayx.init(address="auto")
            @rayx.remote
            def double(x):
                return 2 * x
            print("RESULT", rayx.get(double.remote(int(sys.argv[1]))),
                  rayx.cluster_resources()["CPU"])
        """))
        out = _rayx(["submit", str(script), "--", "21"], env)
        assert out.returncode == 0, out.stderr
        assert "RESULT 42 2.0" in out.stdout
        status = _rayx(["status"], env)
        assert "jobs: 0 running, 1 succeeded, 0 failed" in status.stdout, status.stdout
        job = next(ln for ln in status.stdout.splitlines() if "SUCCEEDED" in ln)
        assert job.strip().startswith("0001 SUCCEEDED") and f"{script} 21" in job, job
        killed = subprocess.run([sys.executable, "-c", "import os, rayx\n"
                                 "rayx.init(address='auto'); os.kill(os.getpid(), 9)"],
                                env=env, capture_output=True, timeout=60)
        assert killed.returncode == -9, killed.stderr
        assert [d for d in os.listdir(tmp_path) if d.startswith("driver_")]  # left behind...
        again = subprocess.run([sys.executable, "-c", "import rayx; rayx.init(address='auto')"],
                               env=env, capture_output=True, timeout=60)
        assert again.returncode == 0, again.stderr
    finally:
        stopped = _rayx(["stop"], env)
    assert "stopped 2" in stopped.stdout
    wait_for(lambda: not rayx_processes(str(tmp_path)), 15, what="rayx stop to end every node")
    # ...and removed by the next driver that connects, since its pid is gone
    assert not [d for d in os.listdir(tmp_path) if d.startswith("driver_")]
    assert set(glob.glob("/tmp/rayx-s-*")) <= short_dirs


def test_only_dead_drivers_dirs_of_this_pid_namespace_are_swept(tmp_path):
    """A driver's directory goes once its pid is gone, but not one of a live driver, nor one
    made in another pid namespace sharing this temp dir (its pids mean nothing here)."""
    from rayx import connect

    ns = connect._pid_namespace()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    names = {"dead": f"driver_{ns}-{dead}_aaaaaaaaaaaa",
             "live": f"driver_{ns}-{os.getpid()}_bbbbbbbbbbbb",
             "elsewhere": f"driver_1{ns}-{dead}_cccccccccccc", "session": "session_x"}
    for name in names.values():
        (tmp_path / name / "sockets").mkdir(parents=True)
    connect.remove_dead_drivers_dirs(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(
        names[k] for k in ("live", "elsewhere", "session"))


def test_start_block_stays_in_the_foreground_until_stop(tmp_path):
    env = _env(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "rayx.cli", "start", "--head", "--port", "0",
                             "--num-cpus", "1", "--block"], env=env, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert "started at" in proc.stdout.readline()
        assert proc.poll() is None
        assert _rayx(["stop"], env).returncode == 0
        proc.wait(30)
    finally:
        proc.kill()
    assert proc.returncode == 0


def _netns_available() -> str | None:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return "needs root and the ip command"
    probe = subprocess.run(["ip", "netns", "add", "rayxprobe"], capture_output=True)
    if probe.returncode != 0:
        return f"cannot create network namespaces: {probe.stderr.decode().strip()}"
    subprocess.run(["ip", "netns", "del", "rayxprobe"], capture_output=True)
    return None


def _sh(*cmd: str) -> None:
    subprocess.run(list(cmd), check=True, capture_output=True)


@pytest.fixture
def two_hosts():
    reason = _netns_available()
    if reason:
        pytest.skip(reason)
    for ns in (NS_A, NS_B):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    try:
        _sh("ip", "netns", "add", NS_A)
        _sh("ip", "netns", "add", NS_B)
        _sh("ip", "link", "add", "rxva", "type", "veth", "peer", "name", "rxvb")
        _sh("ip", "link", "set", "rxva", "netns", NS_A)
        _sh("ip", "link", "set", "rxvb", "netns", NS_B)
        for ns, dev, ip in ((NS_A, "rxva", IP_A), (NS_B, "rxvb", IP_B)):
            _sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            _sh("ip", "-n", ns, "link", "set", dev, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield
    finally:
        for ns in (NS_A, NS_B):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.timeout(180)
def test_cluster_across_two_network_namespaces(two_hosts, tmp_path):
    env = _env(tmp_path)
    head = _rayx(["start", "--head", "--node-ip-address", IP_A, "--port", "6390",
                  "--num-cpus", "1"], env, ns=NS_A)
    try:
        assert head.returncode == 0, head.stderr
        token = (tmp_path / next(d for d in os.listdir(tmp_path) if d.startswith("session_"))
                 / "token").read_text()
        node = _rayx(["start", "--address", f"{IP_A}:6390", "--node-ip-address", IP_B,
                      "--num-cpus", "1", "--resources", '{"host_b": 1}'],
                     dict(env, RAYX_TOKEN=token), ns=NS_B)
        assert node.returncode == 0, node.stderr
        driver = textwrap.dedent(f"""
            import numpy as np, rayx
            rayx.init(address="{IP_A}:6390", token="{token}")
            @rayx.remote(resources={{"host_b": 1}})
            def on_b(arr):
                import socket
                return float(arr.sum()), rayx.get_runtime_context().get_node_id()
            @rayx.remote(resources={{"host_b": 1}})
            def make_on_b():
                return np.full(1_000_000, 2.0)
            here = rayx.put(np.ones(1_000_000))
            total, node = rayx.get(on_b.remote(here), timeout=60)
            back = rayx.get(make_on_b.remote(), timeout=60)
            addrs = sorted(n["Address"].split(":")[0] for n in rayx.nodes())
            print("CROSS", total, float(back.sum()), addrs)
        """)
        out = subprocess.run(["ip", "netns", "exec", NS_A, sys.executable, "-c", driver],
                             env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"CROSS 1000000.0 2000000.0 ['{IP_A}', '{IP_B}']" in out.stdout
    finally:
        _rayx(["stop"], env)
    wait_for(lambda: not rayx_processes(str(tmp_path)), 15, what="both nodes to stop")


def test_tls_cluster(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=rayx-test", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    env = _env(tmp_path)
    started = _rayx(["start", "--head", "--port", "0", "--num-cpus", "1", "--tls-cert", str(cert),
                     "--tls-key", str(key), "--tls-ca", str(cert)], env)
    try:
        assert started.returncode == 0, started.stderr
        driver = textwrap.dedent("""
            import rayx
            rayx.init(address="auto")
            @rayx.remote
            def one():
                return 1
            print("TLS", rayx.get(one.remote()))
        """)
        tls_env = dict(env, RAYX_TLS_CERT=str(cert), RAYX_TLS_KEY=str(key), RAYX_TLS_CA=str(cert),
                       RAYX_START_TIMEOUT="5")
        ok = subprocess.run([sys.executable, "-c", driver], env=tls_env, capture_output=True,
                            text=True, timeout=60)
        assert "TLS 1" in ok.stdout, ok.stderr
        plain = subprocess.run([sys.executable, "-c", driver], env=dict(env,
                               RAYX_START_TIMEOUT="3"), capture_output=True, text=True,
                               timeout=60)
        assert plain.returncode != 0 and "could not reach the cluster" in plain.stderr
    finally:
        _rayx(["stop"], env)


def test_status_shows_used_resources_and_a_dead_node(tmp_path):
    import rayx
    from rayx.cluster_utils import Cluster

    if rayx.is_initialized():
        rayx.shutdown()
    c = Cluster(head_cpus=1, node_timeout=1.0, heartbeat_interval=0.1)
    try:
        busy = c.add_node(num_cpus=2, resources={"gadget": 3})
        doomed = c.add_node(num_cpus=1)
        c.connect()
        env = _env(tmp_path, RAYX_TOKEN=c.session.token)

        def status() -> str:
            out = _rayx(["status", "--address", c.address], env)
            assert out.returncode == 0, out.stderr
            return out.stdout

        def line_of(text: str, node) -> str:
            return next(ln for ln in text.splitlines() if node.node_id[:12] in ln)

        @rayx.remote(num_cpus=1, resources={"gadget": 2})
        class Holder:
            def ready(self):
                return True

        holder = Holder.remote()
        assert rayx.get(holder.ready.remote(), timeout=60)
        text = wait_for(lambda: (t := status()) and "CPU 1/2" in line_of(t, busy) and t, 30,
                        interval=0.1, what="status to show the held CPU")
        assert "3 alive, 0 dead" in text
        assert line_of(text, busy).split()[0] == "ALIVE"
        assert "CPU 1/2, gadget 2/3" in line_of(text, busy)
        assert "CPU 0/1" in line_of(text, c.head) and "gadget" not in line_of(text, c.head)
        assert line_of(text, busy).split()[2] == busy.address
        assert "jobs: 1 running, 0 succeeded, 0 failed" in text

        c.kill_node(doomed)
        text = wait_for(lambda: (t := status()) and "2 alive, 1 dead" in t and t, 30,
                        interval=0.1, what="status to show the killed node as dead")
        assert line_of(text, doomed).split()[0] == "DEAD"
        assert line_of(text, busy).split()[0] == "ALIVE"
        assert "CPU 1/2, gadget 2/3" in line_of(text, busy)
        rayx.kill(holder)
        wait_for(lambda: "CPU 0/2, gadget 0/3" in line_of(status(), busy), 30, interval=0.1,
                 what="status to show the resources given back")
    finally:
        c.shutdown()
