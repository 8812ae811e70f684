"""Integrity of a study's checkpoints: missing, duplicated and foreign checkpoints (issue #14, item 15).

Published Pythia had all three: missing checkpoints (EleutherAI/pythia issue #202), step 0 equal to
step 1 (issues #83, #198), and seed runs whose checkpoints do not descend from their own step 0
(issue #203). :func:`check_targets` looks for them in the checkpoint folders of :class:`RunTarget`s:

* missing: the steps of the schedule the folder lacks; the schedule is the run's own (its
  ``run_config.json``: ``budget.steps``, ``checkpoint_every_steps``, ``log_spaced_checkpoints``)
  when known, else Pythia's (0, 1, 2, 4, ..., 512, 1000, 2000, ..., 143000) within the run's step range;
* identical: consecutive checkpoints whose weight files hash the same (:func:`checkpoint_digest`);
* not descended: a checkpoint up to :data:`DESCENT_HORIZON` steps that is not closer (L2 over the
  first rows of a few weight matrices) to its run's step 0 than to another seed's step 0;
* unreadable: a checkpoint whose ``config.json`` or safetensors header cannot be read (a truncated
  or half-copied file; :func:`checkpoint_problem`), left out of the other checks.

The findings are :class:`Problem` rows; :func:`report` prints them (rich) and writes ``check.csv``.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from polypythia.errors import PolypythiaError
from polypythia.runfolder import CONFIG_RECORD
from polypythia.train.schedule import checkpoint_steps

PYTHIA_STEPS: tuple[int, ...] = tuple(checkpoint_steps(143000, 1000, True))
DESCENT_HORIZON = 1000  # weights stay near their initialisation this long (Pythia warms up over 1,430 steps)
CHECK_FILE = "check.csv"
# the problems, as the ``problem`` column names them
MISSING = "missing checkpoints"
IDENTICAL = "identical to previous checkpoint"
IDENTICAL_HINT = "identical metrics to previous checkpoint (hint)"
NOT_DESCENDED = "not descended from own step 0"
FOREIGN_FILE = "evaluation file names another model"
UNREADABLE = "unreadable checkpoint"
_FULL_HASH_BYTES = 64 << 20  # hash smaller files whole; larger: header, size and samples (whole on a match)
_SAMPLES, _SAMPLE_BYTES = 256, 64 << 10
_ROWS, _MATRICES = 256, 4  # rows per matrix, matrices per checkpoint in the descent distance


@dataclass
class Problem:
    model: str
    seed: str
    weight_seed: int
    data_seed: int
    problem: str
    steps: str  # comma list
    detail: str


COLUMNS = [f.name for f in fields(Problem)]


def step_list(steps) -> str:
    return ",".join(str(int(s)) for s in steps)


def shown_steps(text: str, limit: int = 10) -> str:
    """A comma list cut to ``limit`` entries for the printed table (the CSV keeps them all)."""
    parts = [p for p in str(text).split(",") if p]
    return text if len(parts) <= limit else ", ".join(parts[:limit]) + f", ... ({len(parts)} in all)"


def expected_steps(present: list[int], schedule: list[int] | None = None) -> list[int]:
    """The steps a run should have: ``schedule`` when known, else :data:`PYTHIA_STEPS`, within the
    range of ``present`` (a run's own schedule is whole: up to its last step)."""
    if not present:
        return []
    if schedule is not None:
        return sorted(set(schedule))
    low, high = min(present), max(present)
    return [s for s in PYTHIA_STEPS if low <= s <= high]


def missing_problem(model, seed, weight_seed, data_seed, present, expected, where: str) -> Problem | None:
    missing = sorted(set(expected) - set(present))
    if not missing:
        return None
    return Problem(
        model,
        seed,
        weight_seed,
        data_seed,
        MISSING,
        step_list(missing),
        f"{len(missing)} of the {len(expected)} steps of {where} are missing",
    )


def identical_runs(pairs: list[tuple[int, object]]) -> list[list[int]]:
    """Groups of consecutive steps (in step order) whose values are equal; ``None`` never matches."""
    groups: list[list[int]] = []
    ordered = sorted(pairs, key=lambda pair: pair[0])
    for (before, previous), (step, value) in zip(ordered[:-1], ordered[1:]):
        if value is None or value != previous:
            continue
        if groups and groups[-1][-1] == before:
            groups[-1].append(step)
        else:
            groups.append([before, step])
    return groups


# ----------------------------------------------------------------------------- weights


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a Hugging Face checkpoint folder (sharded safetensors too, else .bin)."""
    files = sorted(folder.glob("*.safetensors"))
    return files or sorted(folder.glob("pytorch_model*.bin"))


def file_digest(path: Path, whole: bool = False) -> str:
    """SHA-256 of a file; above 64 MiB (unless ``whole``) of its size, first MiB and 256 spread samples."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as handle:
        if whole or size <= _FULL_HASH_BYTES:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
            return digest.hexdigest()
        digest.update(str(size).encode())
        digest.update(handle.read(1 << 20))
        for index in range(_SAMPLES):
            handle.seek(index * (size - _SAMPLE_BYTES) // (_SAMPLES - 1))
            digest.update(handle.read(_SAMPLE_BYTES))
    return "sampled:" + digest.hexdigest()


def checkpoint_digest(folder: str | Path, whole: bool = False) -> str | None:
    """One digest of all weight files of a checkpoint folder; None when it has none."""
    files = weight_files(Path(folder))
    if not files:
        return None
    return hashlib.sha256("".join(f"{f.name}:{file_digest(f, whole)};" for f in files).encode()).hexdigest()


def checkpoint_problem(folder: str | Path, verify_manifest: bool = False) -> str | None:
    """Why a Hugging Face checkpoint folder cannot be read, or None: ``config.json`` that does not
    parse, a safetensors file whose header does not parse or covers more bytes than the file holds
    (a truncated file; safetensors checks this when it opens a file, reading only the header), and
    with ``verify_manifest`` a file that does not match the checkpoint's ``MANIFEST.json`` (a full
    SHA-256 of the weights: what an evaluation that loads them anyway can afford)."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    try:
        json.loads((folder / "config.json").read_text())
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(str(path), framework="pt"):
                pass
        if verify_manifest:
            from polypythia.train.checkpoint import verify_weights

            verify_weights(folder)
    except SafetensorError as exc:
        return f"{path.name}: {exc}"
    except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        return f"config.json: {exc}"
    except PolypythiaError as exc:  # CheckpointError: a file that does not match the manifest
        return str(exc).removeprefix(f"Checkpoint {folder} is corrupt: ").rstrip(".")
    return None


def corrupt_message(folder: str | Path, problem: str) -> str:
    """The one line for a checkpoint that cannot be evaluated: which, why, and the fix."""
    return (
        f"Checkpoint {folder} is corrupt or incomplete ({problem}), so it was skipped; restore it from a copy or "
        "download it again (or delete the folder), then run the command again to evaluate it."
    )


def sample_matrices(folder: str | Path, names: list[str] | None = None) -> dict[str, object]:
    """The first rows of a few 2-D weight matrices (embeddings left out) as float32 tensors."""
    from safetensors import safe_open

    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            keys = handle.keys()
            if names is None:
                chosen = [k for k in sorted(keys) if "embed" not in k and len(handle.get_slice(k).get_shape()) == 2]
                chosen = chosen[:: max(1, len(chosen) // _MATRICES)][:_MATRICES]
            else:
                chosen = [k for k in names if k in keys]
            for key in chosen:
                out[key] = handle.get_slice(key)[:_ROWS].float()
        if names is None and out:
            break
    return out


def distance(a: dict, b: dict) -> float | None:
    """L2 distance over the matrices both samples hold (None when they share none of equal shape)."""
    shared = [k for k in a if k in b and a[k].shape == b[k].shape]
    if not shared:
        return None
    return float(sum(float(((a[k] - b[k]) ** 2).sum()) for k in shared) ** 0.5)


# ----------------------------------------------------------------------------- runs


def run_schedule(checkpoint_path: str | Path) -> list[int] | None:
    """The checkpoint schedule of a run trained here, from ``run_config.json`` beside ``checkpoints/``."""
    parent = Path(checkpoint_path).parent
    record = parent.parent / CONFIG_RECORD
    if parent.name != "checkpoints" or not record.is_file():
        return None
    try:
        budget = json.loads(record.read_text())["budget"]
        return checkpoint_steps(
            int(budget["steps"]),
            int(budget["checkpoint_every_steps"]),
            bool(budget.get("log_spaced_checkpoints", True)),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_targets(targets, horizon: int = DESCENT_HORIZON) -> list[Problem]:
    """Every problem of the checkpoint folders of ``targets`` (RunTargets), run by run."""
    problems: list[Problem] = []
    targets = [readable_part(target, problems) for target in targets]
    zeros = {}  # run name -> (model, sample of its step 0)
    for target in targets:
        zero = next((c for c in target.checkpoints if c.step == 0), None)
        if zero is not None:
            zeros[target.name] = (target.model, sample_matrices(zero.path))
    for target in targets:
        ident = (target.model, target.seed, target.weight_seed, target.data_seed)
        by_step = {c.step: c.path for c in target.checkpoints}
        present = sorted(by_step)
        schedule = run_schedule(target.checkpoints[0].path) if target.checkpoints else None
        where = "the run's schedule (run_config.json)" if schedule else "the Pythia schedule in the run's step range"
        found = missing_problem(*ident, present, expected_steps(present, schedule), where)
        problems += [found] if found else []
        digests = [(step, checkpoint_digest(path)) for step, path in by_step.items()]
        for group in identical_runs(digests):
            whole = {checkpoint_digest(by_step[s], whole=True) for s in group}  # a sampled match, confirmed
            if len(whole) == 1:
                problems.append(
                    Problem(
                        *ident,
                        IDENTICAL,
                        step_list(group),
                        f"the weight files of steps {step_list(group)} are byte-identical",
                    )
                )
        problems += descent_problems(target, ident, zeros, horizon)
    return problems


def readable_part(target, problems: list[Problem]):
    """``target`` without its unreadable checkpoints, which become one problem row of the run."""
    from dataclasses import replace

    unreadable = {c.step: p for c in target.checkpoints if (p := checkpoint_problem(c.path))}
    if not unreadable:
        return target
    detail = "; ".join(f"step {step}: {problem}" for step, problem in sorted(unreadable.items())[:3])
    problems.append(
        Problem(
            target.model,
            target.seed,
            target.weight_seed,
            target.data_seed,
            UNREADABLE,
            step_list(sorted(unreadable)),
            detail + ("; ..." if len(unreadable) > 3 else ""),
        )
    )
    return replace(target, checkpoints=[c for c in target.checkpoints if c.step not in unreadable])


def descent_problems(target, ident, zeros: dict, horizon: int) -> list[Problem]:
    """A checkpoint (the first after 0, and every one up to ``horizon``) nearer another seed's step 0."""
    own = zeros.get(target.name, (None, None))[1]
    others = {
        name: sample
        for name, (model, sample) in zeros.items()
        if name != target.name and sample and model == target.model
    }
    if not own or not others:
        return []
    later = sorted(c for c in ((c.step, c.path) for c in target.checkpoints) if c[0] > 0)
    later = [c for i, c in enumerate(later) if i == 0 or c[0] <= horizon]
    bad, details = [], []
    for step, path in later:
        sample = sample_matrices(path, list(own))
        mine = distance(sample, own)
        theirs = {name: distance(sample, other) for name, other in others.items()}
        theirs = {name: d for name, d in theirs.items() if d is not None}
        if mine is None or not theirs:
            continue
        nearest = min(theirs, key=theirs.get)
        if mine >= theirs[nearest]:
            bad.append(step)
            details.append(
                f"step {step}: {mine:.4g} from its own step 0, {theirs[nearest]:.4g} from {nearest}'s step 0"
            )
    if not bad:
        return []
    detail = "; ".join(details[:3]) + ("; ..." if len(details) > 3 else "")
    return [Problem(*ident, NOT_DESCENDED, step_list(bad), detail)]


# ----------------------------------------------------------------------------- output


def write_csv(problems: list[Problem], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(asdict(p) for p in problems)
    return path


def report(problems: list[Problem], title: str, csv_path: str | Path | None = None, console=None) -> int:
    """Print the problems as a table (or a line saying there are none), write ``csv_path``; 1 if any, else 0."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    if problems:
        table = Table(title=title)
        for column in ("model", "run", "weight seed", "data seed", "problem", "steps", "detail"):
            table.add_column(column, overflow="fold")
        for p in problems:
            table.add_row(
                p.model, p.seed, str(p.weight_seed), str(p.data_seed), p.problem, shown_steps(p.steps), p.detail
            )
        console.print(table)
    else:
        console.print(f"{title}: no problem found.")
    if csv_path is not None:
        console.print(f"Wrote {write_csv(problems, csv_path)}.")
    return 1 if problems else 0
