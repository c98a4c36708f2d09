"""``python -m models predict|list|info``: any image PIL reads, directories, URLs, failures."""
import io
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

import models
from models.tools._images import SAMPLE_IMAGE, to_rgb

from helpers import MODELS, cli, doc, readme_argv, run_models

TABBY = 281  # "tabby" in ImageNet-1k


# -- decoding: every kind of image comes out as the RGB a person sees ---------------------------

def test_rgba_transparent_pixels_become_white():
    image = Image.new("RGBA", (4, 4), (10, 200, 30, 0))  # invisible green
    image.putpixel((0, 0), (10, 200, 30, 255))
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.getpixel((1, 1)) == (255, 255, 255) and rgb.getpixel((0, 0)) == (10, 200, 30)


def test_palette_with_transparency():
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 1
    assert np.asarray(to_rgb(image)).tolist() == [[[255, 0, 0], [255, 255, 255]]]


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    rgb = to_rgb(Image.open(path))
    assert np.asarray(rgb)[0, :, 0].tolist() == [0, 128, 255]


def test_cmyk_and_grayscale():
    assert to_rgb(Image.new("CMYK", (1, 1), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("L", (1, 1), 77)).getpixel((0, 0)) == (77, 77, 77)
    assert to_rgb(Image.new("1", (1, 1), 1)).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # red on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "phone.jpg"
    image.save(path, exif=exif.tobytes(), quality=95)
    upright = to_rgb(Image.open(path))
    assert upright.size == (20, 40)
    red, green, blue = upright.getpixel((10, 5))
    assert red > 200 and green < 60  # the left half is now on top


# -- the command ---------------------------------------------------------------------------------

@pytest.fixture
def tabby_weights(serve_fixed_logits):
    """ghostnet_1x weights whose classifier always says "tabby", served on loopback."""
    return serve_fixed_logits("ghostnet_1x", {TABBY: 10.0})


run = cli  # in this process; the README's main job below runs as a real subprocess


@pytest.mark.slow  # a real `python -m models` process
def test_readme_main_job_classifies_the_sample(tabby_weights):
    setup = doc("README").split("<!-- ci:setup -->", 1)[1].split("```bash\n", 1)[1].split("\n", 1)[0]
    main_job = readme_argv(setup.split("&&")[-1])  # (a clone's quick start: .venv/bin/python -m models)
    assert main_job[:3] == MODELS
    result = run_models(*main_job[3:])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == str(SAMPLE_IMAGE) and len(lines) == 6
    assert lines[1].split()[:2] == ["1.", "tabby"] and lines[1].endswith("100.00%")


def test_sample_image_is_small_and_attributed():
    assert SAMPLE_IMAGE.stat().st_size <= 200_000
    assert Image.open(SAMPLE_IMAGE).size == (451, 300)
    readme = doc("README")
    assert "Chelsea" in readme and "CC0" in readme


@pytest.mark.slow  # 51 images, two DataLoader worker processes
def test_directory_with_every_kind_of_image_and_a_broken_one(tabby_weights, tmp_path):
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    Image.new("RGBA", (50, 40), (0, 0, 0, 0)).save(folder / "a_rgba.png")
    Image.new("L", (30, 60), 100).save(folder / "b_gray.png")
    Image.new("P", (30, 30)).save(folder / "c_palette.gif")
    Image.new("CMYK", (40, 40), (10, 20, 30, 0)).save(folder / "d_cmyk.jpg")
    Image.fromarray(np.full((40, 30), 40000, dtype=np.uint16)).save(folder / "e_16bit.png")
    for i in range(45):
        Image.new("RGB", (64 + i, 48), (i, 2 * i, 3 * i)).save(folder / "nested" / f"f_{i:02d}.jpg")
    (folder / "g_broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (folder / "notes.txt").write_text("not an image, not picked up")
    result = run("predict", str(folder), "--json", "-", "--batch-size", "8", "--workers", "2", "--topk", "3")
    assert result.returncode == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 51
    assert [r["image"] for r in records] == sorted(r["image"] for r in records)
    broken = [r for r in records if "error" in r]
    assert [pathlib.Path(r["image"]).name for r in broken] == ["g_broken.jpg"]
    for r in records:
        if "error" not in r:
            assert len(r["top"]) == 3 and r["top"][0]["index"] == TABBY and r["top"][0]["label"] == "tabby"
    assert "g_broken.jpg: skipped" in result.stderr and "1 of 51 image(s) could not be read" in result.stderr


def test_url_and_missing_file(tabby_weights, tmp_path):
    buffer = io.BytesIO()
    Image.open(SAMPLE_IMAGE).save(buffer, format="PNG")
    url = tabby_weights.add("/cat.png", buffer.getvalue())
    result = run("predict", url, str(tmp_path / "missing.jpg"), "--json", "-", "--quiet")
    assert result.returncode == 1
    ok, missing = [json.loads(line) for line in result.stdout.splitlines()]
    assert ok["image"] == url and ok["top"][0]["label"] == "tabby" and len(ok["top"]) == 5
    assert "FileNotFoundError" in missing["error"]


def test_predict_with_a_model_without_weights_is_a_clear_error(tabby_weights):
    result = run("predict", "--model", "ghostnet_1_3x")
    assert result.returncode == 2 and "'ghostnet_1_3x' has no released weights" in result.stderr


def test_list_and_info(tabby_weights):
    listing = run("list")
    assert listing.returncode == 0
    rows = {line.split()[0]: line.split() for line in listing.stdout.splitlines()[1:]}
    assert list(rows) == models.list_models()  # every model, in registry order
    assert rows["ghostnet_1x"][1:4] == ["yes", "73.98", "91.46"] and rows["ghostnet_1x"][-1] == "no"
    run("prefetch", "ghostnet_1x", "--quiet")
    assert run("list").stdout.splitlines()[2].split()[-1] == "yes"
    info = run("info", "ghostnet_1x")
    assert info.returncode == 0
    for fragment in ("GhostNet 1.0x", "5,182,508 parameters", "conv_stem (stride 2, 16 ch)",
                     "'acc@1': 73.98", "resize_size=[256]", "InterpolationMode.BILINEAR", "in cache"):
        assert fragment in info.stdout, fragment
    assert run("info", "resnet50").returncode != 0
