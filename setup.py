"""Build step that pyproject.toml cannot declare: the installed package carries the files it
reads from outside ``models/`` in a clone (the weights manifest at the repository root and the
sample photo in examples/), at the places ``models/manifest.py`` and ``models/tools/predict.py``
look for them first."""
import pathlib
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = pathlib.Path(__file__).resolve().parent
BUNDLED = {  # repository file -> path inside the installed package
    "weights_manifest.json": "weights_manifest.json",
    "examples/chelsea.jpg": "data/chelsea.jpg",
}


class BuildWithBundledFiles(build_py):
    def run(self):
        super().run()
        package = pathlib.Path(self.build_lib) / "ghostnet_hub"
        for source, target in BUNDLED.items():
            (package / target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ROOT / source, package / target)


setup(cmdclass={"build_py": BuildWithBundledFiles})
