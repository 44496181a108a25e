"""What a new user meets first: files that follow the umask, the tests' own cache, undefined
ratios printed as such, family mismatches named, the quick benchmark and its guard."""

import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import convert
import files
import synthetic


@contextmanager
def umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def modes_under(root):
    """{path: mode} of root and everything below it."""
    found = {root: mode(root)}
    for folder, names, file_names in os.walk(root):
        for name in names + file_names:
            found[os.path.join(folder, name)] = mode(os.path.join(folder, name))
    return found


@settings(max_examples=30, deadline=None)
@given(mask=st.integers(0, 0o777))
def test_written_files_and_folders_follow_any_umask(tmp_path_factory, mask):
    folder = tmp_path_factory.mktemp("umask")
    with umask(mask):
        assert files.umask() == mask
        files.write_atomically(folder / "out.json", "w", lambda f: f.write("{}"))
        made = files.temporary_folder(folder / "x", prefix=".x.")
    assert (folder / "out.json").read_text() == "{}" and not list(folder.glob("*.tmp"))
    assert mode(folder / "out.json") == 0o666 & ~mask
    assert mode(made) == 0o777 & ~mask


def test_a_failed_write_leaves_nothing(tmp_path):
    def broken(f):
        f.write("half")
        raise RuntimeError("stopped")

    with pytest.raises(RuntimeError):
        files.write_atomically(tmp_path / "out.json", "w", broken)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_converted_folder_follows_the_umask(v1_checkpoint, tmp_path, mask):
    with umask(mask):
        out = convert.convert(str(v1_checkpoint), str(tmp_path / "mlx"))
    found = modes_under(str(out))
    assert len(found) > 3
    for path, got in found.items():
        expected = (0o777 if os.path.isdir(path) else 0o666) & ~mask
        assert got == expected, (path, oct(got), oct(expected))


def test_cached_tokenizer_folder_follows_the_umask():
    with umask(0o027):
        folder = synthetic.cached_tokenizer(vocab_size=700, kind="bpe")
    assert all(got == (0o750 if os.path.isdir(path) else 0o640) for path, got in modes_under(str(folder)).items())


def test_the_tests_keep_their_own_synthetic_cache():
    default = Path(tempfile.gettempdir()) / "t5-speculative-synthetic"
    assert synthetic.CACHE.resolve() != default.resolve()
    assert synthetic.CACHE == Path(os.environ["MLX_T5_SYNTHETIC_CACHE"])
