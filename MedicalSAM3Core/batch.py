"""Batch segmentation: many volumes with one model load, a ``summary.csv``, resumable; under
``torchrun`` the cases are sharded over the ranks (one device each), on one machine or many.

    medsam3 segment scans/ -p "liver, spleen, kidneys" --output-dir out/
    torchrun --nproc-per-node 4 -m MedicalSAM3Core segment scans/ -p liver --output-dir out/

A batch input is a folder of volumes (NIfTI/NRRD/MHA files and sub-folders holding a DICOM
series), a CSV list (a ``path`` column, optional ``id`` and ``series``; paths relative to the CSV)
or a training dataset JSON (its ``cases``' ``image``; paths relative to the JSON). Each case's
outputs go to ``--output-dir`` as ``<id>.nii.gz`` and the requested extras, written atomically as
for one volume. A failing case is recorded (status and error in the summary) and the run goes on.
``--resume`` keeps the cases whose outputs are all there (outputs are never half-written).

Sharding: rank ``r`` of ``N`` (``RANK``/``WORLD_SIZE`` of torchrun) takes cases ``r, r + N, ...``
of the sorted list, on ``cuda:LOCAL_RANK`` where CUDA is available and ``--device`` is ``auto``.
The ranks exchange only their summary rows (a gloo process group: Python objects, no tensors);
rank 0 writes ``summary.csv``. Every rank exits 1 if any case failed anywhere.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from .common.errors import Cancelled, InputError, MedSAM3Error

log = logging.getLogger("medsam3.batch")

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
_NOT_INPUTS = (".seg.nrrd",)
SUMMARY = "summary.csv"


@dataclass(frozen=True)
class Case:
    """One volume of a batch: ``id`` names its outputs; ``series`` picks a DICOM series of a folder."""

    id: str
    path: Path
    series: Optional[str] = None


@dataclass
class CaseRow:
    """One case's line of ``summary.csv``."""

    case: str
    status: str  # "done", "done earlier" (--resume), "failed"
    seconds: float = 0.0
    error: str = ""
    labels: list[dict] = field(default_factory=list)  # sidecar labels: name, volume_ml, confidence


def _stem(name: str) -> Optional[str]:
    lower = name.lower()
    if lower.endswith(_NOT_INPUTS):
        return None
    for suffix in VOLUME_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _is_dicom_folder(folder: Path) -> bool:
    import SimpleITK as sitk

    return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def is_batch_input(path: Path) -> bool:
    """A CSV list, a dataset JSON, or a folder of volumes: volume files, or sub-folders holding a
    DICOM series (a folder that is itself a DICOM series, or holds neither, is one input)."""
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() in (".csv", ".json")
    if not path.is_dir() or _is_dicom_folder(path):
        return False
    entries = sorted(path.iterdir())
    return any(e.is_file() and _stem(e.name) for e in entries) or any(e.is_dir() and _is_dicom_folder(e)
                                                                       for e in entries)


def list_cases(path: Path) -> list[Case]:
    """The cases of a batch input, in a stable order (see the module docstring); refuses an input
    with no case, a listed file that does not exist, and two cases of one id (their outputs would
    collide)."""
    path = Path(path)
    if path.suffix.lower() == ".csv" and path.is_file():
        cases = _csv_cases(path)
    elif path.suffix.lower() == ".json" and path.is_file():
        cases = _json_cases(path)
    elif path.is_file() and _stem(path.name) is not None:  # one volume: a batch of one
        cases = [Case(_stem(path.name), path)]
    elif path.is_dir() and _is_dicom_folder(path):  # one DICOM series: a batch of one
        cases = [Case(path.name, path)]
    elif path.is_dir():
        cases = []
        for entry in sorted(path.iterdir()):
            stem = _stem(entry.name) if entry.is_file() else None
            if stem is not None:
                cases.append(Case(stem, entry))
            elif entry.is_dir() and _is_dicom_folder(entry):
                cases.append(Case(entry.name, entry))
    else:
        raise InputError(f"{path}: not a folder, a CSV list or a dataset JSON")
    if not cases:
        raise InputError(f"{path}: no volumes in it (NIfTI/NRRD/MHA files, or sub-folders holding a DICOM series)")
    missing = [str(c.path) for c in cases if not c.path.exists()]
    if missing:
        raise InputError(f"{path}: {len(missing)} listed volume(s) do not exist, e.g. {missing[0]}")
    seen: dict[str, Path] = {}
    for case in cases:
        if case.id in seen:
            raise InputError(f"{path}: two cases named {case.id!r} ({seen[case.id]} and {case.path}); their outputs "
                             "would overwrite each other: give them distinct ids")
        seen[case.id] = case.path
    return cases


def _csv_cases(path: Path) -> list[Case]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if "path" not in (reader.fieldnames or []):
            raise InputError(f"{path}: a batch CSV needs a 'path' column (optional: 'id', 'series')")
        cases = []
        for line, row in enumerate(reader, start=2):
            if not (row.get("path") or "").strip():
                raise InputError(f"{path}, line {line}: empty path")
            volume = (path.parent / row["path"].strip()).resolve()
            case_id = (row.get("id") or "").strip() or (_stem(volume.name) or volume.name)
            cases.append(Case(case_id, volume, (row.get("series") or "").strip() or None))
    return cases


def _json_cases(path: Path) -> list[Case]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InputError(f"{path} is not valid JSON: {error}") from None
    entries = data.get("cases") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and e.get("image") for e in entries):
        raise InputError(f"{path}: a batch JSON is a dataset JSON with 'cases': [{{'id': ..., 'image': ...}}, ...]")
    cases = []
    for entry in entries:
        volume = (path.parent / str(entry["image"])).resolve()
        cases.append(Case(str(entry.get("id") or _stem(volume.name) or volume.name), volume))
    return cases


def shard(cases: Sequence[Case], rank: int, world: int) -> list[Case]:
    """Rank ``rank``'s share of ``cases``: every ``world``-th, from the ``rank``-th."""
    return list(cases[rank::world])


def _earlier_row(case: Case, sidecar: Optional[Path]) -> CaseRow:
    labels: list[dict] = []
    if sidecar is not None:
        try:
            labels = json.loads(sidecar.read_text(encoding="utf-8")).get("labels", [])
        except (OSError, json.JSONDecodeError):
            labels = []
    return CaseRow(case.id, "done earlier", labels=labels)


def run_cases(cases: Sequence[Case], segment_case: Callable[[Case], tuple], paths_of: Callable[[Case], object],
              resume: bool, on_case: Optional[Callable[[int, int, CaseRow], None]] = None) -> list[CaseRow]:
    """Segment ``cases`` one after the other and return their summary rows.

    ``segment_case(case)`` reads, segments and writes one case and returns its result;
    ``paths_of(case)`` gives its :class:`~MedicalSAM3Core.imaging.outputs.OutputPaths`. An error of
    one case is recorded in its row and the next case runs; cancelling (Ctrl-C, SIGTERM) stops the
    batch. ``on_case(index, total, row)`` reports each finished case.
    """
    rows = []
    for index, case in enumerate(cases):
        paths = paths_of(case)
        start = time.monotonic()
        if resume and all(p.exists() for p in paths.all()):
            row = _earlier_row(case, paths.sidecar)
        else:
            try:
                result = segment_case(case)
                row = CaseRow(case.id, "done", labels=[label.to_dict() for label in result.labels])
            except (Cancelled, KeyboardInterrupt):
                raise
            except MedSAM3Error as error:
                row = CaseRow(case.id, "failed", error=str(error))
            except Exception as error:  # noqa: BLE001 - a case that breaks (e.g. out of memory) must not end the batch
                log.exception("case %s failed", case.id)
                row = CaseRow(case.id, "failed", error=f"{type(error).__name__}: {error}")
        row.seconds = round(time.monotonic() - start, 3)
        rows.append(row)
        if on_case is not None:
            on_case(index, len(cases), row)
    return rows


def summary_csv(rows: Sequence[CaseRow]) -> str:
    """``summary.csv``: case, status, seconds, error, then per structure (in order of first
    appearance) its volume in ml and its confidence."""
    names: list[str] = []
    for row in rows:
        for label in row.labels:
            if label.get("name") not in names:
                names.append(label.get("name"))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["case", "status", "seconds", "error"]
                    + [f"{name} {what}" for name in names for what in ("volume_ml", "confidence")])
    for row in rows:
        by_name = {label.get("name"): label for label in row.labels}
        values = []
        for name in names:
            label = by_name.get(name)
            values += [label.get("volume_ml", ""), label.get("confidence", "")] if label else ["", ""]
        writer.writerow([row.case, row.status, f"{row.seconds:.3f}", row.error] + values)
    return buffer.getvalue()


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun job (rank 0 of 1 outside one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> "Ranks":
        try:
            return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                       int(os.environ.get("LOCAL_RANK", "0")))
        except ValueError:
            raise InputError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None

    def device(self, requested: str) -> str:
        """``cuda:LOCAL_RANK`` for ``auto`` on a CUDA machine in a multi-rank job, else ``requested``."""
        if self.world > 1 and requested == "auto":
            import torch

            if torch.cuda.is_available():
                return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return requested

    def start(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo")  # only summary rows travel between the ranks

    def gather(self, rows: list[CaseRow]) -> list[list[CaseRow]]:
        """Every rank's rows (on every rank), in rank order."""
        if self.world == 1:
            return [rows]
        import torch.distributed as dist

        everyone: list = [None] * self.world
        dist.all_gather_object(everyone, rows)
        return everyone

    def finish(self, completed: bool = True) -> None:
        """Leave the process group: after a barrier when this rank completed (so no rank tears down
        while another still exchanges rows), at once when it is failing (a barrier would wait for
        ranks that may never come). Always called: a gloo group left to interpreter shutdown can
        abort the process."""
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                if completed:
                    dist.barrier()
                dist.destroy_process_group()


def merge(cases: Sequence[Case], per_rank: Sequence[Sequence[CaseRow]]) -> list[CaseRow]:
    """The rows of all ranks in the cases' order."""
    by_case = {row.case: row for rows in per_rank for row in rows}
    return [by_case[case.id] for case in cases if case.id in by_case]
