"""Faults where processes and machines matter, with real ones: a process without any network
(a network namespace), four processes behind one dead source, a file size limit
(RLIMIT_FSIZE), and docs/weights.md's Docker recipe on a cache that is really read-only."""
import os
import re
import resource
import shutil
import subprocess
import sys
import time

import pytest

from faults import fault
from helpers import ROOT, doc, readme_argv
from mounts import remount_read_only, tmpfs
from reference import checkpoint_bytes
from weights_server import weight_entry, write_manifest

pytestmark = pytest.mark.slow

WEIGHTS_PAGE = doc("weights")  # docs/weights.md: the Docker recipe


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GHOSTNET_HUB_", "HF_HUB_"))}
    return {**env, "PYTHONPATH": str(ROOT), "TORCH_HOME": str(tmp_path / "torch"), "OMP_NUM_THREADS": "1", **extra}


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


NO_NETWORK = """
import time
from models import weights
start = time.monotonic()
try:
    weights.pretrained_state_dict("ghostnet_1x", progress=False)
except Exception as exc:
    print(f"{time.monotonic() - start:.3f}")
    print(f"{type(exc).__name__}: {exc}")
"""


@fault("A real process on a machine with no network interface at all (`unshare -n`, ghostnet_1x's 4 real "
       "sources)", "the same short error at once, and `ghostnet-hub prefetch` exits 1 with it and no traceback")
def test_process_without_any_network(tmp_path):
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True) if shutil.which("unshare") \
        else None
    if probe is None or probe.returncode != 0:
        reason = "cannot create a network namespace (" + (probe.stderr.strip() if probe else "no unshare") + \
            "); test_faults.py::test_no_network_fails_at_once_with_one_line_per_source covers this in process"
        print(reason)
        pytest.skip(reason)
    env = _env(tmp_path)
    result = subprocess.run(["unshare", "-n", sys.executable, "-c", NO_NETWORK], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    seconds, *lines = result.stdout.splitlines()
    print(f"\nno network: failed after {seconds} s with {len(lines)} lines:\n" + "\n".join(lines))
    assert lines[0] == "DownloadError: ghostnet_1x: every source failed:", result.stdout + result.stderr
    sources = [line for line in lines if line.startswith("  - ")]
    assert len(sources) == 4 and all(re.search(r"does not resolve|unreachable", line) for line in sources)
    assert len(lines) <= 15 and len(set(lines)) == len(lines) and lines[-1].startswith("hint: ")
    prefetch = subprocess.run(["unshare", "-n", sys.executable, "-m", "models", "prefetch", "ghostnet_1x", "--quiet"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    err = prefetch.stderr.splitlines()
    assert prefetch.returncode == 1 and "Traceback" not in prefetch.stderr
    assert len(err) <= 15 and len(set(err)) == len(err), prefetch.stderr


WAITER = """
import logging, pathlib, sys, time
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
from models import weights
from models.download import DownloadOptions
rank, sync = int(sys.argv[1]), pathlib.Path(sys.argv[2])
(sync / f"ready-{rank}").touch()
while not (sync / "go").exists():  # start together, not as imports happen to finish
    time.sleep(0.01)
start = time.monotonic()
try:
    weights.pretrained_state_dict("tinynet_e", progress=False, options=DownloadOptions(retries=2, backoff=0.3))
    print(f"ok {time.monotonic() - start:.2f}")
except Exception as exc:
    print(f"failed {time.monotonic() - start:.2f}")
"""


def _run_together(tmp_path, manifest, n=4):
    sync = tmp_path / "sync"
    sync.mkdir()
    env = _env(tmp_path, GHOSTNET_HUB_MANIFEST=manifest)
    procs = [subprocess.Popen([sys.executable, "-c", WAITER, str(rank), str(sync)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(n)]
    deadline = time.monotonic() + 120
    while len(list(sync.glob("ready-*"))) < n and time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    (sync / "go").touch()
    return [(p.returncode, *p.communicate(timeout=300)) for p in procs]


@pytest.mark.parametrize("dead", ["refused", "503"])
@fault("4 processes start together (DDP ranks) and the first weight file's source is dead",
       "the first process tries it; the others, waiting on the lock, read what it learned (a failure record "
       "beside the lock) instead of retrying in turn: all finish in about one process's time")
def test_processes_waiting_on_the_lock_learn_what_the_first_learned(server, tmp_path, dead):
    data = checkpoint_bytes("tinynet_e")
    dead_url = (f"http://127.0.0.1:{_closed_port()}/e.pth" if dead == "refused"
                else server.add("/busy", data, *[("status", 503)] * 100))
    # Two files of the same weights, as the authors' checkpoint and timm's re-save are; the first is dead.
    manifest = write_manifest(tmp_path / "m.json", {"tinynet_e": [
        weight_entry(dead_url, data, algos=("git_blob_sha1",)), weight_entry(server.add("/e.pth", data), data)]})
    results = _run_together(tmp_path, manifest)
    outs = [out.split() for _, out, _ in results]
    print(f"\n4 processes, dead first source ({dead}): seconds {[o[-1] for o in outs]}")
    assert all(o[0] == "ok" for o in outs), results
    logs = "".join(err for _, _, err in results)
    host = dead_url.split("/")[2]
    attempts = len([line for line in logs.splitlines() if host in line and re.search(r"could not use|retry \d", line)])
    if dead == "refused":
        assert attempts <= 4, logs  # at most one attempt per process, never retried
    else:
        assert len(server.hits_for("/busy")) == 3, logs  # one process's 3 attempts, for all four
    assert len(server.hits_for("/e.pth")) == 1


LIMITED_PREFETCH = [sys.executable, "-m", "models", "prefetch", "--all", "--quiet"]


@fault("A process runs under a file size limit (`RLIMIT_FSIZE`, `ulimit -f`)",
       "the write error (`File too large`) is reported like a full disk: partial removed, exit status 1, no "
       "traceback, nothing else attempted")
def test_file_size_limit_is_reported_like_a_full_disk(server, tmp_path):
    e, d = checkpoint_bytes("tinynet_e"), checkpoint_bytes("tinynet_d")
    manifest = write_manifest(tmp_path / "m.json", {
        "tinynet_e": [weight_entry(server.add("/e.pth", e), e, size=False)],
        "tinynet_d": [weight_entry(server.add("/d.pth", d), d, size=False)]})

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    result = subprocess.run(LIMITED_PREFETCH + ["--manifest", manifest], cwd=ROOT, env=_env(tmp_path),
                            preexec_fn=limit, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "File too large" in result.stderr and "bytes are free" in result.stderr
    assert not list((tmp_path / "torch").rglob("*.partial")) and server.hits_for("/d.pth") == []


LOAD = "import models; m = models.tinynet_a(pretrained=True); print(m.conv_stem.weight.flatten()[0].item())"


@fault("The Docker recipe above, its cache then read-only (a real tmpfs remounted read-only)",
       "`prefetch --all && verify` fill it; afterwards models load with `GHOSTNET_HUB_OFFLINE=1` and without it, "
       "and `verify` passes, with no request and no write")
def test_readme_docker_recipe_on_a_read_only_cache(published, tmp_path):
    server, files = published
    block = re.search(r"```dockerfile\n(.*?)```", WEIGHTS_PAGE, re.S)[1]
    build_env, run_lines, runtime_env = {}, [], {}
    for line in block.splitlines():
        instruction, _, rest = line.partition(" ")
        if instruction == "ENV":
            key, value = rest.split("=", 1)
            (runtime_env if run_lines else build_env)[key] = value
        elif instruction == "RUN":
            run_lines.append(rest)
    assert build_env.get("TORCH_HOME") == "/opt/torch" and run_lines and runtime_env == {"GHOSTNET_HUB_OFFLINE": "1"}
    with tmpfs(tmp_path / "opt", "512m") as opt:
        env = _env(tmp_path, GHOSTNET_HUB_MANIFEST=os.environ["GHOSTNET_HUB_MANIFEST"], TORCH_HOME=str(opt / "torch"))
        for command in (part for line in run_lines for part in line.split(" && ")):  # as `sh -c` runs a RUN line
            built = subprocess.run(readme_argv(command), cwd=ROOT, env=env, capture_output=True, text=True,
                                   timeout=600)
            assert built.returncode == 0, built.stdout + built.stderr
        hits = len(server.hits)
        remount_read_only(opt)
        for offline in (True, False):
            run_env = {**env, **runtime_env} if offline else env
            loaded = subprocess.run([sys.executable, "-c", LOAD], cwd=ROOT, env=run_env, capture_output=True,
                                    text=True, timeout=300)
            assert loaded.returncode == 0, loaded.stderr
            verified = subprocess.run([sys.executable, "-m", "models", "verify"], cwd=ROOT, env=run_env,
                                      capture_output=True, text=True, timeout=300)
            assert verified.returncode == 0 and "corrupt" not in verified.stdout, verified.stdout + verified.stderr
            print(f"\nread-only Docker cache, offline={offline}: loaded, verify ok")
        assert len(server.hits) == hits
