"""Beyond one machine (docs/finetune.md, "On a cluster"): the page's two-node torchrun commands
run as two torchrun launches on this machine joined by a c10d rendezvous, one process each
(gloo), each launch in a folder of its own as if on a node of its own without a shared
filesystem (only the weights cache is shared). ``finetune`` then gives the weights one process
gives, and ``evaluate`` its counts; only rank 0's folder gets outputs; a worker killed with
SIGKILL makes torchrun restart the group, which continues from ``last.pth``. And
``--auto-resume``, for schedulers that relaunch the same command."""
import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import psutil
import pytest
import torch
from finetuning import FAST, SERIAL, TINY, TOLERANCE, max_difference, quiet, state_of

from models.tools import _distributed, _finetune_loop
from models.tools.finetune import finetune

from helpers import ROOT, cli, doc, readme_argv

PAGE = doc("finetune")
EPOCHS = ["--epochs", "4"]  # 4 epochs of 2 steps: time to kill a worker between two of them
LIMIT = 300  # seconds for a whole two-node run, restart included, on a busy 2-core machine


def _page_command(name):
    block = PAGE.split(f"<!-- finetune:{name} -->\n", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    (line,) = block.strip().splitlines()
    return line


def _free_port():
    with socket.socket() as probe:  # (the port may be taken again before torchrun binds it: unlikely)
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def _two_nodes(line, nodes, *extra):
    """The page's command ``line`` launched twice, as node 0 and node 1 (cwd: ``nodes[i]``), its
    rendezvous endpoint on this machine, ``extra`` appended; yields the two torchrun agents
    (stdout and stderr in ``node/agent.log``). Leaves no process behind."""
    port = _free_port()
    words = [w.replace("node0:29400", f"127.0.0.1:{port}") for w in readme_argv(line)]
    assert f"127.0.0.1:{port}" in words
    at = words.index("--no-python")
    agents = []
    try:
        for rank, node in enumerate(nodes):
            node.mkdir(parents=True, exist_ok=True)
            argv = [*words[:at], "--node-rank", str(rank), *words[at:], *extra]
            with open(node / "agent.log", "w") as log:
                agents.append(subprocess.Popen(argv, cwd=node, stdout=log, stderr=subprocess.STDOUT,
                                               env={**os.environ, "PYTHONPATH": str(ROOT), **SERIAL}))
        yield agents
    finally:  # the agents and their workers (each in a session of its own: torchrun starts them so)
        for agent in agents:
            family = []
            with contextlib.suppress(psutil.NoSuchProcess):
                family = [*psutil.Process(agent.pid).children(recursive=True), psutil.Process(agent.pid)]
            for process in family:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
            agent.wait()


def _finish(agents, nodes, codes=(0, 0)):
    """Waits for both agents (a hung rendezvous fails the test after LIMIT s), which must exit
    with ``codes``; their logs."""
    deadline = time.monotonic() + LIMIT
    for agent in agents:
        try:
            agent.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    logs = [(node / "agent.log").read_text() for node in nodes]
    exits = [agent.returncode for agent in agents]
    assert exits == list(codes), "\n\n".join(f"node {i} (exit {c}):\n{log[-4000:]}" for i, (c, log) in
                                             enumerate(zip(exits, logs, strict=True)))
    return logs


def _nodes_with_data(tmp_path, data, where):
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:  # the data at the same path on each node
        shutil.copytree(data, node / where)
    return nodes


def _one_process(data, out):
    """The reference: the same fine-tuning in one process, uninterrupted, from the published
    weights (from scratch, the float differences of summing in another order grow: the
    largest weight differed by 0.12 after 8 steps)."""
    result = cli("finetune", "--model", "tinynet_e", "--data", str(data), "--out", str(out), "--sync-bn", *FAST,
                 *EPOCHS)
    assert result.returncode == 0, result.stderr
    return out


def _ran_on(nodes, files=("best.pth", "last.pth", "metrics.json", "curves.png")):
    """The node whose OUT has every output, checking that the other's OUT does not exist."""
    held = [sorted(p.name for p in (node / "runs/nodes").iterdir()) if (node / "runs/nodes").exists() else None
            for node in nodes]
    written = [i for i, names in enumerate(held) if names is not None]
    assert len(written) == 1 and held[written[0]] == sorted(files), held  # rank 0's alone
    return nodes[written[0]]


@pytest.mark.slow
def test_two_nodes_finetune_equals_one_process(published, small_data, tmp_path):
    server, _ = published
    before = len(server.hits)
    nodes = _nodes_with_data(tmp_path, small_data, "my_images")
    line = _page_command("nodes")
    assert "--sync-bn" in line and "--max-restarts 1" in line
    with _two_nodes(line, nodes, *FAST, *EPOCHS) as agents:
        logs = _finish(agents, nodes)
    assert [(h.path, h.status) for h in server.hits[before:]] == [("/tinynet_e", 200)]  # one download, shared cache
    text = "".join(logs)
    assert "2 process(es) on cpu, global batch 16 (8 per process" in text and "synchronised" in text
    assert [line.split()[1] for line in text.splitlines() if line.startswith("epoch ")] == ["1/4", "2/4", "3/4", "4/4"]
    rank0 = _ran_on(nodes)
    one = _one_process(small_data, tmp_path / "one")
    difference = max_difference(state_of(rank0 / "runs/nodes/last.pth"), state_of(one / "last.pth"))
    print(f"largest difference, 2 nodes vs 1 process after 8 steps: {difference:.2e}")
    assert difference <= TOLERANCE
    assert len(server.hits) == before + 1


@pytest.mark.slow
def test_two_nodes_evaluate_counts_equal_one_process(imagefolder, class_one_always_wins, tmp_path):
    nodes = _nodes_with_data(tmp_path, imagefolder, "imagenet/val")
    with _two_nodes(_page_command("nodes-evaluate"), nodes, "--quiet", "--batch-size", "2",
                    "--json", "report.json") as agents:
        logs = _finish(agents, nodes, codes=(1, 1))  # one unreadable image: counted, exit 1 on both
    assert "".join(logs).count("top-1") == 1  # rank 0 alone reports
    reports = [node / "report.json" for node in nodes if (node / "report.json").exists()]
    assert len(reports) == 1  # and writes
    double = json.loads(reports[0].read_text())
    single = cli("evaluate", "--model", "tinynet_e", "--quiet", "--batch-size", "2", "--data", str(imagefolder),
                 "--json", str(tmp_path / "single.json"))
    assert single.returncode == 1, single.stderr  # one unreadable image: counted, exit 1
    single = json.loads((tmp_path / "single.json").read_text())
    assert single["world_size"] == 1 and double["world_size"] == 2
    counts = ("images", "skipped", "correct1", "correct5")
    assert {k: double[k] for k in counts} == {k: single[k] for k in counts} == \
        {"images": 7, "skipped": 1, "correct1": 2, "correct5": 7}


def _worker(agent):
    """The process torchrun's agent runs the command in."""
    children = [p for p in psutil.Process(agent.pid).children(recursive=True)
                if "models" in p.cmdline() and "torch.distributed.run" not in p.cmdline()]
    assert len(children) == 1, [p.cmdline() for p in children]
    return children[0]


def _epoch_of(path):
    try:
        return torch.load(path, weights_only=True)["epoch"]
    except (OSError, RuntimeError, EOFError, KeyError):
        return 0  # not written yet


@pytest.mark.slow
def test_elastic_restart_after_sigkill_continues_from_last_pth(published, small_data, tmp_path):
    nodes = _nodes_with_data(tmp_path, small_data, "my_images")
    with _two_nodes(_page_command("nodes"), nodes, *FAST, *EPOCHS) as agents:
        deadline = time.monotonic() + LIMIT
        while not any(_epoch_of(node / "runs/nodes/last.pth") for node in nodes):  # an epoch is saved
            assert time.monotonic() < deadline and all(a.poll() is None for a in agents), "no epoch saved"
            time.sleep(0.05)
        rank0 = next(i for i, node in enumerate(nodes) if (node / "runs/nodes/last.pth").exists())
        victim = _worker(agents[1 - rank0])  # the other node's process: not the one that writes
        victim.send_signal(signal.SIGKILL)
        saved = _epoch_of(nodes[rank0] / "runs/nodes/last.pth")
        logs = _finish(agents, nodes)
    text = "".join(logs)
    assert "failed (exitcode: -9)" in logs[1 - rank0], logs[1 - rank0][-4000:]  # torchrun saw its worker killed
    resumed = re.findall(r"resuming after epoch (\d+)", text)
    assert len(resumed) == 1 and saved <= int(resumed[0]) < 4, text[-4000:]
    assert "(torchrun restarted the processes)" in text and "warning:" not in text  # (the page's command)
    k = int(resumed[0])
    epochs = [line.split()[1] for line in text.split("resuming after epoch", 1)[1].splitlines()
              if line.startswith("epoch ")]
    assert epochs == [f"{e}/4" for e in range(k + 1, 5)]  # the rest, not all over again
    assert _ran_on(nodes) == nodes[rank0]  # the other node never had OUT: rank 0 sent it the state
    out, one_process = nodes[rank0] / "runs/nodes", _one_process(small_data, tmp_path / "one")
    difference = max_difference(state_of(out / "last.pth"), state_of(one_process / "last.pth"))
    print(f"restarted after epoch {k}: largest difference to one uninterrupted process {difference:.2e}")
    assert difference <= TOLERANCE
    curves = [[r["val_loss"] for r in json.loads((o / "metrics.json").read_text())["epochs"]]
              for o in (out, one_process)]
    assert len(curves[0]) == 4 and curves[0] == pytest.approx(curves[1], rel=1e-4)


# -- --auto-resume: a scheduler relaunches the same command -----------------------------------------

@pytest.mark.slow  # three fine-tuning runs, eight epochs
def test_auto_resume_continues_the_same_command_and_refuses_another(small_data, tmp_path, monkeypatch):
    run = dict(model="tinynet_e", data=small_data, pretrained=False, epochs=3, **TINY)
    straight, _ = quiet(finetune, out=tmp_path / "straight", **run)

    killed = tmp_path / "killed"
    check = _finetune_loop.check_epoch

    def killed_in_epoch_2(record, limit):
        if record["epoch"] == 2:
            raise KeyboardInterrupt  # as a kill before epoch 2 is saved: last.pth holds epoch 1
        return check(record, limit)

    with monkeypatch.context() as patched:
        patched.setattr(_finetune_loop, "check_epoch", killed_in_epoch_2)
        with pytest.raises(KeyboardInterrupt), contextlib.redirect_stdout(io.StringIO()):
            finetune(out=killed, auto_resume=True, **run)  # an empty OUT: it starts
    assert torch.load(killed / "last.pth", weights_only=True)["epoch"] == 1

    with pytest.raises(ValueError, match="already holds a run"):  # without the flag: refused as before
        finetune(out=killed, **run)
    with pytest.raises(ValueError, match=r"other settings \(lr\)"):
        finetune(out=killed, auto_resume=True, **{**run, "lr": 0.5})
    with pytest.raises(ValueError, match=r"other settings \(input_size\)"):  # an option left out counts too
        finetune(out=killed, auto_resume=True, **{k: v for k, v in run.items() if k != "input_size"})

    result, stdout = quiet(finetune, out=killed, auto_resume=True, **run)  # the same command again
    assert "resuming after epoch 1 (--auto-resume)" in stdout
    assert [line.split()[1] for line in stdout.splitlines() if line.startswith("epoch ")] == ["2/3", "3/3"]
    assert max_difference(state_of(result.last), state_of(straight.last)) <= 1e-6
    assert [r["val_loss"] for r in result.epochs] == pytest.approx([r["val_loss"] for r in straight.epochs], rel=1e-5)

    before = result.last.read_bytes()
    again, stdout = quiet(finetune, out=killed, auto_resume=True, **run)  # finished: nothing to do
    assert not [line for line in stdout.splitlines() if line.startswith("epoch ")]
    assert again.best_val_top1 == result.best_val_top1 and result.last.read_bytes() == before
    assert cli("finetune", "--auto-resume", "--resume", str(killed)).returncode == 2  # one or the other


@pytest.mark.slow  # two fine-tuning runs
def test_max_restarts_implies_auto_resume(small_data, tmp_path, monkeypatch):
    run = dict(model="tinynet_e", data=small_data, out=tmp_path, pretrained=False, epochs=1, **TINY)
    first, _ = quiet(finetune, **run)
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")  # what torchrun --max-restarts 1 tells its workers
    again, stdout = quiet(finetune, **run)
    assert "resuming after epoch 1" in stdout and again.best_val_top1 == first.best_val_top1
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")
    with pytest.raises(ValueError, match="already holds a run"):
        finetune(**run)


def test_a_restart_that_would_fail_is_foretold(monkeypatch):
    # What torchrun --max-restarts 1 --rdzv-backend c10d tells its workers, by default.
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.delenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", raising=False)
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in _distributed.restart_hazard()
    monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")  # the page's command line
    assert _distributed.restart_hazard() is None
    monkeypatch.delenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")  # no restart, nothing to fear
    assert _distributed.restart_hazard() is None


_FROM_MAIN = """
from models._files import probe_writable
from models.tools import _distributed

world = _distributed.setup(None, gpu_by_default=False)
# Each rank writes a file of its own: two processes printing to one pipe can cut into each other's lines.
with open(f"rank{world.rank}.txt", "w") as said:
    try:
        world.from_main(lambda: probe_writable("/proc/none/out", "Choose another --out"))
    except OSError as exc:
        said.write(f"rank {world.rank} stopped: {type(exc).__name__}: {exc}\\n")
    said.write(f"rank {world.rank} got {world.from_main(lambda: ('from rank', world.rank))}\\n")
world.close()
"""


@pytest.mark.slow
def test_what_rank_0_alone_finds_reaches_every_rank(tmp_path):
    script = tmp_path / "from_main.py"
    script.write_text(_FROM_MAIN)
    result = subprocess.run([*readme_argv("torchrun --standalone --nproc-per-node 2"), str(script)], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **SERIAL}, capture_output=True, text=True,
                            timeout=LIMIT)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = sorted(line for rank in (0, 1) for line in (tmp_path / f"rank{rank}.txt").read_text().splitlines())
    # Rank 0's own error, and on rank 1 the same message (WriteError cannot be rebuilt from its pickle).
    message = "cannot write into /proc/none/out (No such file or directory). Choose another --out"
    assert lines == ["rank 0 got ('from rank', 0)", f"rank 0 stopped: WriteError: {message}",
                     "rank 1 got ('from rank', 0)", f"rank 1 stopped: OSError: {message}"]
