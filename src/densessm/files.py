"""Writing and reading files so that nothing is lost and nothing leaks.

Every writer in densessm goes through here, so one set of rules holds everywhere:

- **no overwrite unasked**: a destination that already holds something is refused unless the caller
  passes ``overwrite=True`` (which the command lines expose as ``--overwrite``);
- **atomic**: a file or a whole directory is written under a temporary sibling name and renamed into
  place, so a crash leaves either the old content or the new one, never half of either;
- **confinement**: a reader given a directory reads only regular files inside it (paths resolved, so
  neither ``../`` nor a symlink leads out).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from densessm.errors import UsageError


class DestinationExistsError(FileExistsError):
    """The destination holds data and the caller did not ask to replace it."""


class DestinationInUseError(DestinationExistsError):
    """The destination belongs to a command that is still running: replacing it would break that command."""


class OutsideDirectoryError(PermissionError):
    """A path named by a file inside a directory points outside that directory (or is not a regular file)."""


def _is_nonempty(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def _broken_link(path: Path) -> str | None:
    """Why ``path`` is a symlink that leads nowhere (a loop, or a missing target), else None: writing through
    it would fail late with a raw "File exists" or "Symlink loop" that does not name the cause."""
    if not path.is_symlink():
        return None
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "is a symlink loop"
        if err.errno in (errno.ENOENT, errno.ENOTDIR):
            return f"is a symlink to a missing target ({os.readlink(path)})"
        raise
    return None


class RepeatedKeyError(ValueError):
    """A JSON object gives one key twice: Python's parser keeps the last value without a word, where another
    reader of the same text may keep the first."""

    def __init__(self, key: str):
        super().__init__(f"the key {key!r} appears twice in one object")
        self.key = key


def unique_object(pairs: list[tuple[str, object]]) -> dict:
    """``object_pairs_hook`` for ``json.loads`` that refuses a repeated key (:class:`RepeatedKeyError`)."""
    value = dict(pairs)
    if len(value) != len(pairs):
        keys = [key for key, _ in pairs]
        raise RepeatedKeyError(next(key for i, key in enumerate(keys) if key in keys[:i]))
    return value


def loads_json(text: str) -> object:
    """``json.loads``, with nesting deeper than Python's parser follows (its ``RecursionError``) and a key given
    twice in one object reported as the JSON errors they are: a crafted line would otherwise end a command with
    an internal error, and a repeated key would silently keep its last value."""
    try:
        return json.loads(text, object_pairs_hook=unique_object)
    except RecursionError:
        raise json.JSONDecodeError("nesting deeper than Python's JSON parser can follow", text, 0) from None
    except RepeatedKeyError as err:
        raise json.JSONDecodeError(str(err), text, 0) from None


def read_json(path: str | os.PathLike) -> object:
    """The JSON value in the UTF-8 file ``path``. Whatever makes it unreadable as such is a ``ValueError``:
    invalid UTF-8 or JSON, a key given twice in one object, and also nesting deeper than Python's parser
    follows (a ``RecursionError`` from the parser: a crafted file would otherwise end a command with an
    internal error). A device or pipe is an ``OSError`` before anything is read (``/dev/zero`` never ends)."""
    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():
        raise OSError(f"{path} is not a regular file (a device or a pipe): there is no JSON file to read")
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text, object_pairs_hook=unique_object)
    except RecursionError:
        raise ValueError("its JSON nests deeper than Python's parser can follow") from None
    except RepeatedKeyError as err:
        raise ValueError(f"its JSON gives {err}") from None


def name_max(directory: Path) -> int:
    """The longest file name (in bytes) the file system of ``directory`` (or of its nearest existing parent)
    allows; 255, the common limit, where it cannot be asked."""
    for place in (directory, *directory.parents):
        with contextlib.suppress(OSError, ValueError):  # a name too long to ask about: try its parent
            if place.is_dir():
                return os.pathconf(place, "PC_NAME_MAX")
    return 255


def check_path(path: str | os.PathLike, what: str = "destination") -> Path:
    """``path`` as a ``Path``, refused if it is empty (which would mean the current directory) or cannot be
    created because one of its parents is a file or a symlink that leads nowhere, one of its names is longer
    than the file system allows, or its nearest existing parent refuses new files (a read-only mount,
    ``/proc``): found when the result is written, the work before it would be lost. (``path`` itself may be
    such a symlink: a writer told to overwrite replaces the link; see :func:`check_link`.)"""
    if not str(path):
        raise UsageError(f"{what} is an empty path: name a file or directory")
    path = Path(path)
    longest = name_max(path.parent)
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > longest:
            raise UsageError(
                f"{what} {path} cannot be created: its name {part[:24]}... is {size} bytes long, and this file "
                f"system allows at most {longest}; name a shorter path"
            )
    for parent in path.parents:
        broken = _broken_link(parent)
        if broken is not None:
            raise UsageError(f"{what} {path} cannot be created: {parent} {broken}; name another path")
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{what} {path} cannot be created: {parent} is a file, not a directory")
            _check_accepts_files(parent, path, what)
            break
    return path


def _check_accepts_files(directory: Path, path: Path, what: str) -> None:
    """Create and remove a file in ``directory``, the way the writers' temporary siblings are made: permission
    bits do not tell a read-only mount (nor what root may not do)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".densessm-write-check-", dir=directory)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise UsageError(
            f"{what} {path} cannot be written: {directory} does not accept new files ({reason}); name another path"
        ) from None
    os.close(fd)
    os.unlink(probe)


def check_flag(value: object, name: str) -> bool:
    """``value`` if it is True or False, else a ``TypeError`` naming it: a switch that guards data must not
    take ``"no"`` or ``"false"`` (truthy strings) for yes."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_link(path: str | os.PathLike, what: str = "destination", overwrite: bool = False) -> None:
    """Refuse ``path`` if it is a symlink loop or a symlink to a missing target, unless ``overwrite`` (the
    write then replaces the link itself): found late, it would fail as a raw "File exists" or "Symlink loop",
    or as if another process had filled it."""
    check_flag(overwrite, "overwrite")
    broken = _broken_link(Path(path))
    if broken is not None and not overwrite:
        raise UsageError(f"{what} {path} {broken}; name another path")


def check_not_in_use(path: Path, what: str) -> None:
    """Refuse to replace ``path`` while a running training run or experiment grid holds it (or a folder above
    it): ``--overwrite`` asks to replace finished work, never work in progress."""
    from densessm.run_state import live_run_holding  # the run's lock lives there, and that module uses this one

    holder = live_run_holding(path)
    if holder is not None:
        raise DestinationInUseError(f"{what} {path} cannot be replaced: {holder}; nothing was written")


def check_destination(path: str | os.PathLike, overwrite: bool, what: str = "destination", flag: str = "--overwrite"):
    """Refuse ``path`` if it holds data (unless ``overwrite``) or is a file where a directory is wanted."""
    path = check_path(path, what)
    check_link(path, what, overwrite)  # also checks that overwrite is True or False
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} {path} is a file, not a directory")
    if _is_nonempty(path) and not overwrite:
        raise DestinationExistsError(
            f"{what} {path} already holds files; nothing was written. Choose another, or pass {flag} to replace it"
        )
    if overwrite and path.exists():
        check_not_in_use(path, what)
        here, target = Path.cwd().resolve(), path.resolve()
        if target == here or target in here.parents:  # replaced by a rename, which the working directory blocks
            raise UsageError(
                f"{what} {path} is the working directory or holds it: it cannot be replaced from inside; "
                "run from elsewhere or name another path"
            )


def check_separate(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Refuse a destination equal to, inside, or containing its source: writing it would destroy what is read."""
    check_path(dst)  # a symlink loop would make resolve() raise a raw RuntimeError
    if _broken_link(Path(dst)) is not None:  # nothing to compare: the destination leads nowhere
        return
    src_r, dst_r = Path(src).resolve(), Path(dst).resolve()
    if src_r == dst_r:
        raise UsageError(f"the destination {dst} is the source itself: choose another directory")
    if src_r in dst_r.parents:
        raise UsageError(f"the destination {dst} lies inside the source {src}: choose a directory outside it")
    if dst_r in src_r.parents:
        raise UsageError(f"the destination {dst} contains the source {src}: choose a directory that does not")


_HOST = socket.gethostname()


def _temp_prefix(path: Path) -> str:
    """The start of the temporary siblings' names of ``path``: its name, this machine; a long name is cut and
    a digest of it added, so that the sibling's name stays within the file system's limit whenever the
    name itself does."""
    name = path.name
    room = name_max(path.parent) - len(os.fsencode(f"..tmp-{_HOST}-")) - 32  # a pid, a dash, tempfile's 8
    if len(os.fsencode(name)) > room:
        digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:12]
        name = f"{os.fsencode(name)[: max(room - 13, 0)].decode(errors='ignore')}~{digest}"
    return f".{name}.tmp-{_HOST}-"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _clear_leftovers(path: Path) -> None:
    """Remove the temporary siblings of ``path`` that a writer on this machine left when it was killed (its
    process is gone); a live writer's are kept."""
    prefix = _temp_prefix(path)
    for sibling in path.parent.glob(f"{glob.escape(prefix)}*"):
        pid = sibling.name[len(prefix) :].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            _remove(sibling)
        except PermissionError:
            continue  # alive, another user's


def _temp_sibling(path: Path, kind: str) -> Path:
    """A new temporary file or directory beside ``path``, named after it, this machine and this process (so a
    later writer can tell a dead writer's leftovers from a live one's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(path)
    prefix = f"{_temp_prefix(path)}{os.getpid()}-"
    if kind == "dir":
        made = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=path.parent)
        os.close(fd)
        made = Path(name)
    # tempfile makes them private (0700, 0600); what is moved into place gets the modes a plain write would
    os.chmod(made, (0o777 if kind == "dir" else 0o666) & ~_umask())
    return made


def _umask() -> int:
    """The process's umask, read without changing it (``os.umask`` can only be read by setting it, which
    would race with other threads creating files)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened for syncing
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _exists_error(path: Path) -> DestinationExistsError:
    return DestinationExistsError(f"{path} already exists; nothing was written (pass --overwrite to replace it)")


def _place_file(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``path``: replacing it only with ``overwrite``; without, a link that fails
    if ``path`` appeared meanwhile (another writer), so a check and the move cannot be raced."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise _exists_error(path) from None
    except OSError as err:  # a file system without hard links: check, then rename (a narrow race remains)
        if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if path.exists():
            raise _exists_error(path) from None
        os.rename(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _checked_file_destination(path: str | os.PathLike, overwrite: bool) -> Path:
    """``path`` as a file the atomic writers may write: not a directory, not existing unless ``overwrite``, and
    not a file of a command that is still running."""
    path = check_path(path, "output file")
    check_link(path, "output file", overwrite)
    if path.is_dir():
        raise UsageError(f"{path} is a directory, not a file")
    if path.exists():
        if not overwrite:
            raise _exists_error(path)
        check_not_in_use(path, "output file")
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling and a rename; refuse an existing file unless
    ``overwrite``."""
    path = _checked_file_destination(path, overwrite)
    tmp = _temp_sibling(path, "file")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _place_file(tmp, path, overwrite)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, overwrite: bool = False) -> Path:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__} (atomic_write_bytes writes bytes)")
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


@contextlib.contextmanager
def atomic_output_file(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """A temporary path to write ``path``'s content to (by a library that wants a file name); moved into place
    when the block ends without an error, removed otherwise."""
    path = _checked_file_destination(path, overwrite)
    tmp = _temp_sibling(path, "file")
    try:
        yield tmp
        _place_file(tmp, path, overwrite)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False, what: str = "destination") -> Iterator[Path]:
    """A fresh temporary directory beside ``path`` to write into; when the block ends without an error it
    becomes ``path``, else it is removed and ``path`` is untouched.

    Without ``overwrite`` the final rename itself refuses a ``path`` that another writer filled meanwhile (a
    rename onto a non-empty directory fails), so the check before the work cannot be raced. With it, the old
    content is moved aside first and removed only after the new one is in place."""
    path = Path(path)
    check_destination(path, overwrite, what)
    tmp = _temp_sibling(path, "dir")
    try:
        yield tmp
        if overwrite and (path.exists() or path.is_symlink()):
            old = _temp_sibling(path, "dir")
            os.rmdir(old)
            os.replace(path, old)  # rename, not delete: the old content survives until the new one is in place
            os.replace(tmp, path)
            _remove(old)
        else:
            try:
                os.rename(tmp, path)
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                    raise
                raise DestinationExistsError(
                    f"{what} {path} was filled by another process while this one worked; nothing was written "
                    "(run again with another destination, or --overwrite)"
                ) from None
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            _remove(tmp)


def confined_file(root: str | os.PathLike, name: str) -> Path:
    """``root / name`` as a regular file that truly lies inside ``root`` (after resolving ``..`` and symlinks).

    Raises :class:`OutsideDirectoryError` naming ``name`` otherwise, and FileNotFoundError if it is absent."""
    root_r = Path(root).resolve()
    candidate = Path(root) / name
    if Path(name).is_absolute():
        raise OutsideDirectoryError(
            f"{name!r} (named in {root}) is an absolute path: refused, only files inside {root} are read"
        )
    try:
        resolved = candidate.resolve()
    except (RuntimeError, OSError):  # a symlink loop: Python raises RuntimeError or OSError (ELOOP)
        raise OutsideDirectoryError(f"{candidate} is a symlink loop: refused") from None
    if resolved == root_r:  # "", ".", "sub/..": the directory itself
        raise OutsideDirectoryError(f"{name!r} (in {root}) names the directory itself, not a file in it: refused")
    if root_r not in resolved.parents:
        raise OutsideDirectoryError(f"{name!r} (in {root}) leads outside it, to {resolved}: refused")
    if not resolved.exists():
        raise FileNotFoundError(f"{candidate} does not exist")
    if not resolved.is_file():
        raise OutsideDirectoryError(f"{candidate} is not a regular file: refused")
    return resolved


__all__ = [
    "DestinationExistsError",
    "DestinationInUseError",
    "check_path",
    "OutsideDirectoryError",
    "atomic_output_dir",
    "atomic_output_file",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_destination",
    "check_flag",
    "check_link",
    "check_separate",
    "confined_file",
]
