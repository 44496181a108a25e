"""Files and folders the project writes: built at a temporary path beside the destination
and renamed at the end, with the permissions the umask gives any new file or folder.

tempfile's mkstemp and mkdtemp (and NamedTemporaryFile) create private files (0600) and
folders (0700) whatever the umask, and a rename keeps the mode, so everything written
through them is opened up here to what `open` or `mkdir` would have given.
"""

import json
import os
import tempfile
from pathlib import Path


def umask():
    """The process's umask, e.g. 0o022."""
    try:  # Linux says it without changing it; setting and restoring it races with other threads
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path):
    """Give `path` the mode a new file (0o666) or folder (0o777) gets under the umask."""
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~umask())


def temporary_folder(beside, prefix=None):
    """A new empty folder in `beside`'s folder (a hidden name from `prefix`), with the umask's mode."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=Path(beside).parent))
    follow_umask(folder)
    return folder


def write_atomically(path, mode, write):
    """Call write(file) on a temporary file beside `path` (opened with `mode`, "w" or "wb"),
    then rename it to `path`, with the umask's mode.

    A failed run leaves no half-written file behind.
    """
    folder = Path(path).resolve().parent
    with tempfile.NamedTemporaryFile(mode, dir=folder, delete=False, suffix=".tmp") as f:
        try:
            write(f)
        except BaseException:
            f.close()
            os.unlink(f.name)
            raise
    follow_umask(f.name)
    os.replace(f.name, path)


def json_lines(path, flag, error):
    """(line number, parsed value, or None where the line is not JSON) for each non-blank line of a
    JSON-lines file.

    Read as UTF-8, a byte-order mark allowed (editors write one). A file that cannot be read or
    is not UTF-8 raises `error` (an exception class) with one line naming `flag`, the option
    that gave the file.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except OSError as problem:
        raise error(f"cannot read {flag} {path}: {problem.strerror}") from None
    except UnicodeDecodeError:
        raise error(f"{flag} {path} is not UTF-8 text") from None
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError:
                yield number, None
