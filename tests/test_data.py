"""The CIFAR-10 reader on folders in the official on-disk format, and the batched augmentation."""
import pickle

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF

import data
import utils
from conftest import assert_one_line_error, run_script


def write_batch(path, keys_as_bytes, data, labels):
    key = (lambda k: k.encode()) if keys_as_bytes else (lambda k: k)
    with open(path, "wb") as f:
        pickle.dump({key("data"): data, key("labels"): labels, key("batch_label"): b"x"}, f, protocol=2)


@pytest.mark.parametrize("keys_as_bytes", [True, False])
def test_reader_returns_images_in_the_archive_layout(tmp_path, keys_as_bytes):
    """Row layout of the archive: 1024 red, then 1024 green, then 1024 blue values, row-major."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (7, 3072), dtype=np.uint8) for _ in range(2)]
    labels = [rng.integers(0, 10, 7).tolist() for _ in range(2)]
    for i, (pixels, lab) in enumerate(zip(batches, labels), start=1):
        write_batch(folder / f"data_batch_{i}", keys_as_bytes, pixels, lab)
    test_data = rng.integers(0, 256, (5, 3072), dtype=np.uint8)
    write_batch(folder / "test_batch", keys_as_bytes, test_data, [9, 0, 1, 2, 3])

    images, y, classes = data.load_cifar10(tmp_path, train=True, download=False)
    assert images.dtype == torch.uint8 and images.shape == (14, 3, 32, 32)
    assert y.dtype == torch.int64 and y.tolist() == labels[0] + labels[1]
    assert classes == list(data.CIFAR10_CLASSES)  # no batches.meta: the official names
    pixel = batches[1][3]  # image 3 of batch 2, pixel (row 5, col 17)
    assert images[7 + 3, :, 5, 17].tolist() == [pixel[5 * 32 + 17], pixel[1024 + 5 * 32 + 17],
                                                pixel[2048 + 5 * 32 + 17]]
    test_images, test_y, _ = data.load_cifar10(tmp_path, train=False, download=False)
    assert test_y.tolist() == [9, 0, 1, 2, 3]
    assert torch.equal(test_images.reshape(5, 3072), torch.from_numpy(test_data))


def test_writer_and_reader_round_trip_with_class_names(tmp_path):
    images, labels = data.make_synthetic_images(30, seed=3)
    data.write_cifar10_folder(tmp_path, images[:20], labels[:20], images[20:], labels[20:],
                               [f"c{k}" for k in range(10)], num_train_batches=3)
    assert len(list((tmp_path / "cifar-10-batches-py").glob("data_batch_*"))) == 3
    got, got_labels, classes = data.load_cifar10(tmp_path, train=True, download=False)
    assert torch.equal(got, images[:20]) and torch.equal(got_labels, labels[:20])
    assert classes == [f"c{k}" for k in range(10)]


@pytest.mark.parametrize("damage, words", [
    (lambda f: f.write_bytes(b"not a pickle"), ["data_batch_1", "not a readable"]),
    (lambda f: f.write_bytes(f.read_bytes()[:1000]), ["data_batch_1", "not a readable"]),
    (lambda f: write_batch(f, True, np.zeros((4, 3000), np.uint8), [0] * 4), ["expected uint8 (N, 3072)"]),
    (lambda f: write_batch(f, True, np.zeros((4, 3072), np.uint8), [0, 1, 2, 10]), ["labels must lie in 0..9"]),
    (lambda f: write_batch(f, True, np.zeros((4, 3072), np.uint8), [0, 1]), ["2 labels for 4 images"]),
])
def test_malformed_dataset_files_give_one_clear_line(small_data_dir, tmp_path, damage, words):
    import shutil
    data_dir = tmp_path / "data"
    shutil.copytree(small_data_dir, data_dir)
    damage(data_dir / "cifar-10-batches-py" / "data_batch_1")
    with pytest.raises(utils.UserError) as err:
        data.load_cifar10(data_dir, train=True)
    for word in words:
        assert word in str(err.value)
    proc = run_script("train.py", "--data-dir", data_dir, "--checkpoint", tmp_path / "c.pt", "--iterations", 1)
    assert_one_line_error(proc, *words)
    assert not (tmp_path / "c.pt").exists()


def test_absent_dataset_offline_says_where_to_put_the_archive(tmp_path):
    proc = run_script("train.py", "--data-dir", tmp_path / "empty", "--checkpoint", tmp_path / "c.pt")
    line = assert_one_line_error(proc, "cifar-10-python.tar.gz", "--synthetic", str(tmp_path / "empty"))
    assert "could not be downloaded" in line


def test_synthetic_data_is_labelled_not_cifar10_and_read_by_the_same_reader(synthetic_data_dir):
    root = data.dataset_root(synthetic_data_dir, synthetic=True)
    assert "Not CIFAR-10" in (root / "README.txt").read_text()
    images, labels, classes = data.load_cifar10(root, train=False, download=False)
    assert images.shape == (10000, 3, 32, 32) and all(c.startswith("synthetic") for c in classes)
    assert torch.bincount(labels, minlength=10).min() > 800  # every class present, roughly balanced


def test_random_crop_flip_is_one_offset_and_flip_of_the_padded_image():
    """Each output equals torchvision's crop of the zero-padded raw image at some offset, optionally
    flipped; over many images every one of the 9x9 offsets and both flips occur."""
    n = 3000
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    offsets, flips = data.draw_augmentation(n, torch.Generator().manual_seed(1))
    out = data.random_crop_flip(images, offsets, flips)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    padded = TF.pad(images, [4])  # torchvision's RandomCrop(32, padding=4) pads with zeros like this
    seen = set()
    for i in range(n):
        top, left = offsets[i].tolist()
        crop = TF.crop(padded[i], top, left, 32, 32)
        assert torch.equal(out[i], TF.hflip(crop) if flips[i] else crop)
        seen.add((top, left, bool(flips[i])))
    assert len(seen) == 81 * 2  # every offset, each with and without a flip
    for i in range(0, n, 50):  # and the offset/flip that explains an output is unique (random images)
        matches = [(t, l, f) for t in range(9) for l in range(9) for f in (False, True)
                   if torch.equal(out[i], (TF.hflip if f else (lambda c: c))(TF.crop(padded[i], t, l, 32, 32)))]
        assert matches == [tuple(offsets[i].tolist()) + (bool(flips[i]),)]
    assert 0.45 < flips.float().mean() < 0.55


def test_normalize_matches_torchvision_to_tensor_and_normalize():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    reference = torch.stack([T.Normalize(data.CIFAR10_MEAN, data.CIFAR10_STD)(T.ToTensor()(
        TF.to_pil_image(img))) for img in images])
    torch.testing.assert_close(data.normalize(images), reference)
    torch.testing.assert_close(data.denormalize(reference), images.float() / 255)
