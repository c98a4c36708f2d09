"""``python -m models cache list|prune|clear``: what the weights cache holds, and its leftovers
(partial downloads, quarantined files, failure records, locks), as huggingface-cli's
scan-cache and delete-cache show and remove theirs. Other libraries' files in the shared
directory are never touched."""
import os
import time

import filelock
import pytest

from faults import fault
from helpers import cli
from reference import checkpoint_bytes
from weights_server import weight_entry, write_manifest

DAY = 86400
FOREIGN = "resnet18-f37072fd.pth"  # torchvision's, in the same directory


def _age(path, days):
    stamp = time.time() - days * DAY
    os.utime(path, (stamp, stamp))


@pytest.fixture
def filled(server, tmp_path):
    """A cache after prefetching tinynet_e and tinynet_d, with the leftovers of a long life."""
    e, d = checkpoint_bytes("tinynet_e"), checkpoint_bytes("tinynet_d")
    manifest = write_manifest(tmp_path / "m.json", {"tinynet_e": [weight_entry(server.add("/e.pth", e), e)],
                                                    "tinynet_d": [weight_entry(server.add("/d.pth", d), d)]})
    env = {"TORCH_HOME": str(tmp_path / "torch")}
    assert cli("prefetch", "--all", "--manifest", manifest, "--quiet", env=env).returncode == 0
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    e_name, d_name = sorted(p.name for p in cache.glob("tinynet_*.pth"))[::-1]  # tinynet_e, tinynet_d
    files = {
        "old partial": cache / f"{e_name}.0a1b2c3d.partial",
        "old resume record": cache / f"{e_name}.0a1b2c3d.partial.json",
        "old quarantined": cache / f"{e_name}.corrupt-20250101-000000-42",
        "old failure record": cache / f"{d_name}.failures",
        "young partial": cache / f"{d_name}.deadbeef.partial",
        "url weights": cache / "url-0123456789abcdef-unverified-mine.pth",
        "foreign": cache / FOREIGN,
    }
    for name, path in files.items():
        path.write_bytes(b"x" * 1000 if name != "url weights" else e)
    (cache / "url-0123456789abcdef-unverified-mine.pth.sha256").write_text(
        __import__("hashlib").sha256(e).hexdigest() + "\n")
    for name, path in files.items():
        if name.startswith("old"):
            _age(path, 10)
    for lock in cache.glob("*.lock"):
        _age(lock, 10)
    return manifest, env, cache, files, e_name, d_name


@fault("Leftovers pile up: `.partial`, `.lock`, `.corrupt-*`, failure records",
       "`ghostnet-hub cache list` shows every file of this package (model, kind, size, age, verified or not); "
       "other libraries' files are counted, not shown")
def test_cache_list_shows_every_file_and_whether_it_verifies(filled):
    manifest, env, cache, files, e_name, d_name = filled
    result = cli("cache", "list", "--manifest", manifest, env=env)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[-1]: line.split()[:2] for line in result.stdout.splitlines()[2:]}
    assert rows[e_name] == ["tinynet_e", "weights"] and rows[d_name] == ["tinynet_d", "weights"]
    assert rows[files["old partial"].name] == ["tinynet_e", "partial"]
    assert rows[files["old quarantined"].name] == ["tinynet_e", "quarantined"]
    assert rows[files["old failure record"].name][1] == "failure"
    assert rows[files["url weights"].name] == ["url", "weights"]
    assert FOREIGN not in result.stdout and "1 other file(s) not shown" in result.stdout
    lines = {line.split()[-1]: line for line in result.stdout.splitlines()[2:]}
    assert "verified" in lines[e_name] and "verified" in lines[files["url weights"].name]
    (cache / e_name).write_bytes(b"damaged")
    damaged = cli("cache", "list", "--manifest", manifest, env=env)
    assert damaged.returncode == 1 and "corrupt: " in damaged.stdout


@fault("`ghostnet-hub cache prune --days N`",
       "removes partials, quarantined files and failure records older than N days, and locks nobody holds; "
       "keeps weights, young partials and other libraries' files")
def test_cache_prune_removes_old_leftovers_only(filled):
    manifest, env, cache, files, e_name, d_name = filled
    held = filelock.FileLock(str(cache / f"{d_name}.lock"))
    with held:
        result = cli("cache", "prune", "--days", "1", "--manifest", manifest, env=env)
    assert result.returncode == 0, result.stderr
    left = {p.name for p in cache.iterdir()}
    for name, path in files.items():
        assert (path.name in left) == (not name.startswith("old")), name
    assert f"{e_name}.lock" not in left and f"{d_name}.lock" in left  # a held lock stays
    assert {e_name, d_name, FOREIGN} <= left


@fault("`ghostnet-hub cache clear [MODEL]`",
       "removes that model's files (or every file of this package); a file whose lock is held is skipped")
def test_cache_clear_removes_a_model_or_everything_of_ours(filled):
    manifest, env, cache, files, e_name, d_name = filled
    result = cli("cache", "clear", "tinynet_e", "--manifest", manifest, env=env)
    assert result.returncode == 0, result.stderr
    assert not [p for p in cache.iterdir() if p.name.startswith("tinynet_e")]
    assert (cache / d_name).exists() and (cache / FOREIGN).exists()
    with filelock.FileLock(str(cache / f"{d_name}.lock")):
        busy = cli("cache", "clear", "--manifest", manifest, env=env)
    assert busy.returncode == 1 and f"skipped {d_name}" in busy.stderr and (cache / d_name).exists()
    assert cli("cache", "clear", "--manifest", manifest, env=env).returncode == 0
    assert [p.name for p in cache.iterdir()] == [FOREIGN]
    assert cli("cache", "clear", "tinynet_z", "--manifest", manifest, env=env).returncode != 0


def test_cache_list_reports_a_user_url_file_no_download_named(tmp_path):
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / "url-foo").write_bytes(b"x" * 10)  # not url-<host>-<digest>-<file>: it raised IndexError
    result = cli("cache", "list", env={"TORCH_HOME": str(tmp_path)})
    assert result.returncode == 1, result.stderr
    assert "url-foo" in result.stdout and "corrupt: " in result.stdout


def test_cache_list_works_on_a_missing_cache(tmp_path):
    result = cli("cache", "list", env={"TORCH_HOME": str(tmp_path / "nothing")})
    assert result.returncode == 0 and "0 file(s) of this package" in result.stdout


@pytest.mark.slow
def test_readme_weight_commands_run(published, tmp_path, monkeypatch):
    """docs/weights.md's block of weights commands, line by line, against the loopback server
    (``manifest pin`` on a copy of the manifest, which it rewrites)."""
    import re
    import shutil

    from helpers import doc, readme_cli

    block = re.search(r"```bash\n(ghostnet-hub prefetch --all .*?)```", doc("weights"), re.S)[1]
    manifest = tmp_path / "manifest.json"
    shutil.copy(os.environ["GHOSTNET_HUB_MANIFEST"], manifest)
    env = {"TORCH_HOME": str(tmp_path / "torch"), "GHOSTNET_HUB_MANIFEST": str(manifest)}
    for line in block.splitlines():
        result = readme_cli(line, env=env)
        assert result.returncode == 0, (line, result.stdout, result.stderr)
