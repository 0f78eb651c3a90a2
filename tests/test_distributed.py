"""Training with torchrun: 2 processes on the CPU (gloo) against 1, shards, files, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cncad import CNCDetector
from cncad.data import make_synthetic_dataset
from cncad.data.sampling import epoch_batches, positions_of_rank, shard_indices
from cncad.distributed import ProcessGroup

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)

_ONE_DEFECTIVE = """
import torch
from cncad.data import AnomalyFolder

class OneDefective(torch.utils.data.Dataset):
    \"\"\"The training images with image 1 labelled defective: process 1 of 2 (lane 1 of
    batch 3) then has no image in one batch per epoch and steps on a stand-in.\"\"\"

    def __init__(self, root):
        self.base = AnomalyFolder(root, split="train", image_size=56)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        item = dict(self.base[index])
        item["label"] = int(index == 1)
        return item
"""

_SCRIPT = """
import json, os, sys, torch
from cncad import CNCDetector
from cncad.training import Trainer
from one_defective import OneDefective

data, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
rank = int(os.environ.get("RANK", "0"))
if mode in ("nocache", "defective"):
    data = OneDefective(data)
# batch 3 over 2 processes: unequal parts (2 + 1, and 3 + 1 in the last batch, which
# takes the image left over of 10).
options = dict(backbone="tiny", pretrained=None, image_size=56, batch_size=3, epochs=3,
               theta=1, sigma=1.0, device="cpu", noise_std=0.0, fusion_dropout=0.0)
detector = CNCDetector(**options)
if mode == "interrupt":
    original = Trainer.step
    def crash(self, features, epoch, batch_index=0, **split):
        if epoch == 2:
            raise RuntimeError("simulated crash")
        return original(self, features, epoch, batch_index, **split)
    Trainer.step = crash
if rank == 0:
    torch.save(detector.model.trainable_state_dict(), f"{out}/initial.pt")
# A frozen weight that training never reads (the text embeddings were spliced at init):
# changed on this rank only, it shows whether DDP broadcasts the frozen parts.
frozen = detector.model.prompt_learner.text_tower.token_embedding.weight
with torch.no_grad():
    frozen[0, 0] = 100.0 + rank
detector.fit(data, progress=False, checkpoint_dir=f"{out}/runs", cache=mode != "nocache")
with open(f"{out}/frozen{rank}.json", "w") as handle:
    json.dump(float(frozen[0, 0]), handle)
if detector.trainer.cached_indices is not None:
    with open(f"{out}/shard{rank}.json", "w") as handle:
        json.dump(detector.trainer.cached_indices.tolist(), handle)
detector.save(f"{out}/model.cnc")
images = torch.rand(3, 3, 56, 56, generator=torch.Generator().manual_seed(5))
if rank == 0:
    torch.save(detector.predict(images).anomaly_map, f"{out}/maps.pt")
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(command: list[str], expect_ok: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_env())
    if expect_ok:
        assert done.returncode == 0, done.stderr[-4000:]
    return done


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", "2", *args]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp")
    data = make_synthetic_dataset(
        root / "data", categories=("bolt_like", "carpet_like"), n_train=5, n_test_good=1,
        n_test_defect=1, image_size=56, seed=0,
    )  # fmt: skip
    script = root / "train.py"
    script.write_text(_SCRIPT)
    (root / "one_defective.py").write_text(_ONE_DEFECTIVE)
    folders = {name: root / name for name in ("one", "two", "interrupted", "nocache", "defective")}
    for folder in folders.values():
        folder.mkdir()
    _run([sys.executable, str(script), str(data), str(folders["one"]), "train"])
    _run(_torchrun(str(script), str(data), str(folders["two"]), "train"))
    for mode in ("nocache", "defective"):
        _run(_torchrun(str(script), str(data), str(folders[mode]), mode))
    crashed = _run(
        _torchrun(str(script), str(data), str(folders["interrupted"]), "interrupt"),
        expect_ok=False,
    )
    assert crashed.returncode != 0 and "simulated crash" in crashed.stderr
    resumed = folders["interrupted"] / "resumed.cnc"
    _run(
        _torchrun(
            "-m", "cncad", "fit", str(data), "--out", str(resumed), "--quiet",
            "--resume", str(folders["interrupted"] / "runs" / "last.ckpt"),
            "--checkpoint-dir", str(folders["interrupted"] / "runs"),
        )
    )  # fmt: skip
    return {"data": data, **folders}


def _weights(path: Path) -> torch.Tensor:
    detector = CNCDetector.load(path)
    return torch.cat([p.detach().flatten() for p in detector.model.trainable_parameters()])


def _initial(folder: Path) -> torch.Tensor:
    state = torch.load(folder / "initial.pt", weights_only=True)
    detector = CNCDetector.load(folder / "model.cnc")
    names = [n for n, p in detector.model.named_parameters() if p.requires_grad]
    return torch.cat([state[name].flatten() for name in names])


def test_two_processes_train_the_weights_of_one(runs):
    one, two = _weights(runs["one"] / "model.cnc"), _weights(runs["two"] / "model.cnc")
    start = _initial(runs["one"])
    assert torch.equal(start, _initial(runs["two"]))
    moved = min(float((one - start).norm()), float((two - start).norm()))
    apart = float((one - two).norm())
    assert moved > 0.1
    assert apart <= moved / 50, (apart, moved)
    assert CNCDetector.load(runs["two"] / "model.cnc").epochs_trained == 3


@pytest.mark.parametrize("mode", ["nocache", "defective"])
def test_stand_in_steps_keep_the_weights_of_one_process(runs, mode):
    """Without the cache and with it, process 1 has no normal image in some batches."""
    namespace: dict = {}
    exec(_ONE_DEFECTIVE, namespace)
    options = dict(
        backbone="tiny", pretrained=None, image_size=56, batch_size=3, epochs=3, theta=1,
        sigma=1.0, device="cpu", noise_std=0.0, fusion_dropout=0.0,
    )  # fmt: skip
    data = namespace["OneDefective"](runs["data"])
    one = CNCDetector(**options).fit(data, progress=False, cache=mode == "defective")
    single = torch.cat([p.detach().flatten() for p in one.model.trainable_parameters()])
    two = _weights(runs[mode] / "model.cnc")
    start = _initial(runs[mode])
    moved = min(float((single - start).norm()), float((two - start).norm()))
    assert moved > 0.1
    assert float((single - two).norm()) <= moved / 50
    if mode == "defective":
        shards = [set(json.loads((runs[mode] / f"shard{r}.json").read_text())) for r in (0, 1)]
        assert shards[0] | shards[1] == set(range(10)) - {1}


def test_the_processes_cache_disjoint_shards_that_cover_the_data(runs):
    shards = [set(json.loads((runs["two"] / f"shard{r}.json").read_text())) for r in (0, 1)]
    assert shards[0] and shards[1] and not shards[0] & shards[1]
    assert shards[0] | shards[1] == set(range(10))
    assert set(json.loads((runs["one"] / "shard0.json").read_text())) == set(range(10))


def test_the_file_of_rank_0_predicts_like_the_trained_model(runs):
    maps = torch.load(runs["two"] / "maps.pt", weights_only=True)
    images = torch.rand(3, 3, 56, 56, generator=torch.Generator().manual_seed(5))
    loaded = CNCDetector.load(runs["two"] / "model.cnc")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the torchrun processes: the same reductions
    try:
        assert torch.equal(loaded.predict(images).anomaly_map, maps)
    finally:
        torch.set_num_threads(threads)
    assert not list(runs["two"].glob("*.tmp")) and not list(runs["two"].glob(".*.tmp"))


def test_an_interrupted_run_resumes_from_its_checkpoint_under_torchrun(runs):
    checkpoint = CNCDetector.load(runs["interrupted"] / "runs" / "last.ckpt")
    assert checkpoint.epochs_trained == 3  # rewritten by the resumed run
    resumed = _weights(runs["interrupted"] / "resumed.cnc")
    assert torch.equal(resumed, _weights(runs["two"] / "model.cnc"))


def test_global_batches_do_not_depend_on_the_process_count():
    n, size = 23, 8
    for epoch in range(3):
        batches = epoch_batches(n, size, seed=4, epoch=epoch)
        assert [len(b) for b in batches] == [8, 15]  # the 7 left over join the last batch
        assert sorted(torch.cat(batches).tolist()) == list(range(n))
        for world in (1, 2, 3, 8):
            for batch in batches:
                parts = [batch[positions_of_rank(len(batch), size, world, r)] for r in range(world)]
                assert all(len(part) for part in parts)  # every process has a part
                assert sorted(torch.cat(parts).tolist()) == sorted(batch.tolist())
                for r, part in enumerate(parts):
                    assert set(part.tolist()) <= set(shard_indices(n, size, world, r).tolist())
    assert [len(b) for b in epoch_batches(3, 8, seed=0, epoch=0)] == [3]
    assert epoch_batches(0, 8, seed=0, epoch=0) == []
    with pytest.raises(ValueError, match="at least the number of processes"):
        positions_of_rank(4, 4, 5, 0)


def test_one_process_group_is_the_identity():
    group = ProcessGroup()
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    assert group.sum_with_local_gradient(x) is x
    assert torch.equal(group.sum(x), x) and not group.sum(x).requires_grad
    assert group.is_main and not group.is_distributed


def test_the_frozen_encoder_is_not_synchronised(runs):
    values = [json.loads((runs["two"] / f"frozen{r}.json").read_text()) for r in (0, 1)]
    assert values == [100.0, 101.0]
