"""ImageDataModule: splits, and every DataLoader setting honoured."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import RandomSampler, SequentialSampler, WeightedRandomSampler

from project.data import ImageDataModule, generate_shapes
from project.data.sources import stratified_split
from project.tools.predict import PredictDataModule
from tests.conftest import write_image


def make_dm(root, **kw) -> ImageDataModule:
    kw.setdefault("num_workers", 0)
    kw.setdefault("image_size", 32)
    dm = ImageDataModule(data_dir=root, **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def labels_of(loader) -> list[int]:
    return [int(y) for _, y in loader for y in y]


def test_batches_are_uint8_from_workers_and_normalized_float_after_transfer(tiny_shapes):
    dm = make_dm(tiny_shapes, batch_size=16)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.uint8
    x, y = dm.on_after_batch_transfer((images, labels), 0)
    assert x.dtype == torch.float32 and torch.equal(y, labels)
    assert x.min() > -2.2 and x.max() < 2.7  # ImageNet-normalized [0, 1] range


def test_drop_last_drops_only_in_training(tiny_shapes):
    # one module with drop_last=True: its train loader drops the ragged batch, val and test keep every sample
    dm = make_dm(tiny_shapes, batch_size=48, drop_last=True)  # 320 train, 80 val, 80 test images
    dm.setup("test")
    train, val, test = dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()
    assert train.drop_last is True
    assert val.drop_last is False and test.drop_last is False
    assert len(train) == 320 // 48 and len(labels_of(train)) == (320 // 48) * 48
    assert len(val) == 2 and len(labels_of(val)) == len(dm.val_set) == 80  # 48 + 32: the short batch stays
    assert len(test) == 2 and len(labels_of(test)) == len(dm.test_set) == 80
    keep = make_dm(tiny_shapes, batch_size=48, drop_last=False).train_dataloader()
    assert keep.drop_last is False and len(keep) == 7 and len(labels_of(keep)) == 320


def test_shuffle_shuffles(tiny_shapes):
    torch.manual_seed(0)
    shuffled = labels_of(make_dm(tiny_shapes, shuffle=True).train_dataloader())
    ordered = labels_of(make_dm(tiny_shapes, shuffle=False).train_dataloader())
    assert ordered == sorted(ordered)  # folder order is class order
    assert shuffled != ordered and sorted(shuffled) == ordered


def test_workers_deliver_the_same_samples(tiny_shapes):
    single = make_dm(tiny_shapes, shuffle=False, num_workers=0)
    multi = make_dm(tiny_shapes, shuffle=False, num_workers=2, persistent_workers=False)
    batches0 = list(single.val_dataloader())
    batches2 = list(multi.val_dataloader())
    assert len(batches0) == len(batches2)
    for (x0, y0), (x2, y2) in zip(batches0, batches2, strict=True):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)


def test_balanced_sampler_balances(tmp_path):
    for i in range(60):
        write_image(tmp_path / "train" / "common" / f"{i}.png", size=(8, 8), seed=i)
    for i in range(6):
        write_image(tmp_path / "train" / "rare" / f"{i}.png", size=(8, 8), seed=100 + i)
    write_image(tmp_path / "val" / "common" / "v.png", size=(8, 8))
    write_image(tmp_path / "val" / "rare" / "v.png", size=(8, 8))
    plain = Counter(labels_of(make_dm(tmp_path, image_size=8, sampler="random").train_dataloader()))
    assert plain == {0: 60, 1: 6}
    draws = Counter()
    for seed in range(5):
        loader = make_dm(tmp_path, image_size=8, sampler="balanced", seed=seed).train_dataloader()
        draws.update(labels_of(loader))
    share_rare = draws[1] / sum(draws.values())
    assert 0.4 < share_rare < 0.6  # 330 draws at p = 0.5; unbalanced it would be 0.09


def test_custom_collate_fn_is_used(tiny_shapes):
    calls = []

    def collate(samples):
        calls.append(len(samples))
        return torch.utils.data.default_collate(samples)

    dm = make_dm(tiny_shapes, batch_size=8, collate_fn=collate)
    next(iter(dm.train_dataloader()))
    next(iter(dm.val_dataloader()))
    assert calls == [8, 8]


@pytest.mark.parametrize(
    ("persistent_workers", "prefetch_factor", "pin_memory", "timeout"), [(False, 5, True, 7.0), (True, 3, False, 0.0)]
)
def test_worker_and_memory_settings_reach_every_loader(
    tiny_shapes, persistent_workers, prefetch_factor, pin_memory, timeout
):
    dm = make_dm(
        tiny_shapes,
        num_workers=2,
        persistent_workers=persistent_workers,
        prefetch_factor=prefetch_factor,
        pin_memory=pin_memory,
        loader_timeout=timeout,
    )
    dm.setup("test")
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        assert loader.num_workers == 2
        assert loader.persistent_workers is persistent_workers
        assert loader.prefetch_factor == prefetch_factor
        assert loader.pin_memory is pin_memory
        assert loader.timeout == timeout


def test_pin_memory_defaults_to_off_without_an_accelerator(tiny_shapes):
    dm = make_dm(tiny_shapes)
    assert dm.train_dataloader().pin_memory is False and dm.val_dataloader().pin_memory is False


def test_balanced_sampler_is_used_for_training_only(tiny_shapes):
    dm = make_dm(tiny_shapes, sampler="balanced", num_workers=2, persistent_workers=False)
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert isinstance(train.sampler, WeightedRandomSampler)
    assert train.sampler.replacement and train.sampler.num_samples == len(dm.train_set)
    assert isinstance(val.sampler, SequentialSampler)
    plain = make_dm(tiny_shapes, sampler="random")
    assert isinstance(plain.train_dataloader().sampler, RandomSampler)
    assert isinstance(plain.val_dataloader().sampler, SequentialSampler)
    ordered = make_dm(tiny_shapes, sampler="random", shuffle=False)
    assert isinstance(ordered.train_dataloader().sampler, SequentialSampler)


def test_missing_val_is_split_off_train_stratified_and_seeded(tiny_shapes, tmp_path):
    only_train = tmp_path / "only_train"
    only_train.mkdir()
    (only_train / "train").symlink_to(tiny_shapes / "train")
    dm = make_dm(only_train, val_fraction=0.25, seed=3)
    assert not dm.has_test
    train_paths = {p for p, _ in dm.train_set.samples}
    val_paths = {p for p, _ in dm.val_set.samples}
    assert not train_paths & val_paths and len(train_paths | val_paths) == 320
    assert Counter(dm.val_set.targets.tolist()) == {c: 10 for c in range(8)}  # 25% of 40 per class
    again = make_dm(only_train, val_fraction=0.25, seed=3)
    assert {p for p, _ in again.val_set.samples} == val_paths
    other = make_dm(only_train, val_fraction=0.25, seed=4)
    assert {p for p, _ in other.val_set.samples} != val_paths


def test_plain_folder_of_classes_is_training_data(tiny_shapes):
    dm = make_dm(tiny_shapes / "train")
    assert dm.classes == sorted(dm.classes) and len(dm.classes) == 8
    assert len(dm.train_set) + len(dm.val_set) == 320


def test_stratified_split_keeps_one_per_class():
    targets = np.array([0] * 9 + [1] * 2 + [2])
    train, val = stratified_split(targets, 0.1, seed=0)
    assert sorted(targets[val].tolist()) == [0, 1]  # class 2 has one sample: it stays in train
    assert len(train) + len(val) == 12


def test_val_with_other_classes_is_rejected(tiny_shapes, tmp_path):
    (tmp_path / "train").symlink_to(tiny_shapes / "train")
    write_image(tmp_path / "val" / "circle" / "1.png")
    with pytest.raises(ValueError, match="missing"):
        make_dm(tmp_path)


def test_test_and_predict_loaders(tiny_shapes):
    dm = PredictDataModule([tiny_shapes / "test" / "star"], data_dir=tiny_shapes, image_size=32, num_workers=0)
    dm.setup("test")
    dm.setup("predict")
    assert len(dm.test_set) == 80 and dm.test_set.classes == dm.classes
    images, index = next(iter(dm.predict_dataloader()))
    assert images.dtype == torch.uint8 and index.tolist() == list(range(len(index)))


def _digest(root) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.jpg")):
        h.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


def test_builtin_dataset_is_deterministic_and_has_the_imagefolder_layout(tmp_path):
    splits = {"train": 3, "val": 1, "test": 1}
    a = generate_shapes(tmp_path / "a", image_size=24, per_class=splits, progress=False)
    b = generate_shapes(tmp_path / "b", image_size=24, per_class=splits, progress=False)
    assert _digest(a) == _digest(b)
    assert sorted(p.name for p in a.iterdir() if p.is_dir()) == ["test", "train", "val"]
    classes = sorted(p.name for p in (a / "train").iterdir())
    assert len(classes) >= 6 and len(list((a / "train").rglob("*.jpg"))) == 3 * len(classes)
    c = generate_shapes(tmp_path / "c", image_size=24, per_class=splits, seed=1, progress=False)
    assert _digest(c) != _digest(a)
    mtime = (a / "manifest.json").stat().st_mtime_ns
    generate_shapes(a, image_size=24, per_class=splits, progress=False)  # already there: not rewritten
    assert (a / "manifest.json").stat().st_mtime_ns == mtime
