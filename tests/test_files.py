"""Atomic writes and up-front output checks (``cncad.files``)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cncad.data import make_synthetic_dataset
from cncad.files import (
    atomic_write,
    check_output_dir,
    check_output_file,
    save_image_atomic,
    write_text_atomic,
)
from cncad.visualize import render_panel, save_panel

OLD = b"old content\x00\xff, kept byte for byte\n"


def _temp_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp"))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_027() -> Iterator[int]:
    previous = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(previous)


# -------------------------------------------------------------------------------- atomic_write


def test_atomic_write_replaces_the_content(tmp_path: Path) -> None:
    target = tmp_path / "data.bin"
    target.write_bytes(OLD)

    with atomic_write(target) as handle:
        handle.write(b"new")
        # Until the block ends, the old file is what readers see.
        assert target.read_bytes() == OLD

    assert target.read_bytes() == b"new"
    assert _temp_files(tmp_path) == []


def test_atomic_write_text_mode_and_missing_folders(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "notes.txt"
    with atomic_write(target, "w", encoding="utf-8", newline="") as handle:
        handle.write("é\r\n")
    assert target.read_bytes() == "é\r\n".encode()
    assert write_text_atomic(target, "second") == target
    assert target.read_text(encoding="utf-8") == "second"


def test_atomic_write_refuses_append_and_read_modes(tmp_path: Path) -> None:
    target = tmp_path / "log.txt"
    target.write_bytes(OLD)
    for mode in ("a", "ab", "r+", "rb"):
        with pytest.raises(ValueError, match="whole files"), atomic_write(target, mode):
            pass
    assert target.read_bytes() == OLD
    assert _temp_files(tmp_path) == []


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(
    tmp_path: Path, error: BaseException
) -> None:
    target = tmp_path / "results.json"
    target.write_bytes(OLD)

    with pytest.raises(type(error)), atomic_write(target) as handle:
        handle.write(b'{"half": ')
        raise error

    assert target.read_bytes() == OLD
    assert _temp_files(tmp_path) == []
    assert sorted(tmp_path.iterdir()) == [target]


def test_a_failed_first_write_creates_no_file(tmp_path: Path) -> None:
    target = tmp_path / "new.csv"
    with pytest.raises(OSError, match="disk full"), atomic_write(target, "w") as handle:
        handle.write("path,score\n")
        raise OSError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_writing_over_a_folder_fails_and_cleans_up(tmp_path: Path) -> None:
    folder = tmp_path / "results"
    (folder / "inside").mkdir(parents=True)
    with pytest.raises(OSError), atomic_write(folder) as handle:
        handle.write(b"x")
    assert (folder / "inside").is_dir()
    assert _temp_files(tmp_path) == []


def test_a_new_file_gets_the_umask_permissions(tmp_path: Path, umask_027: int) -> None:
    target = tmp_path / "new.txt"
    write_text_atomic(target, "hello")
    assert _mode(target) == 0o666 & ~umask_027

    reference = tmp_path / "reference.txt"
    reference.write_text("plain open")
    assert _mode(target) == _mode(reference)


def test_a_new_file_follows_a_changed_umask(tmp_path: Path) -> None:
    previous = os.umask(0o077)
    try:
        write_text_atomic(tmp_path / "private.txt", "a")
        os.umask(0o002)
        write_text_atomic(tmp_path / "shared.txt", "b")
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "private.txt") == 0o600
    assert _mode(tmp_path / "shared.txt") == 0o664


def test_a_replaced_file_keeps_its_mode(tmp_path: Path, umask_027: int) -> None:
    target = tmp_path / "script.sh"
    target.write_bytes(OLD)
    target.chmod(0o751)

    write_text_atomic(target, "#!/bin/sh\n")

    assert _mode(target) == 0o751
    assert target.read_text() == "#!/bin/sh\n"


# -------------------------------------------------------------------------------- images


def test_save_image_atomic_writes_a_png_that_reads_back(tmp_path: Path) -> None:
    pixels = np.arange(8 * 6 * 3, dtype=np.uint8).reshape(8, 6, 3)
    target = tmp_path / "sub" / "picture.PNG"

    assert save_image_atomic(Image.fromarray(pixels), target) == target

    with Image.open(target) as picture:
        assert picture.format == "PNG"
        np.testing.assert_array_equal(np.asarray(picture), pixels)
    assert _temp_files(target.parent) == []


def test_save_image_atomic_refuses_an_unknown_extension(tmp_path: Path) -> None:
    target = tmp_path / "picture.heatmap"
    target.write_bytes(OLD)
    with pytest.raises(ValueError, match="image format"):
        save_image_atomic(Image.new("RGB", (4, 4)), target)
    assert target.read_bytes() == OLD
    assert sorted(tmp_path.iterdir()) == [target]


def test_save_image_atomic_keeps_the_old_image_when_encoding_fails(tmp_path: Path) -> None:
    target = tmp_path / "picture.jpg"
    target.write_bytes(OLD)
    # JPEG cannot store an alpha channel: Pillow raises after the file was opened.
    with pytest.raises(OSError):
        save_image_atomic(Image.new("RGBA", (4, 4)), target)
    assert target.read_bytes() == OLD
    assert _temp_files(tmp_path) == []


# -------------------------------------------------------------------------------- check_output_file


def test_check_output_file_accepts_a_new_file_in_a_new_folder(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    target = tmp_path / "reports" / "eval.json"
    assert check_output_file(target, inputs=[data]) == target.resolve()
    assert not (tmp_path / "reports").exists()


def test_check_output_file_refuses_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"--json must be a file name.*is a folder"):
        check_output_file(tmp_path, what="--json")


def test_check_output_file_refuses_an_input_file(tmp_path: Path) -> None:
    model = tmp_path / "model.cnc"
    model.write_bytes(OLD)
    with pytest.raises(ValueError, match="is also an input"):
        check_output_file(model, inputs=[tmp_path / "data", model])


def test_check_output_file_refuses_a_path_inside_an_input_folder(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "test").mkdir(parents=True)
    with pytest.raises(ValueError, match="inside the input folder"):
        check_output_file(data / "test" / "eval.json", inputs=[data])
    # Spelled with '..', the same path is still recognised.
    with pytest.raises(ValueError, match="inside the input folder"):
        check_output_file(data / "test" / ".." / "eval.json", inputs=[data])


def test_check_output_file_refuses_a_parent_that_is_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "notes.txt"
    blocker.write_bytes(OLD)
    with pytest.raises(ValueError, match="is a file"):
        check_output_file(blocker / "sub" / "eval.json")
    assert blocker.read_bytes() == OLD


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can write in any folder"
)
def test_check_output_file_refuses_an_unwritable_folder(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="cannot write"):
            check_output_file(locked / "new" / "eval.json")
    finally:
        locked.chmod(0o700)


# -------------------------------------------------------------------------------- check_output_dir


def test_check_output_dir_accepts_a_new_or_unrelated_folder(tmp_path: Path) -> None:
    image = tmp_path / "parts" / "a.png"
    image.parent.mkdir()
    image.write_bytes(OLD)
    for target in (tmp_path / "results", tmp_path / "deep" / "results"):
        assert check_output_dir(target, inputs=[image]) == target.resolve()
        assert not target.exists()


def test_check_output_dir_refuses_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "results"
    target.write_bytes(OLD)
    with pytest.raises(ValueError, match="--out must be a folder"):
        check_output_dir(target, what="--out")


def test_check_output_dir_refuses_a_folder_containing_an_input(tmp_path: Path) -> None:
    image = tmp_path / "parts" / "a.png"
    image.parent.mkdir()
    image.write_bytes(OLD)
    for target in (image.parent, tmp_path):
        with pytest.raises(ValueError, match="contains the input"):
            check_output_dir(target, inputs=[image])


def test_check_output_dir_refuses_an_input_folder_and_its_subfolders(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(ValueError, match="is also an input"):
        check_output_dir(data, inputs=[data])
    with pytest.raises(ValueError, match="inside the input folder"):
        check_output_dir(data / "predictions", inputs=[data])


def test_check_output_dir_relative_paths_are_resolved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "part.png").write_bytes(OLD)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="contains the input"):
        check_output_dir(".", inputs=["part.png"])


def test_check_output_dir_refuses_a_path_under_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "notes.txt"
    blocker.write_bytes(OLD)
    with pytest.raises(ValueError, match="is a file"):
        check_output_dir(blocker / "results")


# -------------------------------------------------------------------------------- writers


def test_save_panel_replaces_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = np.full((8, 8, 3), 100, np.uint8)
    amap = np.linspace(0.0, 1.0, 64).reshape(8, 8)
    target = tmp_path / "panels" / "part.png"

    assert save_panel(target, image, amap, mask=amap > 0.5) == target
    with Image.open(target) as picture:
        assert picture.size[::-1] == render_panel(image, amap, amap > 0.5).shape[:2]
    first = target.read_bytes()

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        save_panel(target, image, 1.0 - amap, title="score 0.9")
    assert target.read_bytes() == first
    assert sorted(target.parent.iterdir()) == [target]


def test_make_synthetic_dataset_leaves_no_temporary_files(tmp_path: Path) -> None:
    root = make_synthetic_dataset(
        tmp_path, categories=("sand_like",), n_train=2, n_test_good=1, n_test_defect=2
    )
    written = sorted(root.rglob("*.png"))
    assert len(written) == 2 + 1 + 2 + 2  # train, test/good, defects, their masks
    assert not list(root.rglob(".*.tmp"))
    for path in written:
        with Image.open(path) as picture:
            assert picture.format == "PNG" and picture.size == (64, 64)
