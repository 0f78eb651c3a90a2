import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from cncad import CNCDetector
from cncad.data.cache import FeatureCache, remove_stale_cache_files
from cncad.encoders.base import EncoderFeatures


class Features(NamedTuple):
    class_tokens: list[Tensor] | None
    patch_tokens: list[Tensor]


def fake_encode(images: Tensor) -> Features:
    """Deterministic per-image features of two layers plus class tokens."""
    pooled = images.mean(dim=(2, 3))  # (B, 3)
    patches = images.flatten(2).transpose(1, 2)  # (B, H*W, 3)
    return Features([pooled, 2 * pooled], [patches, patches * 3 + 1])


def image_batches(n: int, batch_size: int, seed: int = 0) -> tuple[Tensor, list[Tensor]]:
    images = torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return images, list(images.split(batch_size))


@pytest.mark.parametrize("memory_limit_gib", [4.0, 0.0])
def test_cache_returns_the_encoder_output_of_the_requested_images(memory_limit_gib, tmp_path):
    images, batches = image_batches(10, 3)
    cache = FeatureCache.build(
        fake_encode,
        batches,
        10,
        dtype=torch.float32,
        memory_limit_gib=memory_limit_gib,
        directory=tmp_path,
        progress=False,
    )
    assert len(cache) == 10
    assert cache.in_memory == (memory_limit_gib > 0)
    assert cache.bytes_per_image == 4 * (3 + 3 + 16 * 3 * 2)
    indices = torch.tensor([7, 2, 9])
    got = cache.get(indices)
    expected = fake_encode(images[indices])
    assert isinstance(got, Features)
    for a, b in zip(
        got.class_tokens + got.patch_tokens,
        expected.class_tokens + expected.patch_tokens,
        strict=True,
    ):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    files = list(tmp_path.iterdir())
    assert len(files) == (0 if cache.in_memory else 4)
    cache.close()
    assert list(tmp_path.iterdir()) == []


def test_float16_storage_halves_the_size_and_rounds_like_float16():
    images, batches = image_batches(5, 2)
    cache = FeatureCache.build(fake_encode, batches, 5, progress=False)
    assert cache.bytes_per_image == 2 * (3 + 3 + 16 * 3 * 2)
    got = cache.get(range(5)).patch_tokens[1]
    expected = fake_encode(images).patch_tokens[1]
    torch.testing.assert_close(got, expected.half().float(), rtol=0, atol=0)
    assert not torch.equal(got, expected)


def test_batches_follow_the_order_and_keep_none_fields():
    def encode(images: Tensor) -> Features:
        return Features(None, [images.flatten(1)])

    images, batches = image_batches(7, 4)
    cache = FeatureCache.build(encode, batches, None, dtype=torch.float32, progress=False)
    order = torch.randperm(7, generator=torch.Generator().manual_seed(1))
    served = list(cache.batches(3, order))
    assert [len(b.patch_tokens[0]) for b in served] == [3, 3, 1]
    assert all(b.class_tokens is None for b in served)
    torch.testing.assert_close(
        torch.cat([b.patch_tokens[0] for b in served]), images.flatten(1)[order]
    )


def test_fewer_images_than_announced_are_trimmed_and_more_are_an_error():
    _, batches = image_batches(5, 2)
    assert len(FeatureCache.build(fake_encode, batches, 9, progress=False)) == 5
    with pytest.raises(ValueError, match="more than the announced 3"):
        FeatureCache.build(fake_encode, batches, 3, progress=False)
    with pytest.raises(ValueError, match="no images"):
        FeatureCache.build(fake_encode, [], 3, progress=False)


def test_overflow_of_float16_is_a_clear_error():
    huge = [torch.full((2, 3, 4, 4), 1e5)]
    with pytest.raises(ValueError, match=r"float32"):
        FeatureCache.build(fake_encode, huge, 2, progress=False)
    cache = FeatureCache.build(fake_encode, huge, 2, dtype=torch.float32, progress=False)
    assert float(cache.get([0]).class_tokens[0].max()) == 1e5


def test_encoder_output_must_be_a_named_tuple_of_tensor_lists():
    with pytest.raises(TypeError, match="NamedTuple"):
        FeatureCache.build(lambda x: [x], [torch.zeros(1, 3, 2, 2)], 1, progress=False)
    with pytest.raises(TypeError, match="'patch_tokens'"):
        FeatureCache.build(
            lambda x: Features(None, x), [torch.zeros(1, 3, 2, 2)], 1, progress=False
        )


def _train(cache: bool, data, **fit_options) -> CNCDetector:
    detector = CNCDetector(
        backbone="tiny", pretrained=None, image_size=56, batch_size=3, theta=1, device="cpu"
    )
    return detector.fit(data, epochs=2, progress=False, cache=cache, **fit_options)


@pytest.fixture(scope="module")
def normal_images() -> TensorDataset:
    images = torch.rand(7, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    normalized = (images - 0.45) / 0.27
    return TensorDataset(normalized, torch.zeros(7, dtype=torch.long))


def test_training_losses_agree_with_and_without_the_cache(normal_images):
    plain = _train(False, normal_images)
    exact = _train(True, normal_images, cache_dtype=torch.float32)
    half = _train(True, normal_images, cache_memory_gib=0.0)  # float16, memory-mapped
    for name in ("total", "distill", "constraint", "moe"):
        reference = np.array([h[name] for h in plain.history])
        np.testing.assert_allclose(
            [h[name] for h in exact.history], reference, rtol=1e-4, atol=1e-6
        )
        np.testing.assert_allclose([h[name] for h in half.history], reference, rtol=2e-2, atol=1e-4)
    assert plain.history[0]["total"] != plain.history[1]["total"]


def test_cache_reads_a_dataloader_once_and_skips_defective_images():
    images = torch.randn(6, 3, 56, 56)
    labels = torch.tensor([0, 1, 0, 1, 0, 0])
    reads = []

    class Counting(TensorDataset):
        def __getitem__(self, index):
            reads.append(index)
            return super().__getitem__(index)

    loader = DataLoader(Counting(images, labels), batch_size=2)
    detector = _train(True, loader)
    assert detector.epochs_trained == 2
    assert len(reads) == 6  # one pass over the loader for two epochs


# ---------------------------------------------------------------- cache files and cleanup
CACHE_FILE = re.compile(r"cncad-features-([A-Za-z0-9_.]+)-([0-9]+)-[0-9a-f]{32}\.f(16|32)")


def cache_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("cncad-features-*"))


@pytest.fixture(scope="module")
def this_host(tmp_path_factory) -> str:
    """The host part of the file names that this process writes."""
    folder = tmp_path_factory.mktemp("host")
    _, batches = image_batches(2, 2)
    cache = FeatureCache.build(
        fake_encode, batches, 2, memory_limit_gib=0, directory=folder, progress=False
    )
    names = [path.name for path in cache_files(folder)]
    cache.close()
    assert len(names) == 4
    matches = [CACHE_FILE.fullmatch(name) for name in names]
    assert all(m is not None and m[2] == str(os.getpid()) and m[3] == "16" for m in matches)
    assert len({m[1] for m in matches}) == 1
    return matches[0][1]


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def failing_encoder(error: BaseException, fail_at: int = 3):
    calls = 0

    def encode(images: Tensor) -> EncoderFeatures:
        nonlocal calls
        calls += 1
        if calls == fail_at:
            raise error
        return EncoderFeatures(None, [torch.randn(len(images), 4, 8)])

    return encode


@pytest.mark.parametrize(
    "error", [RuntimeError("encoder broke"), KeyboardInterrupt()], ids=["exception", "interrupt"]
)
def test_a_failed_build_deletes_the_files_it_created(error, tmp_path):
    batches = [torch.zeros(2, 3, 4, 4)] * 4
    created: list[list[Path]] = []
    encode = failing_encoder(error)

    def watching_encode(images: Tensor) -> EncoderFeatures:
        created.append(cache_files(tmp_path))  # what exists before each call
        return encode(images)

    with pytest.raises(type(error)):
        FeatureCache.build(
            watching_encode, batches, 8, memory_limit_gib=0, directory=tmp_path, progress=False
        )
    assert len(created) == 3
    assert len(created[2]) == 1  # the file cache existed when the encoder failed
    assert cache_files(tmp_path) == []


def test_a_build_without_images_leaves_no_files(tmp_path):
    def empty_encode(images: Tensor) -> EncoderFeatures:
        return EncoderFeatures(None, [torch.zeros(0, 4, 8)])

    with pytest.raises(ValueError, match="no images"):
        FeatureCache.build(
            empty_encode,
            [torch.zeros(0, 3, 4, 4)],
            4,
            memory_limit_gib=0,
            directory=tmp_path,
            progress=False,
        )
    assert cache_files(tmp_path) == []


def test_stale_files_of_dead_processes_of_this_host_are_removed(tmp_path, this_host):
    uid = "0123456789abcdef0123456789abcdef"
    dead = tmp_path / f"cncad-features-{this_host}-{dead_pid()}-{uid}.f16"
    dead_f32 = tmp_path / f"cncad-features-{this_host}-{dead_pid()}-{uid}.f32"
    alive = tmp_path / f"cncad-features-{this_host}-{os.getpid()}-{uid}.f16"
    other_host = tmp_path / f"cncad-features-{this_host}x-{dead_pid()}-{uid}.f16"
    foreign = [
        tmp_path / f"cncad-features-{uid}.f16",  # an older naming scheme
        tmp_path / f"cncad-features-{this_host}-{dead_pid()}-{uid}.f16.bak",
        tmp_path / "notes.txt",
    ]
    for path in [dead, dead_f32, alive, other_host, *foreign]:
        path.write_bytes(b"\0" * 8)

    removed = remove_stale_cache_files(tmp_path)

    assert sorted(removed) == sorted([dead, dead_f32])
    assert sorted(tmp_path.iterdir()) == sorted([alive, other_host, *foreign])
    assert remove_stale_cache_files(tmp_path) == []
    assert remove_stale_cache_files(tmp_path / "missing") == []


def test_build_removes_stale_files_only_when_it_writes_files(tmp_path, this_host):
    stale = tmp_path / f"cncad-features-{this_host}-{dead_pid()}-{'a' * 32}.f16"
    stale.write_bytes(b"\0" * 8)
    _, batches = image_batches(4, 2)

    in_memory = FeatureCache.build(fake_encode, batches, 4, directory=tmp_path, progress=False)
    assert in_memory.in_memory
    assert stale.exists()

    on_disk = FeatureCache.build(
        fake_encode, batches, 4, memory_limit_gib=0, directory=tmp_path, progress=False
    )
    assert not stale.exists()
    assert len(cache_files(tmp_path)) == 4
    on_disk.close()
    assert cache_files(tmp_path) == []


KILLED_BUILD = """
import os, signal, sys
import torch
from cncad.data.cache import FeatureCache
from cncad.encoders.base import EncoderFeatures

def encode(images):
    return EncoderFeatures(None, [torch.randn(len(images), 4, 8)])

cache = FeatureCache.build(
    encode, [torch.zeros(2, 3, 4, 4)] * 2, 4,
    memory_limit_gib=0, directory=sys.argv[1], progress=False,
)
assert not cache.in_memory
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX only")
def test_files_of_a_killed_process_are_removed_by_the_next_build(tmp_path, this_host):
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(KILLED_BUILD), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    leftovers = cache_files(tmp_path)
    assert len(leftovers) == 1
    match = CACHE_FILE.fullmatch(leftovers[0].name)
    assert match is not None
    assert match[1] == this_host
    assert match[2] != str(os.getpid())

    _, batches = image_batches(2, 2)
    cache = FeatureCache.build(
        fake_encode, batches, 2, memory_limit_gib=0, directory=tmp_path, progress=False
    )
    remaining = cache_files(tmp_path)
    assert not leftovers[0].exists()
    assert len(remaining) == 4
    assert all(CACHE_FILE.fullmatch(p.name)[2] == str(os.getpid()) for p in remaining)
    cache.close()
