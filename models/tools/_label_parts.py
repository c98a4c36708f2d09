"""The working folder of a ``label`` run, ``OUT.parts/`` beside its output, which makes the run
resumable: what it was asked (``run.json``), the list of inputs fixed when it started
(``inputs.jsonl``), and one part per rank (``part-00000.jsonl``, ...) that the rank appends its
results to, one batch per write.

The unit of work, and of a resume, is the batch: batch ``b`` is always the inputs
``[b * batch_size, (b + 1) * batch_size)``, whichever rank and run labels it, so its numbers do
not depend on how the work was split (CPU kernels may round differently in another batch).
A batch is done when some part holds a line for each of its inputs, in order, each ending in a
newline: a write cut by a kill leaves a batch that is not done, and it is labelled again."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .._files import WriteError, check_room, write_file

FORMAT = "ghostnet_hub.label/1"
# What a start cut before run.json was written leaves: the folder is started again.
_STARTING = {"inputs.jsonl", "inputs.jsonl.partial", "run.json.partial"}


class LabelError(ValueError):
    """The run cannot start or go on as asked; the message is one line that says what to do."""


@dataclass(frozen=True)
class Batch:
    """A batch a part holds whole: its bytes ``[start, end)`` in ``path``, and its error lines."""

    path: pathlib.Path
    start: int
    end: int
    errors: int


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class RunFolder:
    """``OUT.parts/`` of the output ``out``."""

    def __init__(self, out: str | os.PathLike):
        self.out = pathlib.Path(out)
        self.dir = self.out.with_name(self.out.name + ".parts")
        self.run_file = self.dir / "run.json"
        self.inputs_file = self.dir / "inputs.jsonl"

    def part(self, rank: int) -> pathlib.Path:
        return self.dir / f"part-{rank:05d}.jsonl"

    def parts(self) -> list[pathlib.Path]:
        return sorted(self.dir.glob("part-*.jsonl"))

    def finished(self, rank: int) -> pathlib.Path:
        """The mark a rank leaves when it has labelled its share."""
        return self.dir / f"finished-{rank:05d}"

    def wait_for(self, paths: Sequence[pathlib.Path], what: str) -> None:
        """Wait until ``paths`` exist, however long. The ranks wait for each other this way, not in
        a collective: a collective gives up after its timeout (30 min with gloo, less with NCCL),
        and listing a large tree or labelling a slow share may take longer than that."""
        start = time.monotonic()
        told = False
        while not all(p.exists() for p in paths):
            if not told and time.monotonic() - start > 60:
                print(f"waiting for {what} ({self.dir}); with several nodes, --out must be on a filesystem that "
                      "every node sees", file=sys.stderr, flush=True)
                told = True
            time.sleep(0.2)

    # -- the start ----------------------------------------------------------------------------
    def precheck(self, asked: dict) -> None:
        """Refuse, before any work, an unfinished run asked otherwise, or a finished output."""
        if self.run_file.is_file():
            self.check(asked)
        else:
            self._not_finished()

    def _not_finished(self) -> None:
        if self.out.exists():
            raise LabelError(f"{self.out} exists (a finished run): remove it or choose another --out; "
                             "label does not overwrite it")

    def start(self, request: dict, list_inputs) -> bool:
        """(Rank 0) Make the folder for ``request`` (the inputs ``list_inputs()`` returns, then
        ``run.json``), or check that the unfinished run there is this one; True if it was there."""
        if self.run_file.is_file():
            self.check(request)
            return True
        self._not_finished()
        if self.dir.exists() and {p.name for p in self.dir.iterdir()} - _STARTING:
            raise LabelError(f"{self.dir} holds files but no run.json (not a run of label, or damaged): "
                             "remove it to start over")
        sources = list_inputs()
        if not sources:
            raise LabelError("no images found in " + ", ".join(request["sources"] + [request["from_list"] or ""]))
        self.dir.mkdir(parents=True, exist_ok=True)
        # json.dumps per line: any path (a newline, bytes that are not UTF-8) comes back as it was.
        listing = "".join(json.dumps(s) + "\n" for s in sources).encode()
        write_file(self.inputs_file, listing)
        header = {"format": FORMAT, **request, "inputs": len(sources), "inputs_sha256": _sha256(listing)}
        write_file(self.run_file, (json.dumps(header, indent=1) + "\n").encode())  # last: the run now exists
        return False

    # -- every rank -----------------------------------------------------------------------
    def header(self) -> dict:
        try:
            header = json.loads(self.run_file.read_text())
        except FileNotFoundError:
            raise LabelError(f"{self.run_file} cannot be found from this process: with several nodes, --out must be "
                             "on a filesystem that every node sees") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise LabelError(f"{self.run_file} is not the record of a label run: remove {self.dir} to start over")
        return header

    def check(self, request: dict) -> dict:
        """The folder's header, if it records ``request``; else the one-line refusal."""
        header = self.header()
        changed = [f"{key}: {header.get(key)!r} there, {value!r} now" for key, value in request.items()
                   if header.get(key) != value]
        if changed:
            raise LabelError(f"{self.dir} is an unfinished run with other settings ({'; '.join(changed)}): run the "
                             f"command that started it to finish it, or remove {self.dir} to start over")
        return header

    def inputs(self, header: dict) -> list[str]:
        listing = self.inputs_file.read_bytes()
        if _sha256(listing) != header["inputs_sha256"]:
            raise LabelError(f"{self.inputs_file} is not the list the run started with (damaged): remove {self.dir} "
                             "to start over")
        return [json.loads(line) for line in listing.splitlines()]

    def done(self, batch_size: int, total: int) -> tuple[dict[int, Batch], dict[pathlib.Path, int]]:
        """The batches held whole, by number (the first part that holds one wins), and the end
        of each part's last whole batch (what follows it is a cut write)."""
        batches: dict[int, Batch] = {}
        ends = {}
        for path in self.parts():
            found, ends[path] = _scan(path, batch_size, total)
            for number, batch in found:
                batches.setdefault(number, batch)
        return batches, ends

    # -- the end (rank 0) -----------------------------------------------------------------
    def merge(self, batch_size: int, total: int) -> tuple[int, int]:
        """The batches, in input order, into ``out`` (written beside as ``OUT.partial``, then
        renamed: it appears whole or not at all), then the folder removed; (lines, error lines)."""
        batches, _ = self.done(batch_size, total)
        missing = [b for b in range((total + batch_size - 1) // batch_size) if b not in batches]
        if missing:  # (every rank labelled its share before the merge: this would be a bug)
            raise LabelError(f"{len(missing)} batch(es) missing from {self.dir} (the first: inputs from "
                             f"{missing[0] * batch_size}): run the command again to label them")
        ordered = [batches[b] for b in sorted(batches)]
        partial = self.out.with_name(self.out.name + ".partial")
        check_room(self.out, sum(b.end - b.start for b in ordered))
        try:
            with contextlib.ExitStack() as stack:
                sources = {path: stack.enter_context(open(path, "rb")) for path in {b.path for b in ordered}}
                with open(partial, "wb") as merged:
                    for batch in ordered:
                        source = sources[batch.path]
                        source.seek(batch.start)
                        merged.write(source.read(batch.end - batch.start))
                    merged.flush()
                    os.fsync(merged.fileno())
            os.replace(partial, self.out)
        except OSError as exc:
            with contextlib.suppress(OSError):
                partial.unlink()
            raise WriteError(self.out.parent, self.out.name, sum(b.end - b.start for b in ordered), exc) from None
        shutil.rmtree(self.dir, ignore_errors=True)
        return total, sum(b.errors for b in ordered)


def _record_index(line: bytes, total: int) -> tuple[int, bool] | None:
    """(index, is an error line) of a whole line of a part, None for anything else."""
    if not line.endswith(b"\n"):
        return None
    try:
        record = json.loads(line)
    except ValueError:  # (a cut write, or zeros where a lost node's last blocks were)
        return None
    index = record.get("index") if isinstance(record, dict) else None
    if not isinstance(index, int) or not 0 <= index < total or not ("top" in record or "error" in record):
        return None
    return index, "error" in record


def _scan(path: pathlib.Path, batch_size: int, total: int) -> tuple[list[tuple[int, Batch]], int]:
    """The whole batches of one part, and the end of the last one."""
    found, offset, last_end = [], 0, 0
    current = None  # [batch number, start, next index, errors]
    with open(path, "rb") as f:
        for line in f:
            parsed = _record_index(line, total)
            if parsed is None:
                current = None
            elif current is not None and parsed[0] == current[2] and parsed[0] // batch_size == current[0]:
                current[2] += 1
                current[3] += parsed[1]
            elif parsed[0] % batch_size == 0:
                current = [parsed[0] // batch_size, offset, parsed[0] + 1, int(parsed[1])]
            else:
                current = None
            offset += len(line)
            if current is not None and current[2] == min(total, (current[0] + 1) * batch_size):
                found.append((current[0], Batch(path, current[1], offset, current[3])))
                last_end, current = offset, None
    return found, last_end


def shard(batches: int, done: Sequence[int] | dict, rank: int, world: int) -> list[int]:
    """This rank's share of the batches not done: every ``world``-th, so that a run resumed on
    any number of processes spreads what is left evenly."""
    return [b for b in range(batches) if b not in done][rank::world]
