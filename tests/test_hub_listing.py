"""The PyTorch Hub listing (hub/*.md): pytorch/hub's rules, its table, and its code, run."""
import re

import pytest

from models.api import GITHUB_REPO
from models.manifest import load_manifest

from helpers import ROOT

LISTINGS = sorted((ROOT / "hub").glob("*.md"))
# pytorch/hub's scripts/sanity_check.py and scripts/tags.py
REQUIRED_HEAD = ["---", "layout: hub_detail", "background-class: hub-background", "body-class: hub"]
REQUIRED_FIELDS = {"title", "summary", "image", "author", "tags", "github-link", "category"}
VALID_TAGS = {"vision", "nlp", "generative", "audio", "scriptable", "forecasting"}
VALID_CATEGORIES = {"researchers", "developers"}


def _front_matter(text):
    lines = text.splitlines()
    end = lines.index("---", 1)
    return lines, dict(line.split(":", 1) for line in lines[len(REQUIRED_HEAD):end]), end


def test_one_listing_named_after_the_repository():
    assert [p.name for p in LISTINGS] == [f"{GITHUB_REPO.replace('/', '_')}_ghostnet_tinynet.md"]
    assert re.fullmatch(r"[^_/]+_[^_/]+_\w+\.md", LISTINGS[0].name)


@pytest.mark.parametrize("path", LISTINGS, ids=lambda p: p.name)
def test_listing_follows_pytorch_hub_rules(path):
    lines, fields, end = _front_matter(path.read_text())
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    assert lines[:len(REQUIRED_HEAD)] == REQUIRED_HEAD
    assert REQUIRED_FIELDS <= fields.keys()
    assert fields["category"] in VALID_CATEGORIES
    tags = fields["tags"]
    assert tags.startswith("[") and tags.endswith("]")
    assert {t.strip() for t in tags[1:-1].split(",")} <= VALID_TAGS
    for key in ("title", "summary", "author"):  # Jekyll breaks on a colon in these
        assert ":" not in fields[key], key
    for key in ("image", "featured_image_1", "featured_image_2"):
        assert fields[key] in ("no-image", "pytorch-logo.png") or (path.parent / "images" / fields[key]).is_file()
    assert fields["github-link"] == f"https://github.com/{GITHUB_REPO}"
    assert fields["github-id"] == GITHUB_REPO
    assert fields["accelerator"] in ("cuda", "cuda-optional")
    assert int(fields["order"]) > 0
    headings = [line for line in lines[end:] if line.startswith("###")]
    assert all(":" not in h for h in headings), headings
    assert "### Model Description" in headings


def _title(name):
    """The listing's name for a model: ghostnetv2_1_3x -> GhostNetV2 1.3x, tinynet_a -> TinyNet-A."""
    family, _, width = name.partition("_")
    if family == "tinynet":
        return f"TinyNet-{width.upper()}"
    version = family.removeprefix("ghostnet").upper()
    return f"GhostNet{version} {float(width.removesuffix('x').replace('_', '.')):.1f}x"


@pytest.mark.parametrize("path", LISTINGS, ids=lambda p: p.name)
def test_listing_table_matches_the_manifest(path):
    manifest = load_manifest()
    names = {_title(name): name for name in manifest.models}  # every model with published weights
    rows = [line.strip("|").split("|") for line in path.read_text().splitlines()
            if line.startswith("| ") and line.split("|")[1].strip() in names]
    assert sorted(row[0].strip() for row in rows) == sorted(names)
    for title, size, params, macs, top1, top5 in (map(str.strip, row) for row in rows):
        e = manifest[names[title]]
        assert (int(size), params, macs) == (e.input_size, f"{e.num_params / 1e6:.2f}M", f"{e.macs / 1e6:.0f}M")
        assert (float(top1), float(top5)) == (e.top1, e.top5)


@pytest.mark.slow  # a GitHub-like checkout, a hub load
@pytest.mark.parametrize("path", LISTINGS, ids=lambda p: p.name)
def test_listing_python_blocks_run(path, github_checkout, published, capsys):
    """As pytorch/hub's CI does: the python blocks, in order, as one script; here against
    this checkout in the hub cache (GitHub unreachable) and the loopback weights server."""
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), re.S)
    assert len(blocks) == 3
    exec(compile("\n".join(blocks), str(path), "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 10
    assert all(len(line.rsplit(" ", 1)) == 2 and 0 <= float(line.rsplit(" ", 1)[1]) <= 1 for line in out[:5])
    assert [line.split()[0] for line in out[5:]] == [f"tinynet_{c}" for c in "abcde"]
    assert "(106, 106)" in out[9]
