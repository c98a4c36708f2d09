"""The runtimes' common ground, below everything that exports or runs an exported file: the
``Runner`` that calls a runtime like the eager model, the names of the backends and their file
suffixes, ``require`` (an optional runtime, or one line naming the extra that installs it) and
the silencing of what runtimes print."""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import pathlib
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .. import _commands
from ..description import ModelDescription

BACKENDS = ("eager", "compile", "onnxruntime", "executorch", "openvino")
# The pip package behind each optional module, and the smallest extra of this package that has it
# (requirements-export.txt, requirements-deploy.txt).
_PIP_NAMES = {"onnxruntime": "onnxruntime", "onnx": "onnx", "onnxscript": "onnxscript", "executorch": "executorch",
              "torchao": "executorch", "openvino": "openvino", "nncf": "nncf"}
_EXTRAS = {"onnxruntime": "export", "onnx": "export", "onnxscript": "export", "executorch": "deploy",
           "torchao": "deploy", "openvino": "deploy", "nncf": "deploy"}
SUFFIXES = {".onnx": "onnxruntime", ".pte": "executorch", ".pt2": "eager", ".xml": "openvino"}
# The export format behind each runtime backend.
FORMAT_OF = {"onnxruntime": "onnx", "executorch": "executorch", "openvino": "openvino"}


class MissingRuntime(ImportError):
    """An optional runtime (ONNX Runtime, ExecuTorch) is not installed; the message is one
    line that names what to install."""


def require(module: str, purpose: str = "") -> Any:
    """``import module``, or a ``MissingRuntime`` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        what = f" (needed {purpose})" if purpose else ""
        raise MissingRuntime(
            f"{top} is not installed{what}: {_commands.install(_EXTRAS.get(top, 'deploy'))}, "
            f"or just pip install {_PIP_NAMES.get(top, top)}"
        ) from None


@contextlib.contextmanager
def quiet_native_output() -> Iterator[None]:
    """Silence what the runtimes and exporters print (ExecuTorch logs its CPU probing on file
    descriptor 2, the ONNX exporter prints progress) and their warnings; what they printed is
    shown if the block fails."""
    sink = tempfile.TemporaryFile(mode="w+b")
    python_output = io.StringIO()
    saved = []
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.flush()
    with contextlib.suppress(OSError):  # without real descriptors (some notebooks) only Python's is caught
        for fd in (1, 2):
            saved.append((fd, os.dup(fd)))
            os.dup2(sink.fileno(), fd)
    try:
        with contextlib.redirect_stdout(python_output), contextlib.redirect_stderr(python_output), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the runtimes' notes on their own internals
            yield
    except BaseException:
        _restore(saved)
        sink.seek(0)
        sys.stderr.write(sink.read().decode(errors="replace") + python_output.getvalue())
        raise
    finally:
        _restore(saved)
        sink.close()


def _restore(saved: list) -> None:
    while saved:
        fd, copy = saved.pop()
        os.dup2(copy, fd)
        os.close(copy)


class Runner:
    """An exported model in its runtime, called like the eager model: float images
    (N, 3, H, W) in, logits (N, classes) out, on the CPU. Batches larger than the program
    takes (``max_batch``, ExecuTorch) are run in pieces."""

    device = torch.device("cpu")
    training = False

    def __init__(self, backend: str, path: pathlib.Path, run: Callable[[torch.Tensor], torch.Tensor],
                 max_batch: int | None = None, description: ModelDescription | None = None):
        self.backend, self.path, self._run, self.max_batch = backend, pathlib.Path(path), run, max_batch
        # What the file says it is (None for a file exported elsewhere); like a published
        # model's weights, it gives the preprocessing and class names.
        self.description = description
        self.pretrained_weights: Any = description
        self.num_classes = description.num_classes if description is not None else None

    @property
    def inference_precision(self) -> str:
        """What the runtime computes the float parts in (OpenVINO: ``f32`` or ``bf16`` as compiled)."""
        return getattr(self._run, "inference_precision", "f32")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.detach().to("cpu", torch.float32).contiguous()
        step = self.max_batch or len(images)
        parts = [self._run(images[i:i + step]) for i in range(0, len(images), step)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def eval(self) -> Runner:
        return self

    def __repr__(self) -> str:
        return f"Runner({self.backend}, {str(self.path)!r})"


def device_of(model: Any) -> torch.device:
    """Where a model's inputs go: its parameters' device, or the CPU for a runtime."""
    if isinstance(model, Runner):
        return model.device
    first = next(iter(model.parameters()), None) if isinstance(model, nn.Module) else None
    return first.device if first is not None else torch.device("cpu")


def described(text: str | bytes | None, path: pathlib.Path) -> ModelDescription | None:
    return None if text is None else ModelDescription.from_json(text, str(path))


def lend(runner: Runner, model: nn.Module) -> Runner:
    """A runner for a file that has no description takes the eager model's (class names,
    preprocessing), which the caller says is the model of the file."""
    if runner.description is None:
        runner.pretrained_weights = getattr(model, "pretrained_weights", None)
        runner.num_classes = getattr(model, "num_classes", None)
        runner.pretrained_cfg = getattr(model, "pretrained_cfg", None)
    return runner


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
