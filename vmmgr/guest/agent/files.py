"""Files: paths, entries, listings, atomic writes, reads, directories, removal.

Every function here blocks (the dispatcher runs them in a thread) and raises
:class:`~.errors.AgentError` with the protocol's code.
"""

from __future__ import annotations

import contextlib
import grp
import os
import posixpath
import pwd
import secrets
import shutil
import stat

from .. import protocol as P
from .errors import AgentError, os_error

READ_SIZE = 256 * 1024
MAX_PATH = 4096


def check_path(path: str) -> str:
    """Validate and normalize an absolute path."""
    if not isinstance(path, str) or not path:
        raise AgentError("invalid_path", "path is empty")
    if "\0" in path:
        raise AgentError("invalid_path", "path contains a NUL byte")
    if len(path) > MAX_PATH:
        raise AgentError("invalid_path", f"path longer than {MAX_PATH} characters")
    if not path.startswith("/"):
        raise AgentError("invalid_path", f"path must be absolute: {path!r}")
    norm = posixpath.normpath(path)
    if norm.startswith("//"):
        norm = "/" + norm.lstrip("/")
    return norm


# ------------------------------------------------------------------ file entries

_names: dict[tuple[str, int], str] = {}


def _owner(uid: int) -> str:
    key = ("u", uid)
    if key not in _names:
        try:
            _names[key] = pwd.getpwuid(uid).pw_name
        except KeyError:
            _names[key] = str(uid)
    return _names[key]


def _group(gid: int) -> str:
    key = ("g", gid)
    if key not in _names:
        try:
            _names[key] = grp.getgrgid(gid).gr_name
        except KeyError:
            _names[key] = str(gid)
    return _names[key]


def file_entry(path: str, st: os.stat_result | None = None) -> P.FileEntry:
    if st is None:
        st = os.lstat(path)
    target = None
    if stat.S_ISLNK(st.st_mode):
        kind = "symlink"
        with contextlib.suppress(OSError):
            target = os.readlink(path)
    elif stat.S_ISDIR(st.st_mode):
        kind = "directory"
    else:
        kind = "file"
    return P.FileEntry(
        name=posixpath.basename(path) or "/",
        path=path,
        type=kind,
        size=st.st_size,
        mode=stat.S_IMODE(st.st_mode),
        permissions=stat.filemode(st.st_mode),
        owner=_owner(st.st_uid),
        group=_group(st.st_gid),
        modified_at=int(st.st_mtime),
        symlink_target=target,
    )



def lstat_or_error(path: str) -> os.stat_result:
    try:
        return os.lstat(path)
    except OSError as exc:
        raise os_error(exc, path) from None


def list_dir(path: str, depth: int, max_entries: int) -> tuple[list[P.FileEntry], bool]:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise os_error(exc, path) from None
    if not stat.S_ISDIR(st.st_mode):
        raise AgentError("not_a_directory", f"{path}: not a directory")
    depth = max(1, depth)
    entries: list[P.FileEntry] = []

    def walk(directory: str, level: int) -> bool:
        try:
            with os.scandir(directory) as it:
                children = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            if directory == path:
                raise os_error(exc, path) from None
            return True  # unreadable subdirectory: list what we can
        for child in children:
            if len(entries) >= max_entries:
                return False
            try:
                entry = file_entry(child.path, child.stat(follow_symlinks=False))
            except OSError:
                continue
            entries.append(entry)
            if entry.type == "directory" and level < depth and not walk(child.path, level + 1):
                return False
        return True

    complete = walk(path, 1)
    return entries, not complete


def _makedirs(path: str, mode: int = 0o777, owner: tuple[int, int] | None = None) -> None:
    """``os.makedirs(path, mode, exist_ok=True)``; the directories it creates get ``owner``."""
    if os.path.isdir(path):
        return
    missing = []
    probe = path
    while probe not in ("", "/") and not os.path.lexists(probe):
        missing.append(probe)
        probe = posixpath.dirname(probe)
    os.makedirs(path, mode, exist_ok=True)
    if owner is not None:
        for directory in missing:
            with contextlib.suppress(OSError):
                os.chown(directory, *owner)


def _resolve_target(path: str, parents: bool, owner: tuple[int, int] | None = None) -> str:
    """The file a write replaces: follows a symlink, creates parents, refuses directories."""
    real = os.path.realpath(path) if os.path.islink(path) else path
    if os.path.isdir(real):
        raise AgentError("is_a_directory", f"{path}: is a directory")
    parent = posixpath.dirname(real)
    if parents:
        try:
            _makedirs(parent, owner=owner)
        except FileExistsError:
            raise AgentError("not_a_directory", f"{parent}: not a directory") from None
        except OSError as exc:
            raise os_error(exc, parent) from None
    elif not os.path.isdir(parent):
        if os.path.exists(parent):
            raise AgentError("not_a_directory", f"{parent}: not a directory")
        raise AgentError("not_found", f"{parent}: no such directory")
    return real


class AtomicWriter:
    """Writes a temp file next to the target and renames it over the target at the end.

    A replaced file keeps its mode and owner; a new one gets ``owner`` (the
    default user's, when the agent runs as root) and mode 0644.
    """

    def __init__(self, path: str, mode: int | None, parents: bool,
                 owner: tuple[int, int] | None = None) -> None:
        self.path = path
        self.target = _resolve_target(path, parents, owner)
        try:
            st = os.stat(self.target)
        except OSError:
            st = None
        if mode is None:
            mode = stat.S_IMODE(st.st_mode) if st is not None else 0o644
        self.mode = mode
        self.owner = (st.st_uid, st.st_gid) if st is not None and os.geteuid() == 0 else owner
        directory, name = posixpath.split(self.target)
        self.tmp = posixpath.join(directory, f".{name}.{secrets.token_hex(4)}.dovecote-tmp")
        try:
            self.fd: int | None = os.open(
                self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            raise os_error(exc, path) from None
        self.size = 0

    def write(self, data: bytes) -> None:
        assert self.fd is not None
        view = memoryview(data)
        try:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
        except OSError as exc:
            raise os_error(exc, self.path) from None
        self.size += len(data)

    def commit(self) -> P.FileEntry:
        assert self.fd is not None
        try:
            if self.owner is not None:
                os.fchown(self.fd, *self.owner)
            os.fchmod(self.fd, self.mode)
            os.close(self.fd)
            self.fd = None
            os.replace(self.tmp, self.target)
        except OSError as exc:
            self.abort()
            raise os_error(exc, self.path) from None
        return file_entry(self.path if self.target == self.path else self.target)

    def abort(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


def write_file(path: str, data: bytes, mode: int | None, parents: bool,
               owner: tuple[int, int] | None = None) -> P.FileEntry:
    writer = AtomicWriter(path, mode, parents, owner)
    try:
        writer.write(data)
    except BaseException:
        writer.abort()
        raise
    return writer.commit()


def open_for_read(path: str) -> tuple[int, os.stat_result]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except IsADirectoryError:
        raise AgentError("is_a_directory", f"{path}: is a directory") from None
    except OSError as exc:
        raise os_error(exc, path) from None
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        os.close(fd)
        raise AgentError("is_a_directory", f"{path}: is a directory")
    return fd, st


def read_small(path: str) -> P.FileData:
    fd, st = open_for_read(path)
    try:
        if st.st_size > P.MAX_INLINE_FILE:
            raise AgentError(
                "too_large", f"{path}: {st.st_size} bytes; use ReadFileStream above {P.MAX_INLINE_FILE}"
            )
        parts = []
        total = 0
        while True:
            data = os.read(fd, READ_SIZE)
            if not data:
                break
            total += len(data)
            if total > P.MAX_INLINE_FILE:
                raise AgentError("too_large", f"{path}: grew past {P.MAX_INLINE_FILE} bytes")
            parts.append(data)
    finally:
        os.close(fd)
    return P.FileData(id=0, data=b"".join(parts), entry=file_entry(path))


def make_dir(path: str, parents: bool, mode: int, owner: tuple[int, int] | None = None) -> P.FileEntry:
    if os.path.lexists(path):
        if os.path.isdir(path):
            raise AgentError("already_exists", f"{path}: a directory already exists")
        raise AgentError("already_exists", f"{path}: a file already exists")
    try:
        if parents:
            _makedirs(path, mode, owner)
        else:
            os.mkdir(path, mode)
            if owner is not None:
                os.chown(path, *owner)
    except FileExistsError:
        raise AgentError("not_a_directory", f"{path}: a parent is not a directory") from None
    except OSError as exc:
        raise os_error(exc, path) from None
    return file_entry(path)


def remove_path(path: str) -> None:
    if path == "/":
        raise AgentError("invalid_path", "refusing to remove /")
    st = lstat_or_error(path)
    try:
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except OSError as exc:
        raise os_error(exc, path) from None
