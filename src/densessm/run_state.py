"""A training run's bookkeeping in its ``--output_dir``: one writer at a time, checkpoints that are complete or
ignored, the arguments the run was started with, and a final model that is whole or absent.

- **Lock.** A run holds ``.densessm-train.lock`` (``filelock``: an OS lock, released when the process dies, also
  by SIGKILL) for its lifetime; who holds it (pid, host, start time, command) is written next to it, so a second
  run on the same directory fails at once and names the holder.
- **Completeness marker.** ``checkpoint-N/checkpoint_complete.json`` is written after every other file of the
  checkpoint (on every process) is on disk and synced; it lists each file with its size. A checkpoint without
  it, with a listed file missing or of another size (truncated), without one of the files a resume needs
  (weights, optimizer, scheduler, RNG state of every process, trainer state), or whose trainer state does not
  read back with its folder's step (damaged at its saved size) is incomplete: resuming skips it and says why.
  Which complete checkpoint is the last *good* one (weights all finite) is read from its weights when asked.
- **Arguments.** ``run_arguments.json`` holds the resolved arguments (also copied into each checkpoint); a
  resume compares them and refuses differences that change the result (see :data:`HARMLESS_ARGUMENTS`).
- **Final model.** The model is saved into ``.final-model.partial`` inside the output directory, then its
  files are renamed into place with ``config.json`` last, after the old ``config.json`` was removed: a crash
  leaves the old model, or a directory without ``config.json`` (not loadable; rerun to finish), never a
  ``config.json`` beside half of the weights.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shlex
import shutil
import socket
import sys
import zipfile
from collections.abc import Iterable
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError, safe_open
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from densessm.errors import UsageError
from densessm.files import atomic_write_text, check_path, read_json

LOCK_NAME = ".densessm-train.lock"
HOLDER_NAME = ".densessm-train.lock.json"
ARGUMENTS_NAME = "run_arguments.json"
MARKER_NAME = "checkpoint_complete.json"
STAGING_NAME = ".final-model.partial"
BOOKKEEPING = frozenset({LOCK_NAME, HOLDER_NAME, ARGUMENTS_NAME, STAGING_NAME})
"""What a run writes into ``--output_dir`` before any result: a directory holding only these holds no work."""

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_ENGINE_WEIGHTS = ("pytorch_model_fsdp", "global_step")  # FSDP's own files; a DeepSpeed checkpoint's folder
_MARKER_FORMAT = 1


# ---- one writer per run ---------------------------------------------------------------------------------------


class RunLockedError(OSError):
    """Another training run holds the output directory."""


def _describe_holder(holder_file: Path) -> str:
    try:
        info = read_json(holder_file)
        return f"pid {info['pid']} on {info['host']}, started {info['started']}, command: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its pid and command are not recorded yet"


def live_run_holding(path: str | os.PathLike) -> str | None:
    """Who holds ``path`` or a folder above it (a training run or an experiment grid that is running), or None.
    A writer told to overwrite asks first: ``convert --overwrite`` into a live run's folder once deleted its lock
    and checkpoints, and a second run was then let in beside the first."""
    for folder in (Path(path), *Path(path).parents):
        lock_file = folder / LOCK_NAME
        if lock_file.is_symlink() or not lock_file.is_file():
            continue
        lock = FileLock(str(lock_file), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            if _held_by_this_run(folder / HOLDER_NAME):  # the run writing its own files (in a grid it holds)
                return None
            return f"{folder} is in use by a running densessm command ({_describe_holder(folder / HOLDER_NAME)})"
        except OSError:
            continue
        lock.release()
    return None


def _held_by_this_run(holder_file: Path) -> bool:
    """Whether the holder is this process: the run writing its own files (only the process that holds the lock
    writes the run's files)."""
    try:
        info = read_json(holder_file)
        return info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    except (OSError, ValueError, KeyError, TypeError):
        return False


class RunLock:
    """The lock on a run's output directory; :meth:`acquire` fails at once (no waiting) if another run holds it.
    ``what`` and ``flag`` name the holder and the option in the refusal (a training run's ``--output_dir``, an
    experiment grid's ``--output-dir``)."""

    def __init__(self, output_dir: str | os.PathLike, what: str = "training run", flag: str = "--output_dir"):
        self.output_dir = Path(output_dir)
        self.what, self.flag = what, flag
        self._lock: FileLock | None = None

    def acquire(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / LOCK_NAME
        if path.is_symlink() or path.is_dir():  # filelock would fail on either, naming nothing
            kind = "a symlink" if path.is_symlink() else "a directory"
            raise UsageError(f"{path} is {kind} where the run's lock file belongs; remove it, then run again")
        lock = FileLock(str(path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            holder = _describe_holder(self.output_dir / HOLDER_NAME)
            raise RunLockedError(
                f"{self.output_dir} is in use by another {self.what} ({holder}); nothing was changed. Wait for it "
                f"to finish, or choose another {self.flag}"
            ) from None
        self._lock = lock
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": shlex.join(sys.argv),
        }
        # a killed holder's record goes first: the writer would otherwise take it for another live run's file
        (self.output_dir / HOLDER_NAME).unlink(missing_ok=True)
        atomic_write_text(self.output_dir / HOLDER_NAME, json.dumps(holder, indent=1) + "\n", overwrite=True)

    def release(self) -> None:
        """Give the directory back (a no-op unless held); the OS does the same if the process dies."""
        if self._lock is None:
            return
        with contextlib.suppress(OSError):
            (self.output_dir / HOLDER_NAME).unlink()
        self._lock.release()
        self._lock = None


# ---- checkpoints: complete or ignored --------------------------------------------------------------------------


def checkpoint_step(path: Path) -> int | None:
    """N for a folder named ``checkpoint-N``, else None."""
    prefix = f"{PREFIX_CHECKPOINT_DIR}-"
    if path.name.startswith(prefix) and path.name[len(prefix) :].isdigit():
        return int(path.name[len(prefix) :])
    return None


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-N`` folders of ``output_dir``, newest (highest N) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step, reverse=True)


def foreign_checkpoint_folders(output_dir: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-N`` folders of ``output_dir`` that hold files but none that the Trainer writes (no
    weights, optimizer, scheduler, RNG state, trainer state or marker): a user's folder of that name, which a run
    must never delete or write into. In a run's own folder (its ``run_arguments.json``) the model's settings files,
    which a save writes first, count as the Trainer's too: a run killed right after them left a save cut short,
    which was taken for a user's folder and blocked the resume."""
    found = []
    first_written = ("config.json", "generation_config.json")
    run = (Path(output_dir) / ARGUMENTS_NAME).is_file()
    for path in list_checkpoints(output_dir):
        if path.is_symlink():  # only the link is ever removed
            continue
        names = [p.name for p in path.iterdir()]
        ours = (MARKER_NAME, TRAINER_STATE_NAME, OPTIMIZER_NAME, SCHEDULER_NAME, *WEIGHT_FILES)
        ours += first_written if run else ()
        if names and not any(n in ours or n.startswith(("rng_state", *_ENGINE_WEIGHTS)) for n in names):
            found.append(path)
    return found


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_marker(checkpoint: str | os.PathLike, world_size: int) -> Path:
    """Mark ``checkpoint`` complete: every file in it (synced to disk first) with its size, written atomically."""
    root = Path(checkpoint)
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != MARKER_NAME:
            _fsync(path)
            files[path.relative_to(root).as_posix()] = path.stat().st_size
    marker = {"format": _MARKER_FORMAT, "step": checkpoint_step(root), "world_size": world_size, "files": files}
    return atomic_write_text(root / MARKER_NAME, json.dumps(marker, indent=1) + "\n", overwrite=True)


def discard_checkpoint(checkpoint: str | os.PathLike) -> None:
    """Remove a checkpoint folder, its marker first: a removal cut short leaves an incomplete checkpoint. A
    ``checkpoint-N`` that is a symlink loses the link only: what it points to (another run's checkpoint) is not
    this run's to delete, nor to write into."""
    root = Path(checkpoint)
    if root.is_symlink():
        root.unlink()
        return
    (root / MARKER_NAME).unlink(missing_ok=True)
    shutil.rmtree(root, ignore_errors=True)


def _missing_parts(files: set[str], world_size: int) -> list[str]:
    """The parts a resume needs that ``files`` (relative names) lacks."""
    deepspeed = any(f.startswith("global_step") for f in files)
    missing = []
    if TRAINER_STATE_NAME not in files:
        missing.append(TRAINER_STATE_NAME)
    if not any(name in files for name in WEIGHT_FILES) and not any(f.startswith(_ENGINE_WEIGHTS) for f in files):
        missing.append("the model weights (model.safetensors)")
    # optimizer.pt; FSDP writes optimizer.bin or an optimizer_0/ folder, DeepSpeed *_optim_states.pt
    if not any(f.split("/")[0].startswith("optimizer") or f.endswith("optim_states.pt") for f in files):
        missing.append(f"{OPTIMIZER_NAME} (saved with --save_only_model? such a checkpoint holds only weights)")
    if SCHEDULER_NAME not in files and not deepspeed:
        missing.append(SCHEDULER_NAME)
    rng = ["rng_state.pth"] if world_size <= 1 else [f"rng_state_{i}.pth" for i in range(world_size)]
    missing += [name for name in rng if name not in files]
    return missing


def rotate_checkpoints(run_dir: str | os.PathLike, limit: int | None, current: Path, best: str | None) -> None:
    """Keep at most ``limit`` checkpoints: always ``current`` (just marked complete) and ``best``, then the most
    recently completed others; folders without a marker (cut short, unusable) go first.

    transformers' own rotation orders by folder mtime and falls back to step numbers when the checkpoints are
    less than a second apart; after a resume that left a cut-short folder of a later step, that kept the
    useless folder and deleted the checkpoint just written."""
    if not limit:
        return
    keep = {current.resolve()} | ({Path(best).resolve()} if best else set())
    others = [p for p in list_checkpoints(run_dir) if p.resolve() not in keep]

    def completed(path: Path) -> tuple[int, int]:
        marker = path / MARKER_NAME
        return (marker.stat().st_mtime_ns if marker.is_file() else -1, checkpoint_step(path))

    others.sort(key=completed, reverse=True)
    room = max(0, limit - len([p for p in keep if p.is_dir()]))
    for path in others[room:]:
        discard_checkpoint(path)


def _trainer_state_step(checkpoint: Path) -> tuple[int | None, str | None]:
    """The step in a checkpoint's trainer state, or None and why it cannot be read (a file of the size it was
    saved with can still be damaged, and the Trainer would fail on it with a ``KeyError`` or ``TypeError``)."""
    try:
        state = read_json(checkpoint / TRAINER_STATE_NAME)
    except (OSError, ValueError) as err:
        return None, f"{TRAINER_STATE_NAME} is damaged: {err}"
    if not isinstance(state, dict):
        return None, f"{TRAINER_STATE_NAME} is damaged: it holds no JSON object"
    step = state.get("global_step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return None, f"{TRAINER_STATE_NAME} is damaged: its global_step is {json.dumps(step)}, not a step number"
    try:
        TrainerState(**state)  # what the Trainer will do with it
    except (TypeError, ValueError) as err:
        return None, f"{TRAINER_STATE_NAME} is damaged: {err}"
    return step, None


def checkpoint_problems(checkpoint: str | os.PathLike) -> list[str]:
    """Why ``checkpoint`` cannot be resumed from (empty if it is complete)."""
    root = Path(checkpoint)
    if not root.is_dir():
        return [f"{root} is not a directory"]
    try:
        marker = read_json(root / MARKER_NAME)
        files, world_size = dict(marker["files"]), int(marker["world_size"])
    except FileNotFoundError:
        return [f"it has no {MARKER_NAME} (its save was cut short, or it was not written by densessm train)"]
    except (OSError, ValueError, KeyError, TypeError):
        return [f"its {MARKER_NAME} is damaged"]
    problems = []
    for name, size in files.items():
        path = root / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{name} is truncated or changed ({path.stat().st_size} bytes, {size} when saved)")
        elif path.suffix in (".pt", ".pth", ".bin") and not zipfile.is_zipfile(path):
            # torch.save writes a zip archive, whose directory at the end is cheap to find; a file of the right
            # size without one (overwritten in place, zeroed) failed in torch.load after the resume began
            problems.append(f"{name} is damaged (not the archive torch.save writes)")
    problems += [f"{part} is missing" for part in _missing_parts(set(files), world_size)]
    if not problems:
        step, damage = _trainer_state_step(root)
        if damage is not None:
            problems.append(damage)
        elif checkpoint_step(root) not in (None, step):
            problems.append(f"{TRAINER_STATE_NAME} is damaged: it gives step {step} in {root.name}")
    return problems


def newest_complete_checkpoint(output_dir: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, list[str]]]]:
    """The newest complete checkpoint in ``output_dir`` (or None), and the newer ones skipped with their problems."""
    skipped = []
    for path in list_checkpoints(output_dir):
        problems = checkpoint_problems(path)
        if not problems:
            return path, skipped
        skipped.append((path, problems))
    return None, skipped


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest complete ``checkpoint-N`` in ``output_dir`` as a string, or None."""
    path, _ = newest_complete_checkpoint(output_dir)
    return None if path is None else str(path)


def checkpoint_global_step(checkpoint: str | os.PathLike) -> int:
    """The optimizer step a complete checkpoint was saved at (from its trainer state)."""
    step, damage = _trainer_state_step(Path(checkpoint))
    if damage is not None:
        raise ValueError(f"{checkpoint}: {damage}")
    return step


def _weight_files(checkpoint: Path) -> list[Path]:
    """The files holding a checkpoint's weights in the transformers formats (none for an engine's format)."""
    for single, index in ((WEIGHT_FILES[0], WEIGHT_FILES[1]), (WEIGHT_FILES[2], WEIGHT_FILES[3])):
        if (checkpoint / single).is_file():
            return [checkpoint / single]
        if (checkpoint / index).is_file():
            try:
                shards = set(read_json(checkpoint / index)["weight_map"].values())
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise ValueError(f"{checkpoint / index} is not a valid weight index ({err!r})") from None
            return [checkpoint / Path(str(name)).name for name in sorted(shards, key=str)]
    return []


def nonfinite_weight(checkpoint: str | os.PathLike) -> str | None:
    """The first tensor of a checkpoint's saved weights that holds NaN or inf, or None (all finite, or saved in an
    engine's format, which is not read here). Reads one tensor at a time; raises ``ValueError``/``OSError`` for
    weights that cannot be read."""
    for file in _weight_files(Path(checkpoint)):
        if file.suffix == ".safetensors":
            try:
                with safe_open(file, framework="pt") as weights:
                    for name in weights.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                        tensor = weights.get_tensor(name)
                        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                            return name
            except SafetensorError as err:
                raise ValueError(f"{file} cannot be read ({err})") from None
        else:
            for name, tensor in torch.load(file, map_location="cpu", weights_only=True, mmap=True).items():
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    return name
    return None


def last_good_checkpoint(output_dir: str | os.PathLike, below_step: int | None = None) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint in ``output_dir`` (below ``below_step``, if given) whose weights are finite,
    and a note for each newer complete one passed over because its weights are not (or cannot be read)."""
    notes = []
    for path in list_checkpoints(output_dir):
        if (below_step is not None and checkpoint_step(path) >= below_step) or checkpoint_problems(path):
            continue
        try:
            name = nonfinite_weight(path)
        except (OSError, ValueError, RuntimeError) as err:
            notes.append(f"{path.name}'s weights cannot be read ({err})")
            continue
        if name is None:
            return path, notes
        notes.append(f"{path.name} holds NaN or inf values in {name}")
    return None, notes


# ---- the run's arguments ---------------------------------------------------------------------------------------

HARMLESS_ARGUMENTS = frozenset(
    {
        # where the run is and how it reports
        "output_dir",
        "overwrite_output_dir",
        "resume_from_checkpoint",
        "allow_changed_args",
        "logging_dir",
        "logging_strategy",
        "logging_steps",
        "logging_first_step",
        "logging_nan_inf_filter",
        "log_level",
        "log_level_replica",
        "log_on_each_node",
        "report_to",
        "run_name",
        "project",
        "disable_tqdm",
        "include_num_input_tokens_seen",
        "skip_memory_metrics",
        "debug",
        "trackio_space_id",
        "trackio_bucket_id",
        "trackio_static_space_id",
        # when and where it saves
        "save_strategy",
        "save_steps",
        "save_total_limit",
        "save_on_each_node",
        "save_only_model",
        "push_to_hub",
        "hub_model_id",
        "hub_strategy",
        "hub_token",
        "hub_private_repo",
        "hub_always_push",
        "hub_revision",
        # evaluation (it scores the weights; it does not change them)
        "eval_strategy",
        "evaluation_strategy",
        "eval_steps",
        "eval_delay",
        "eval_on_start",
        "eval_accumulation_steps",
        "eval_do_concat_batches",
        "eval_use_gather_object",
        "per_device_eval_batch_size",
        "prediction_loss_only",
        "include_for_metrics",
        "batch_eval_metrics",
        "bf16_full_eval",
        "fp16_full_eval",
        "do_train",
        "do_eval",
        "do_predict",
        # the sample printed at the end
        "sample_prompt",
        "sample_max_new_tokens",
        # how the blocks are built and fed, not which blocks in which order
        "data_cache_dir",
        "preprocessing_num_workers",
        "overwrite_cache",
        "dataloader_num_workers",
        "dataloader_pin_memory",
        "dataloader_persistent_workers",
        "dataloader_prefetch_factor",
        "dataloader_multiprocessing_context",
        # process-group plumbing
        "local_rank",
        "ddp_timeout",
        "ddp_backend",
        "ddp_find_unused_parameters",
        "torch_empty_cache_steps",
    }
)
"""Arguments that may differ on resume (with a note). Every other one changes the result and is refused unless
``--allow_changed_args``: a new argument counts as result-changing until it is listed here."""


def normalized(arguments: dict) -> dict:
    """``arguments`` as they read back from JSON (tuples become lists, objects their ``str``)."""
    return json.loads(json.dumps(arguments, default=str, sort_keys=True))


def write_arguments(directory: str | os.PathLike, arguments: dict) -> Path:
    return atomic_write_text(
        Path(directory) / ARGUMENTS_NAME, json.dumps(normalized(arguments), indent=1, sort_keys=True) + "\n", True
    )


def read_arguments(directory: str | os.PathLike, strict: bool = False) -> dict | None:
    """The arguments stored in ``directory``, or None if it has none. A file that is there but unreadable is
    None too, unless ``strict``: then a ValueError naming it (a resume must not take it for a run without them)."""
    path = Path(directory) / ARGUMENTS_NAME
    if not path.exists():
        return None
    try:
        stored = read_json(path)
    except (OSError, ValueError) as err:
        if strict:
            raise ValueError(f"{path} is unreadable ({type(err).__name__}: {err})") from None
        return None
    if not isinstance(stored, dict):
        if strict:
            raise ValueError(f"{path} holds a JSON {type(stored).__name__}, not the run's arguments")
        return None
    return stored


_MISSING = object()


def _shown(value) -> str:
    return "(not recorded)" if value is _MISSING else json.dumps(value, sort_keys=True)


def _rows(name: str, old, new) -> list[tuple[str, str, str]]:
    """The table rows of one differing argument: one per differing entry when both values are objects (such as
    the corpus files), so each row says what changed instead of two long values cut short alike."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [(name, _shown(old), _shown(new))]

    def entry(value) -> str:
        return "(none)" if value is _MISSING else _shown(value)

    return [
        (f"{name}[{key}]", entry(old.get(key, _MISSING)), entry(new.get(key, _MISSING)))
        for key in sorted(set(old) | set(new))
        if old.get(key, _MISSING) != new.get(key, _MISSING)
    ]


def compare_arguments(stored: dict, current: dict) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """The differences ``(name, stored, now)`` that change the result, and the harmless ones."""
    current = normalized(current)
    changed, harmless = [], []
    # The flags first, then what they resolve to (the model's configuration, the corpus files).
    for name in sorted(set(stored) | set(current), key=lambda n: (n.startswith("config."), n)):
        old, new = stored.get(name, _MISSING), current.get(name, _MISSING)
        if old == new:
            continue
        # An argument one side did not record (another densessm version) cannot be compared: noted only.
        is_harmless = name in HARMLESS_ARGUMENTS or old is _MISSING or new is _MISSING
        (harmless if is_harmless else changed).extend(_rows(name, old, new))
    return changed, harmless


def list_names(names: Iterable[str], shown: int = 8) -> str:
    """``a, b, c`` with at most ``shown`` names, then "and N more"."""
    names = list(names)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def format_table(rows: Iterable[tuple[str, str, str]], limit: int = 60, max_rows: int = 40) -> str:
    """``rows`` as aligned lines ``name  stored -> now``, each value cut to ``limit`` characters, at most
    ``max_rows`` lines."""

    def cut(text: str) -> str:
        return text if len(text) <= limit else text[: limit - 3] + "..."

    rows = [(name, cut(old), cut(new)) for name, old, new in rows]
    shown = rows[:max_rows]
    width = max(len(name) for name, _, _ in shown)
    old_width = max(len(old) for _, old, _ in shown)
    lines = [f"  {name:<{width}}  {old:<{old_width}} -> {new}" for name, old, new in shown]
    if len(rows) > max_rows:
        lines.append(f"  ... and {len(rows) - max_rows} more")
    return "\n".join(lines)


# ---- the final model: whole or absent --------------------------------------------------------------------------


def _is_weight_file(name: str) -> bool:
    return name.startswith(("model", "pytorch_model")) and name.endswith((".safetensors", ".bin", ".index.json"))


def publish_model(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the files of a model saved in ``staging`` into ``target``, ``config.json`` last (see the module doc).

    The old ``config.json`` goes first, so from then until the new one arrives the directory is not a loadable
    model; weight files of the old model that the new one lacks (other shards) are removed before the move.
    """
    staging, target = Path(staging), Path(target)
    names = sorted(p.name for p in staging.iterdir())
    (target / "config.json").unlink(missing_ok=True)
    for stale in target.iterdir():
        if stale.is_file() and _is_weight_file(stale.name) and stale.name not in names:
            stale.unlink()
    for name in sorted(names, key=lambda n: n == "config.json"):
        destination = target / name
        if destination.is_dir() and not destination.is_symlink():
            shutil.rmtree(destination)
        os.replace(staging / name, destination)
    staging.rmdir()
    with contextlib.suppress(OSError):
        _fsync(target)


def fresh_staging_dir(target: str | os.PathLike) -> Path:
    """An empty :data:`STAGING_NAME` folder in ``target`` (a leftover of a crashed save is removed first)."""
    staging = Path(target) / STAGING_NAME
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def holds_work(output_dir: str | os.PathLike) -> bool:
    """Whether ``output_dir`` holds anything besides a run's bookkeeping (which a refused start may leave)."""
    root = Path(output_dir)
    return root.is_dir() and any(p.name not in BOOKKEEPING for p in root.iterdir())


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """``output_dir`` as a path; refused at once if it is empty (it would mean the current directory), exists and
    is not a directory, or lies under a file."""
    if not str(output_dir):
        raise UsageError("--output_dir is empty: name the directory of the run (it is created)")
    path = check_path(output_dir, "--output_dir")
    if path.exists() and not path.is_dir():
        raise UsageError(f"--output_dir {path} is a file, not a directory: choose a directory (it is created)")
    return path


__all__ = [
    "ARGUMENTS_NAME",
    "HARMLESS_ARGUMENTS",
    "LOCK_NAME",
    "MARKER_NAME",
    "STAGING_NAME",
    "RunLock",
    "RunLockedError",
    "check_output_dir",
    "checkpoint_global_step",
    "checkpoint_problems",
    "compare_arguments",
    "discard_checkpoint",
    "foreign_checkpoint_folders",
    "format_table",
    "fresh_staging_dir",
    "holds_work",
    "live_run_holding",
    "last_complete_checkpoint",
    "last_good_checkpoint",
    "list_names",
    "list_checkpoints",
    "newest_complete_checkpoint",
    "nonfinite_weight",
    "publish_model",
    "read_arguments",
    "rotate_checkpoints",
    "write_arguments",
    "write_marker",
]
