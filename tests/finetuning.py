"""What the fine-tuning tests share (test_finetune.py, test_finetune_runs.py, test_multinode.py):
the small settings, and the comparisons of two runs' weights."""
import contextlib
import io

import torch

# Small and fast: 32 train / 12 val images of 40 px, trained at 32 px, 4 steps per epoch.
TINY = {"input_size": 32, "batch_size": 8, "workers": 0, "progress": False}
# Appended to the README's commands in the tests: small and fast, 2 epochs of 2 steps (so the
# sampler's reshuffle per epoch counts), and no dropout, whose masks depend on the process (the
# augmentation does not: it is seeded per image). SGD at a small rate, not AdamW: AdamW divides
# each gradient by its own running RMS, so parameters whose gradient is zero in theory (a bias
# that a BatchNorm follows) move by the full rate on float noise alone, as much between two
# one-process runs with different thread counts as between one process and two.
FAST = ["--epochs", "2", "--input-size", "64", "--batch-size", "16", "--workers", "0", "--drop-rate", "0", "--quiet",
        "--opt", "sgd", "--lr", "1e-3"]
# The largest difference of any weight or BatchNorm statistic, 2 processes vs 1: float sums in another
# order. 1.03e-5 on an AVX2 EPYC (under 1e-5 on the AVX-512 Xeon before); without --sync-bn it is ~1.
TOLERANCE = 1e-4
SERIAL = {"OMP_NUM_THREADS": "1"}  # the same kernels in every process of these comparisons


def quiet(fn, *args, **kwargs):
    """fn(...) with its stdout captured: (result, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = fn(*args, **kwargs)
    return result, out.getvalue()


def state_of(path):
    return torch.load(path, weights_only=True)["state_dict"]


def max_difference(a, b):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
