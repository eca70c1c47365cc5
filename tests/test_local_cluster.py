"""slurm/local-cluster.sh up --nodes 2: a second, separate cluster (its own directory, names, subnet and
ports, so it runs beside the one the other slurm tests use) comes up fast with both nodes idle, runs a step
on both over real TCP, and `down` leaves no namespace, link or process behind. Needs root; under CI=true
missing prerequisites fail the test instead of skipping it."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

SCRIPT = Path(__file__).resolve().parents[1] / "slurm" / "local-cluster.sh"
NAME = "tklctest"  # not a prefix of the default cluster's names (tkslurm)


@pytest.fixture
def env(tmp_path):
    missing = [tool for tool in ("slurmctld", "slurmd", "munged", "ip", "nsenter") if not shutil.which(tool)]
    if os.geteuid() != 0 or missing:
        message = f"the local cluster needs root and {', '.join(missing) or 'Slurm'}"
        pytest.fail(message) if os.environ.get("CI") == "true" else pytest.skip(message)
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {
        **base,
        "SLURM_LOCAL_DIR": str(tmp_path),
        "SLURM_LOCAL_NAME": NAME,
        "SLURM_LOCAL_SUBNET": "10.223.0",
        "SLURM_LOCAL_PORT": "6927",
        "SLURM_CONF": str(tmp_path / "slurm.conf"),
    }


def run(args: list[str], env: dict, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def leftovers(tmp_path: Path) -> list[str]:
    """What of the cluster still exists: its namespaces, its links, processes naming its directory."""
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout.splitlines()
    found = [f"netns {line}" for line in netns if line.startswith(NAME)]
    found += [f"link {line.split(':')[1].strip()}" for line in links if NAME in line]
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended while we looked
            continue
        if str(tmp_path) in text:
            found.append(f"process {cmdline.parent.name}: {text}")
    return found


def test_two_nodes_up_srun_down(env, tmp_path):
    try:
        start = time.monotonic()
        up = run([str(SCRIPT), "up", "--nodes", "2"], env, tmp_path)
        took = time.monotonic() - start
        print(f"local-cluster.sh up --nodes 2: {took:.1f} s")
        assert up.returncode == 0, up.stdout + up.stderr
        assert took < 30

        nodes = run(["sinfo", "-h", "-N", "-o", "%N %t"], env, tmp_path).stdout.split("\n")
        assert sorted(set(filter(None, nodes))) == ["node1 idle", "node2 idle"], nodes
        hosts = run(["srun", "-N2", "hostname"], env, tmp_path)
        assert sorted(hosts.stdout.split()) == ["node1", "node2"], hosts.stdout + hosts.stderr
        assert run([str(SCRIPT), "status"], env, tmp_path).returncode == 0

        again = run([str(SCRIPT), "up", "--nodes", "2"], env, tmp_path)
        assert again.returncode == 0, again.stderr
        other = run([str(SCRIPT), "up", "--nodes", "1"], env, tmp_path)
        assert other.returncode == 1 and "2 node(s)" in other.stderr and "asked for 1" in other.stderr
        assert len(other.stderr.strip().splitlines()) == 1, other.stderr
    finally:
        down = run([str(SCRIPT), "down"], env, tmp_path)
    assert down.returncode == 0, down.stdout + down.stderr
    assert leftovers(tmp_path) == []
    assert run([str(SCRIPT), "down"], env, tmp_path).returncode == 0
    assert run([str(SCRIPT), "status"], env, tmp_path).returncode == 3
