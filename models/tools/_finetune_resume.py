"""Which run a ``finetune`` command continues. A new run needs an OUT without ``last.pth``;
``--resume OUT`` continues OUT's run with the settings saved in its ``last.pth``; and a command
relaunched as it was (``--auto-resume``, for a scheduler that requeues it, or torchrun's agent
restarting the processes under ``--max-restarts``) continues OUT's run when that run is this
command's, starts one when OUT holds none, and is refused when OUT's run has other settings.

Under torchrun only rank 0 decides this and reads ``last.pth`` (``World.from_main``), so the
other nodes need neither OUT nor a filesystem shared with rank 0."""
from __future__ import annotations

import pathlib
from typing import Any

import torch

from ._distributed import World, restarts
from ._finetuned import resume_state

# What a resumed run may change: where it runs and how it shows progress; the data may have moved.
MAY_CHANGE = {"data", "workers", "device", "progress", "epochs", "max_skipped"}


def why_continue(auto_resume: bool, world: World) -> str | None:
    """Why this command, finding a run in OUT, continues it rather than refusing (None). Under
    ``torchrun --max-restarts N`` always: the agent may relaunch the command, and only the node
    whose process failed counts a restart (TORCHELASTIC_RESTART_COUNT), while its other nodes'
    relaunched processes see 0, so the count cannot tell a relaunch from a first start. Every
    rank calls this (it sums over the ranks)."""
    count, most = restarts()
    restarted = world.all_sum(torch.tensor([float(count > 0)], dtype=torch.float64))[0] > 0
    if restarted:
        return "torchrun restarted the processes"
    if most > 0:
        return "torchrun --max-restarts"
    return "--auto-resume" if auto_resume else None


def as_saved(config: dict[str, Any]) -> dict[str, Any]:
    """The settings as ``last.pth`` keeps them (paths as strings)."""
    return {k: (v if v is None or isinstance(v, (bool, int, float, str)) else str(v)) for k, v in config.items()}


def settle(defaults: dict, given: dict, out, resume, why: str | None) -> tuple[dict, dict | None]:
    """(the run's settings, the state to resume from, or None for a new run) for a command
    whose options are ``given``; ``out`` or ``resume`` is the run's folder."""
    if resume is None:
        last = pathlib.Path(out) / "last.pth"
        if not last.exists():
            return {**defaults, **given, "out": str(out)}, None
        if why is None:
            raise ValueError(f"{out} already holds a run (last.pth): continue it with --resume {out} (or run this "
                             "command with --auto-resume), or choose another --out")
        state = resume_state(last)
        config = {**defaults, **state["args"], "out": str(out)}
        # The same command: every setting it gives or leaves at its default is the run's.
        wanted = as_saved({**defaults, **given})
        changed = [k for k, v in wanted.items() if k not in MAY_CHANGE and v != config.get(k)]
        if changed:
            raise ValueError(f"{out} holds a run with other settings ({', '.join(changed)}): it is not this "
                             f"command's run. Run the command that started it, continue it with --resume {out}, "
                             "or choose another --out")
    else:
        last = pathlib.Path(resume) / "last.pth"
        if not last.is_file():
            raise FileNotFoundError(f"nothing to resume: {last} does not exist")
        state = resume_state(last)
        config = {**defaults, **state["args"], "out": str(resume)}
        changed = [k for k, v in given.items() if k not in MAY_CHANGE and v != config.get(k)]
        if changed:
            raise ValueError(f"resuming {resume} with other settings ({', '.join(changed)}) would not continue the "
                             f"same run; only {', '.join(sorted(MAY_CHANGE))} may change")
        if out is not None and pathlib.Path(out).resolve() != pathlib.Path(resume).resolve():
            raise ValueError(f"a resumed run writes where it was: drop --out {out} (the run is in {resume})")
        why = "--resume"
    config.update({k: v for k, v in given.items() if k in MAY_CHANGE})
    config["progress"] = given.get("progress", True)  # how it shows, not what it computes
    # Where it runs is this command's: under torchrun the device is chosen before last.pth is read.
    config["device"] = given.get("device")
    state["why"] = why
    return config, state
