"""weights_manifest.json holds the published facts and nothing invented; broken manifests
are refused with every problem named by its JSON path."""
import copy
import json
import re

import pytest

from models.manifest import DEFAULT_MANIFEST, ManifestError, load_manifest, validate_manifest

from faults import fault
from helpers import cli
from reference import KNOWN_CHECKSUMS, METRICS, MODELS, PRETRAINED, UNPINNED, measure

RAW = json.loads(DEFAULT_MANIFEST.read_text())


def test_manifest_is_valid_and_lists_the_released_models():
    manifest = load_manifest()
    # models of the registry, in its order, and exactly those whose published accuracy the tests record
    assert list(manifest.models) == [name for name in MODELS if name in manifest.models]
    assert set(manifest.models) == set(METRICS)


@pytest.mark.parametrize("name", [*PRETRAINED, *UNPINNED])
def test_metadata_agrees_with_the_code_and_the_papers(name):
    entry = load_manifest()[name]
    measured = measure(name)
    assert entry.num_params == measured.params
    assert entry.macs == measured.macs
    assert (entry.input_size, entry.input_size) == measured.input_size
    assert entry.resize_size == int(entry.input_size / entry.crop_ratio)
    assert name in METRICS, f"{name}: record its published top-1 and top-5 in tests/reference.py's METRICS"
    assert (entry.top1, entry.top5) == METRICS[name]
    assert entry.interpolation == ("bilinear" if name.startswith("ghostnet_") else "bicubic")
    assert entry.mean == (0.485, 0.456, 0.406) and entry.std == (0.229, 0.224, 0.225)


def test_checksums_are_exactly_the_published_ones():
    recorded = {
        (name, algo, digest, f.size)
        for name, entry in load_manifest().models.items()
        for f in entry.files
        for algo, digest in f.checksums.items()
    }
    assert recorded == KNOWN_CHECKSUMS


def test_every_url_is_https_and_every_file_has_a_checksum_or_says_it_has_none():
    for name, entry in load_manifest().models.items():
        for f in entry.files:
            # GhostNetV2/V3: nobody published a checksum or size; nothing is invented for them.
            assert f.pinned == bool(f.checksums) == (name not in UNPINNED)
            assert f.pinned or f.size is None
            assert all(url.startswith("https://") for url in f.urls)


def test_unpinned_models_list_the_authors_release_and_timms_copy():
    """The authors' release assets are the URLs timm's source names for these models (its
    pretrained_cfg comments), and the Hugging Face copies are timm's hf_hub ids."""
    import inspect

    import timm.models.ghostnet as timm_ghostnet

    source = inspect.getsource(timm_ghostnet)
    for name, timm_name in UNPINNED.items():
        authors, copy = load_manifest()[name].files
        assert (authors.format, copy.format) == ("torch", "safetensors")
        (url,) = authors.urls
        assert url.startswith("https://github.com/huawei-noah/Efficient-AI-Backbones/releases/download/GhostNetV")
        cfg = source[source.index(f"'{timm_name}.in1k'"):].split("),", 1)[0]
        assert "hf_hub_id='timm/'" in cfg and url in cfg, cfg
        assert copy.urls == (f"https://huggingface.co/timm/{timm_name}.in1k/resolve/main/model.safetensors",)


def test_cache_names_are_unique():
    names = [f.cache_name for e in load_manifest().models.values() for f in e.files]
    assert len(names) == len(set(names))


def _broken(edit):
    data = copy.deepcopy(RAW)
    edit(data)
    return validate_manifest(data)


@pytest.mark.parametrize("edit, expected", [
    (lambda d: d.update(schema_version=2), "$.schema_version: this code reads version 1, got 2"),
    (lambda d: d.pop("models"), "$.models: missing"),
    (lambda d: d.update(extra=1), "$.extra: unknown field"),
    (lambda d: d["models"]["tinynet_a"].pop("macs"), "$.models.tinynet_a.macs: missing"),
    (lambda d: d["models"]["tinynet_a"].update(num_params=-5),
     "$.models.tinynet_a.num_params: expected a positive integer"),
    (lambda d: d["models"]["tinynet_a"].update(interpolation="lanczos"),
     "$.models.tinynet_a.interpolation: expected one of"),
    (lambda d: d["models"]["tinynet_a"]["metrics"].update(top1=177.7),
     "$.models.tinynet_a.metrics.top1: expected a percentage"),
    (lambda d: d["models"]["tinynet_a"].update(files=[]), "$.models.tinynet_a.files: expected a non-empty list"),
    (lambda d: d["models"]["tinynet_b"]["files"][0].update(checksums={}),
     "$.models.tinynet_b.files[0].checksums: at least one of sha256, git_blob_sha1, md5 is required"),
    (lambda d: d["models"]["tinynet_b"]["files"][0].pop("checksums"), "$.models.tinynet_b.files[0].checksums: missing"),
    (lambda d: d["models"]["tinynet_b"]["files"][0]["checksums"].update(git_blob_sha1="16c51b73"),
     "$.models.tinynet_b.files[0].checksums.git_blob_sha1: expected 40 lowercase hex digits, got '16c51b73'"),
    (lambda d: d["models"]["tinynet_b"]["files"][1]["checksums"].update(sha256="F" * 64),
     "$.models.tinynet_b.files[1].checksums.sha256: expected 64 lowercase hex digits"),
    (lambda d: d["models"]["tinynet_b"]["files"][0]["checksums"].update(crc32="0" * 8),
     "$.models.tinynet_b.files[0].checksums.crc32: unknown digest"),
    (lambda d: d["models"]["tinynet_c"]["files"][0]["urls"].__setitem__(1, "http://github.com/x.pth"),
     "$.models.tinynet_c.files[0].urls[1]: must be an https URL, got 'http://github.com/x.pth'"),
    (lambda d: d["models"]["tinynet_c"]["files"][0].update(urls=[]),
     "$.models.tinynet_c.files[0].urls: expected a non-empty list"),
    (lambda d: d["models"]["tinynet_c"]["files"][0].update(format="pickle"),
     "$.models.tinynet_c.files[0].format: expected one of torch, safetensors"),
    (lambda d: d["models"]["tinynet_c"]["files"][0].update(size=0),
     "$.models.tinynet_c.files[0].size: expected a positive integer or null"),
    (lambda d: d["models"]["tinynet_c"]["files"][0].update(sha256="x"),
     "$.models.tinynet_c.files[0].sha256: unknown field"),
    (lambda d: d["models"]["tinynet_c"]["files"][0].update(unpinned=True),
     "$.models.tinynet_c.files[0].unpinned: a file with a recorded checksum is pinned"),
    (lambda d: d["models"]["ghostnetv2_1x"]["files"][0].update(unpinned="yes"),
     "$.models.ghostnetv2_1x.files[0].unpinned: expected true (or no such field), got 'yes'"),
    (lambda d: d["models"]["ghostnetv2_1x"]["files"][1].pop("unpinned"),
     "$.models.ghostnetv2_1x.files[1].checksums: at least one of sha256, git_blob_sha1, md5 is required (or {} with"),
])
def test_broken_manifest_problem_is_named_by_json_path(edit, expected):
    problems = _broken(edit)
    assert any(p.startswith(expected) for p in problems), problems


def test_every_problem_is_reported_at_once(tmp_path):
    data = copy.deepcopy(RAW)
    data["schema_version"] = 0
    data["models"]["ghostnet_1x"]["files"][0]["checksums"] = {}
    data["models"]["tinynet_e"]["paper"] = "ftp://example.org/paper"
    path = tmp_path / "m.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    assert len(err.value.problems) == 3
    message = str(err.value)
    for fragment in ("$.schema_version", "$.models.ghostnet_1x.files[0].checksums", "$.models.tinynet_e.paper"):
        assert fragment in message
    assert str(path) in message


def test_unreadable_or_non_json_manifest(tmp_path):
    with pytest.raises(ManifestError, match="cannot read the file"):
        load_manifest(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(bad)
    bad.write_text("[]")
    with pytest.raises(ManifestError, match=r"\$: expected an object"):
        load_manifest(bad)


def test_manifest_override_by_environment(tmp_path, monkeypatch):
    data = copy.deepcopy(RAW)
    data["models"] = {"tinynet_e": data["models"]["tinynet_e"]}
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(data))
    monkeypatch.setenv("GHOSTNET_HUB_MANIFEST", str(path))
    manifest = load_manifest()
    assert manifest.source == str(path) and list(manifest.models) == ["tinynet_e"]
    with pytest.raises(KeyError, match="no weights for 'tinynet_a'.*models with weights: tinynet_e"):
        manifest["tinynet_a"]


def test_loopback_http_is_accepted_for_local_servers():
    data = copy.deepcopy(RAW)
    data["models"]["tinynet_e"]["files"][0]["urls"] = ["http://127.0.0.1:8000/e.pth", "http://localhost/e.pth"]
    assert validate_manifest(data) == []


# D7: names that reach paths, JSON that parsers disagree on ------------------------------------------
@pytest.mark.parametrize("name", ["../../../escaped", "Tinynet_A", "a/b", "tinynet a", "x" * 65, ""])
@fault("A manifest names a model `../../../escaped` (or anything but `[a-z0-9_]`, up to 64 characters)",
       "`manifest check` and every load refuse it, naming the key")
def test_model_names_that_could_leave_the_cache_are_refused(tmp_path, name):
    data = copy.deepcopy(RAW)
    data["models"][name] = data["models"]["tinynet_e"]
    path = tmp_path / "m.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    assert f"$.models[{json.dumps(name)}]: a model name must be" in str(err.value)
    result = cli("manifest", "check", "--manifest", str(path))
    assert result.returncode == 2 and "a model name must be" in result.stderr


ALGO = next(iter(RAW["models"]["tinynet_e"]["files"][0]["checksums"]))


def _with_duplicate(kind, bad_first):
    """The manifest's text with one key given twice, the broken value first or last."""
    text = json.dumps(RAW)
    if kind == "model":
        old = f'"tinynet_e": {json.dumps(RAW["models"]["tinynet_e"])}'
        pair = [f'"tinynet_e": {json.dumps(dict(RAW["models"]["tinynet_e"], num_params=1))}', old]
    else:
        digest = RAW["models"]["tinynet_e"]["files"][0]["checksums"][ALGO]
        old = f'"{ALGO}": "{digest}"'
        pair = [f'"{ALGO}": "{"0" * len(digest)}"', old]  # well-formed: only the duplicate gives it away
    assert text.count(old) == 1
    return text.replace(old, ", ".join(pair if bad_first else pair[::-1]))


@pytest.mark.parametrize("bad_first", [True, False], ids=["bad-first", "bad-last"])
@pytest.mark.parametrize("kind", ["model", "checksum"])
@fault("A manifest gives a model or a checksum twice (JSON keeps only the last)",
       "refused in either order, naming the key")
def test_duplicate_keys_are_refused(tmp_path, kind, bad_first):
    path = tmp_path / "m.json"
    path.write_text(_with_duplicate(kind, bad_first))
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    key = "$.models.tinynet_e" if kind == "model" else f"$.models.tinynet_e.files[0].checksums.{ALGO}"
    assert f"{key}: the key appears more than once" in str(err.value)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
@fault("A manifest holds `NaN` or `Infinity` (which Python's json accepts)", "refused, with the JSON path")
def test_non_finite_numbers_are_refused(tmp_path, literal):
    text = json.dumps(RAW).replace('"top1": 77.7', f'"top1": {literal}', 1)
    assert literal in text
    path = tmp_path / "m.json"
    path.write_text(text)
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    assert "$.models.tinynet_a.metrics.top1: " in str(err.value) and "not a finite number" in str(err.value)


@fault("A manifest has a model key for which the package has no architecture",
       "`ghostnet-hub manifest check` reports it")
def test_manifest_check_refuses_a_model_without_architecture(tmp_path):
    data = copy.deepcopy(RAW)
    data["models"]["tinynet_z"] = data["models"]["tinynet_e"]
    path = tmp_path / "m.json"
    path.write_text(json.dumps(data))
    result = cli("manifest", "check", "--manifest", str(path))
    assert result.returncode == 2 and "$.models.tinynet_z: no model of that name in this package" in result.stderr


@fault("A manifest is nested 100,000 levels deep (in a file, or in a repository `torch.hub.load` reads)",
       "refused before it is parsed: a manifest error with the JSON path where it passes 32 levels; no "
       "`RecursionError`, no traceback")
def test_deeply_nested_manifest_is_refused_with_its_path(tmp_path, monkeypatch):
    raw = copy.deepcopy(RAW)
    raw["models"]["tinynet_e"]["files"][0]["notes"] = "@"
    deep = json.dumps(raw).replace('"@"', "[" * 100_000 + "]" * 100_000)
    path = tmp_path / "deep.json"
    path.write_text(deep)
    result = cli("manifest", "check", "--manifest", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "$.models.tinynet_e.files[0].notes" + "[0]" * 25 in result.stderr
    assert "nested more than 32 levels deep" in result.stderr and len(result.stderr) < 2000
    monkeypatch.setenv("GHOSTNET_HUB_MANIFEST", str(path))
    with pytest.raises(ManifestError, match="nested more than 32 levels deep"):
        __import__("models").tinynet_e(pretrained=True)


@fault("A manifest lists 200,000 URLs for one file (or thousands of models, files or problems)",
       "refused with the count and the limit at its JSON path; the error stays short (at most 20 problems "
       "shown, each at most 300 characters, then how many more)")
def test_huge_manifests_give_short_errors(tmp_path):
    raw = copy.deepcopy(RAW)
    raw["models"]["tinynet_e"]["files"][0]["urls"] = [f"http://example.com/{i}" for i in range(200_000)]
    path = tmp_path / "urls.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    message = str(err.value)
    assert "$.models.tinynet_e.files[0].urls: 200000 URLs; at most 32" in message and len(message) < 2000
    raw = copy.deepcopy(RAW)
    raw["models"]["tinynet_e"]["license"] = 7
    raw["models"]["tinynet_e"]["paper"] = "ftp://" + "x" * 1_000_000
    for name in list(raw["models"]):
        raw["models"][name]["macs"] = -1
    raw["models"].update({f"m{i}": 1 for i in range(500)})
    path.write_text(json.dumps(raw))
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    message = str(err.value)
    assert f"$.models: {len(RAW['models']) + 500} model entries; at most 256" in message and len(message) < 8000
    raw["models"] = {k: v for k, v in raw["models"].items() if not k.startswith("m")}
    raw["models"].update({f"m{i}": 1 for i in range(40)})
    path.write_text(json.dumps(raw))
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    message = str(err.value)
    assert re.search(r"\.\.\. and \d+ more problem\(s\)", message) and len(message) < 8000
    assert max(map(len, message.splitlines())) <= 310


def test_a_manifest_larger_than_16_mib_is_refused_unparsed(tmp_path):
    path = tmp_path / "big.json"
    path.write_text(json.dumps({**RAW, "comment": "x" * (17 << 20)}))
    with pytest.raises(ManifestError, match="larger than 16 MiB"):
        load_manifest(path)
