"""The weights commands of ``python -m models`` (run in this process: ``helpers.cli``)."""
import json
import pathlib

import pytest

from helpers import ROOT, cli
from reference import checkpoint_bytes
from weights_server import checksums, weight_entry, write_manifest


@pytest.fixture
def run(tmp_path):
    def run(*args):
        return cli(*args, env={"TORCH_HOME": str(tmp_path / "torch")})
    return run


def test_pin_records_sha256_and_size_of_verified_bytes(server, run, tmp_path):
    data = checkpoint_bytes("tinynet_e")
    sums = checksums(data)
    manifest = write_manifest(tmp_path / "m.json", {"tinynet_e": [weight_entry(
        [server.add("/a.pth", data), server.add("/b.pth", data)], data, algos=("git_blob_sha1",), size=False)]})
    result = run("manifest", "pin", "--manifest", manifest, "--quiet")
    assert result.returncode == 0, result.stderr
    assert "verified from 2 URL(s)" in result.stdout
    entry = json.loads(pathlib.Path(manifest).read_text())["models"]["tinynet_e"]["files"][0]
    assert entry["checksums"] == {"git_blob_sha1": sums["git_blob_sha1"], "sha256": sums["sha256"]}
    assert entry["size"] == len(data)
    again = run("manifest", "pin", "--manifest", manifest, "--quiet")
    assert again.returncode == 0 and "nothing to add" in again.stdout


def test_pin_refuses_bytes_that_contradict_a_recorded_checksum(server, run, tmp_path):
    data = checkpoint_bytes("tinynet_e")
    other = checkpoint_bytes("tinynet_e", seed=1)
    sums = checksums(data)
    manifest = write_manifest(tmp_path / "m.json", {"tinynet_e": [weight_entry(
        server.add("/wrong.pth", other), other, algos=("git_blob_sha1",), size=False, checksums_of=data)]})
    before = pathlib.Path(manifest).read_text()
    result = run("manifest", "pin", "--manifest", manifest, "--quiet")
    assert result.returncode == 1
    assert "REFUSED tinynet_e file 0 " + server.url("/wrong.pth") in result.stderr
    assert f"git_blob_sha1: expected {sums['git_blob_sha1']}, got {checksums(other)['git_blob_sha1']}" in result.stderr
    assert pathlib.Path(manifest).read_text() == before


def test_pin_refuses_urls_of_one_file_that_disagree(server, run, tmp_path):
    # The second URL serves other bytes: it is reported and the run fails, while the
    # SHA-256 of the bytes that did verify (from the first URL) is recorded.
    data = checkpoint_bytes("tinynet_e")
    manifest = write_manifest(tmp_path / "m.json", {"tinynet_e": [weight_entry(
        [server.add("/a.pth", data), server.add("/b.pth", data + b"tail")], data, algos=("md5",), size=False)]})
    result = run("manifest", "pin", "--manifest", manifest, "--quiet")
    assert result.returncode == 1 and "REFUSED tinynet_e file 0 " + server.url("/b.pth") in result.stderr
    entry = json.loads(pathlib.Path(manifest).read_text())["models"]["tinynet_e"]["files"][0]
    assert entry["checksums"]["sha256"] == checksums(data)["sha256"]  # pinned from the verified bytes only


def test_prefetch_then_verify_detects_tampering(server, run, tmp_path):
    data = checkpoint_bytes("tinynet_e")
    manifest = write_manifest(tmp_path / "m.json", {"tinynet_e": [weight_entry(server.add("/e.pth", data), data)]})
    result = run("prefetch", "tinynet_e", "--manifest", manifest, "--quiet")
    assert result.returncode == 0, result.stderr
    cached = pathlib.Path(result.stdout.split(": ", 1)[1].strip())
    assert cached.read_bytes() == data and cached.is_relative_to(tmp_path / "torch" / "hub" / "checkpoints")
    ok = run("verify", "--manifest", manifest)
    assert ok.returncode == 0 and "tinynet_e file 0: ok" in ok.stdout
    cached.write_bytes(data[:-10] + b"0123456789")
    bad = run("verify", "--manifest", manifest)
    assert bad.returncode == 1 and "tinynet_e file 0: corrupt" in bad.stdout and "sha256: expected" in bad.stdout


def test_prefetch_unknown_model_and_failures(server, run, tmp_path):
    data = checkpoint_bytes("tinynet_e")
    manifest = write_manifest(tmp_path / "m.json", {"tinynet_e": [weight_entry(
        server.url("/missing.pth"), data, size=False)]})
    unknown = run("prefetch", "tinynet_z", "--manifest", manifest)
    assert unknown.returncode != 0 and "no weights for tinynet_z" in unknown.stderr and "tinynet_e" in unknown.stderr
    failed = run("prefetch", "--all", "--manifest", manifest, "--quiet")
    assert failed.returncode == 1 and "tinynet_e: FAILED" in failed.stderr and "HTTP 404" in failed.stderr


def test_manifest_check(run, tmp_path):
    assert run("manifest", "check").returncode == 0
    broken = json.loads((ROOT / "weights_manifest.json").read_text())
    broken["models"]["tinynet_c"]["files"][0]["checksums"] = {}
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    result = run("manifest", "check", "--manifest", str(path))
    assert result.returncode == 2 and "$.models.tinynet_c.files[0].checksums: at least one" in result.stderr
