"""The CIFAR-10 reader on folders in the official on-disk format, what it refuses, how it names the
data, and the batched augmentation."""
import hashlib
import os
import pickle
import shutil
import struct

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF

import cifar10

import data
import utils
from conftest import assert_one_line_error, run_script

_RECONSTRUCT = np.zeros(1).__reduce__()[0]  # numpy's _reconstruct, whatever module numpy calls it


class Py2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote into the official archive: every str as a Python-2 str
    (BINSTRING, which loads as bytes under encoding="bytes") and numpy.core.multiarray._reconstruct."""
    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        raw = obj if isinstance(obj, bytes) else obj.encode("latin1")
        head = (pickle.SHORT_BINSTRING + bytes([len(raw)]) if len(raw) < 256
                else pickle.BINSTRING + struct.pack("<i", len(raw)))
        self.write(head + raw)
        self.memoize(obj)

    def save_global(self, obj, name=None):
        if obj is _RECONSTRUCT:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)

    dispatch[bytes] = dispatch[str] = save_py2_str
    dispatch[type] = save_global


def write_pickle(path, obj, style="py3"):
    """style: "py2" (the official files), "py3" (bytes keys, protocol 2, as write_cifar10_folder),
    "str" (str keys, as a Python-3 tool might write)."""
    if style == "str":
        obj = {k.decode(): v for k, v in obj.items()}
    with open(path, "wb") as f:
        (Py2Pickler(f, protocol=2) if style == "py2" else pickle.Pickler(f, protocol=2)).dump(obj)


def write_batch(path, pixels, labels, style="py3"):
    write_pickle(path, {b"batch_label": b"x", b"labels": labels, b"data": pixels,
                        b"filenames": [b"f%d.png" % i for i in range(len(labels))]}, style)


@pytest.mark.parametrize("style", ["py2", "py3", "str"])
def test_reader_returns_images_in_the_archive_layout(tmp_path, style):
    """Row layout of the archive: 1024 red, then 1024 green, then 1024 blue values, row-major;
    data_batch_1..5 in order; class names from batches.meta."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (3, 3072), dtype=np.uint8) for _ in range(5)]
    labels = [rng.integers(0, 10, 3).tolist() for _ in range(5)]
    for i, (pixels, lab) in enumerate(zip(batches, labels), start=1):
        write_batch(folder / f"data_batch_{i}", pixels, lab, style)
    test_data = rng.integers(0, 256, (5, 3072), dtype=np.uint8)
    write_batch(folder / "test_batch", test_data, [9, 0, 1, 2, 3], style)
    write_pickle(folder / "batches.meta", {b"label_names": [f"c{k}".encode() for k in range(10)],
                                           b"num_vis": 3072, b"num_cases_per_batch": 3}, style)

    images, y, classes = cifar10.load_cifar10(tmp_path, train=True, download=False)
    assert images.dtype == torch.uint8 and images.shape == (15, 3, 32, 32)
    assert y.dtype == torch.int64 and y.tolist() == sum(labels, [])
    assert classes == [f"c{k}" for k in range(10)]
    pixel = batches[3][2]  # image 2 of data_batch_4, pixel (row 5, col 17)
    assert images[9 + 2, :, 5, 17].tolist() == [pixel[5 * 32 + 17], pixel[1024 + 5 * 32 + 17],
                                                pixel[2048 + 5 * 32 + 17]]
    test_images, test_y, _ = cifar10.load_cifar10(tmp_path, train=False, download=False)
    assert test_y.tolist() == [9, 0, 1, 2, 3]
    assert torch.equal(test_images.reshape(5, 3072), torch.from_numpy(test_data))


def test_writer_and_reader_round_trip_with_class_names(tmp_path):
    images, labels = cifar10.make_synthetic_images(33, seed=3)
    cifar10.write_cifar10_folder(tmp_path, images[:23], labels[:23], images[23:], labels[23:],
                              [f"c{k}" for k in range(10)])
    assert sorted(p.name for p in (tmp_path / "cifar-10-batches-py").iterdir()) == sorted(cifar10.DATASET_FILES)
    got, got_labels, classes = cifar10.load_cifar10(tmp_path, train=True, download=False)
    assert torch.equal(got, images[:23]) and torch.equal(got_labels, labels[:23])
    assert classes == [f"c{k}" for k in range(10)]
    # fewer training images than batches: the first empty batch (an empty bytes object in protocol 2,
    # read as data) is refused by name; the test split, of one image, still reads
    cifar10.write_cifar10_folder(tmp_path / "tiny", images[:3], labels[:3], images[3:4], labels[3:4], ["a", "b"] * 5)
    with pytest.raises(utils.UserError, match="data_batch_4 holds no images"):
        cifar10.load_cifar10(tmp_path / "tiny", train=True)
    assert torch.equal(cifar10.load_cifar10(tmp_path / "tiny", train=False)[0], images[3:4])


@pytest.fixture
def copy_of_small(small_data_dir, tmp_path):
    data_dir = tmp_path / "data"
    shutil.copytree(small_data_dir, data_dir)
    return data_dir


@pytest.mark.parametrize("damage, words, cli", [
    (lambda f: f.write_bytes(b"not a pickle"), ["data_batch_1", "not a readable"], True),
    (lambda f: f.write_bytes(f.read_bytes()[:1000]), ["data_batch_1", "not a readable"], True),
    (lambda f: write_batch(f, np.zeros((4, 3000), np.uint8), [0] * 4), ["expected uint8 (N, 3072)"], True),
    (lambda f: write_batch(f, np.zeros((4, 3072), np.uint8), [0, 1, 2, 10]), ["labels must lie in 0..9"], True),
    (lambda f: write_batch(f, np.zeros((4, 3072), np.uint8), [0, 1]), ["'labels' must be 4 integers"], True),
    (lambda f: write_batch(f, np.zeros((4, 3072), np.float32), [0] * 4), ["dtype 'f4'", "refused unread"], False),
    (lambda f: write_batch(f, np.zeros((4, 3072), np.uint8), np.arange(4)), ["dtype 'i8'"], False),
    (lambda f: write_batch(f, np.zeros((4, 3072), np.uint8), [b"a"] * 4), ["'labels' must be 4 integers"], False),
    (lambda f: write_batch(f, np.zeros((4, 3072), np.uint8), [0.5] * 4), ["holds a float"], False),
    (lambda f: write_batch(f, np.zeros((0, 3072), np.uint8), []), ["data_batch_1 holds no images"], False),
    (lambda f: write_batch(f, np.zeros((0, 3072), np.uint8), [3]), ["data_batch_1 holds no images"], False),
])
def test_malformed_dataset_files_give_one_clear_line(copy_of_small, tmp_path, damage, words, cli):
    damage(copy_of_small / "cifar-10-batches-py" / "data_batch_1")
    with pytest.raises(utils.UserError) as err:
        cifar10.load_cifar10(copy_of_small, train=True)
    for word in words:
        assert word in str(err.value)
    if not cli:  # the same UserError path as the rows above: no need to pay for another process
        return
    proc = run_script("train.py", "--data-dir", copy_of_small, "--checkpoint", tmp_path / "c.pt", "--iterations", 1)
    assert_one_line_error(proc, *words)
    assert not (tmp_path / "c.pt").exists()


class WritesMarker:
    """Unpickling this runs code: os.system or builtins.exec writing the marker file."""

    def __init__(self, marker, via):
        self.marker, self.via = str(marker), via

    def __reduce__(self):
        if self.via == "os.system":
            return os.system, (f"echo ran > '{self.marker}'",)
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


@pytest.mark.parametrize("via", ["os.system", "exec"])
@pytest.mark.parametrize("name", ["data_batch_3", "test_batch", "batches.meta"])
def test_a_batch_file_that_carries_code_is_refused_and_its_code_never_runs(copy_of_small, tmp_path, name, via):
    marker = tmp_path / "code-ran"
    path = copy_of_small / "cifar-10-batches-py" / name
    batch = pickle.load(open(path, "rb"), encoding="bytes")
    batch[b"labels" if name != "batches.meta" else b"label_names"] = WritesMarker(marker, via)
    write_pickle(path, batch)
    pickle.load(open(path, "rb"), encoding="bytes")  # the payload is live: plain pickle runs it
    assert marker.read_text().strip() == "ran"
    marker.unlink()

    for train in {"data_batch_3": [True], "test_batch": [False], "batches.meta": [True, False]}[name]:
        with pytest.raises(utils.UserError) as err:
            cifar10.load_cifar10(copy_of_small, train=train)
        assert str(path) in str(err.value) and "refused unread" in str(err.value)
        # the global as the pickle names it (Python 3 writes builtins as __builtin__ in protocol 2)
        assert {"os.system": "posix.system", "exec": "__builtin__.exec"}[via] in str(err.value)
    if name == "batches.meta":  # the one file naming the data reads; it never hashes into the others
        with pytest.raises(utils.UserError, match="refused unread"):
            cifar10.describe_dataset(copy_of_small)
    assert not marker.exists()


def test_a_folder_is_exactly_its_seven_files_and_others_are_ignored(copy_of_small, tmp_path):
    folder = copy_of_small / "cifar-10-batches-py"
    before = cifar10.load_cifar10(copy_of_small, train=True), cifar10.load_cifar10(copy_of_small, train=False)
    extra = cifar10.make_synthetic_images(50, seed=99)
    cifar10.write_cifar10_folder(tmp_path / "other", *extra, *extra, [f"x{k}" for k in range(10)])
    shutil.copy(tmp_path / "other" / "cifar-10-batches-py" / "data_batch_1", folder / "data_batch_1.orig")
    shutil.copy(tmp_path / "other" / "cifar-10-batches-py" / "data_batch_2", folder / "data_batch_6")
    shutil.copy(tmp_path / "other" / "cifar-10-batches-py" / "test_batch", folder / "test_batch~")
    write_pickle(folder / "data_batch_7", {b"labels": WritesMarker(tmp_path / "code-ran", "exec")})
    after = cifar10.load_cifar10(copy_of_small, train=True), cifar10.load_cifar10(copy_of_small, train=False)
    for b, a in zip(before, after):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    assert not (tmp_path / "code-ran").exists()


@pytest.mark.parametrize("remove", [["data_batch_2", "data_batch_4"], ["test_batch"], ["batches.meta"]])
def test_a_folder_missing_some_of_its_files_is_refused_naming_them(copy_of_small, remove):
    for name in remove:
        (copy_of_small / "cifar-10-batches-py" / name).unlink()
    for train in (True, False):
        with pytest.raises(utils.UserError) as err:
            cifar10.load_cifar10(copy_of_small, train=train)
        assert f"lacks {', '.join(remove)} " in str(err.value)


def test_absent_dataset_offline_says_where_to_put_the_archive(tmp_path):
    proc = run_script("train.py", "--data-dir", tmp_path / "empty", "--checkpoint", tmp_path / "c.pt")
    line = assert_one_line_error(proc, "cifar-10-python.tar.gz", "--synthetic", str(tmp_path / "empty"))
    assert "could not be downloaded" in line
    assert [p.name for p in (tmp_path / "empty").iterdir()] == []  # no partial download left behind


def test_only_files_with_the_official_md5_are_named_cifar10(copy_of_small, monkeypatch):
    folder = copy_of_small / "cifar-10-batches-py"
    name = cifar10.describe_dataset(copy_of_small)
    assert name == f"{copy_of_small} (not the official CIFAR-10; classes {', '.join(f'class-{k}' for k in range(10))})"
    assert not cifar10.is_official_cifar10(folder)
    # With the published sums replaced by this folder's, the folder is recognised, by its md5 alone...
    sums = {n: hashlib.md5((folder / n).read_bytes()).hexdigest() for n in cifar10.DATASET_FILES}
    monkeypatch.setattr(cifar10, "OFFICIAL_MD5", sums)
    assert cifar10.describe_dataset(copy_of_small) == "CIFAR-10"
    (folder / "data_batch_1.orig").write_bytes(b"ignored")  # other files change nothing
    assert cifar10.describe_dataset(copy_of_small) == "CIFAR-10"
    # ...and one changed file, still a valid batch with the same images, makes it not CIFAR-10 again
    batch = pickle.load(open(folder / "data_batch_5", "rb"), encoding="bytes")
    write_pickle(folder / "data_batch_5", {**batch, b"batch_label": b"edited"})
    assert cifar10.describe_dataset(copy_of_small) == name
    assert cifar10.describe_dataset(copy_of_small, synthetic=True) == "synthetic gratings (NOT CIFAR-10)"
    write_pickle(folder / "batches.meta", {b"label_names": [b"fine-class-%d" % k for k in range(100)]})
    many = ", ".join(f"fine-class-{k}" for k in range(6))  # as many as fit in about a title's line
    assert cifar10.describe_dataset(copy_of_small).endswith(f"classes {many}, ... (100 in all))")


def test_synthetic_data_is_labelled_not_cifar10_and_read_by_the_same_reader(synthetic_data_dir):
    root = cifar10.dataset_root(synthetic_data_dir, synthetic=True)
    assert "Not CIFAR-10" in (root / "README.txt").read_text()
    images, labels, classes = cifar10.load_cifar10(root, train=False, download=False)
    assert images.shape == (10000, 3, 32, 32) and all(c.startswith("synthetic") for c in classes)
    assert torch.bincount(labels, minlength=10).min() > 800  # every class present, roughly balanced


def test_checkpoint_stores_data_dir_absolute_so_plots_run_from_elsewhere_read_it(
        small_data_dir, synthetic_data_dir, tmp_path, monkeypatch):
    """A relative --data-dir is stored absolute (and accepted again on --resume); a plot script
    run from another folder then reads that data and names it in its caption."""
    import checkpoint
    import steps
    import train
    from model import ResNet
    from visualize import cli
    monkeypatch.chdir(small_data_dir.parent)
    argv = ["--data-dir", small_data_dir.name, "--width", "4"]
    config = train.resolve_config(train.parse_args(argv), None)
    assert config["data_dir"] == str(small_data_dir.resolve())
    train.resolve_config(train.parse_args(argv + ["--resume"]), {"config": config})  # same data: accepted

    config["data_name"] = name = cifar10.describe_dataset(config["data_dir"])
    config["classes"] = cifar10.load_cifar10(small_data_dir, train=False)[2]  # as train.py records them
    model = ResNet(4)
    checkpoint.save_atomic(checkpoint.portable(checkpoint.state_of(model, *steps.make_optimizer(model, config), None,
                                                                   0, 0, config, checkpoint.new_history())),
                           tmp_path / "c.pt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    parser = cli.plot_parser("", image_index=3)
    run = parser.load(parser.parse_args(["--checkpoint", str(tmp_path / "c.pt"), "--device", "cpu"]))
    assert torch.equal(run.images, cifar10.load_cifar10(small_data_dir, train=False)[0])
    assert " ".join(run.caption.split()) == f"c.pt: width-4 ResNet-18 trained on {name}" and "class-9" in name
    assert list(elsewhere.iterdir()) == []  # nothing written or downloaded here
    run = parser.load(parser.parse_args(["--checkpoint", str(tmp_path / "c.pt"), "--device", "cpu", "--synthetic",
                                         "--data-dir", str(synthetic_data_dir)]))  # other test images: both are named
    assert " ".join(run.caption.split()).endswith("; test images from synthetic gratings (NOT CIFAR-10)")


def test_other_data_is_named_by_its_name_file_where_it_has_one(small_data_dir, tmp_path):
    """A NAME.txt beside cifar-10-batches-py/ names the data in titles instead of its folder, which is the
    machine's own (the gallery's Fashion-MNIST is "Fashion-MNIST in the CIFAR-10 format" anywhere)."""
    copy = tmp_path / "fashion"
    shutil.copytree(small_data_dir, copy)
    by_folder = cifar10.describe_dataset(copy)
    (copy / cifar10.NAME_FILE).write_text("Fashion-MNIST in the CIFAR-10 format\nsecond line ignored\n")
    named = cifar10.describe_dataset(copy)
    assert named == by_folder.replace(str(copy), "Fashion-MNIST in the CIFAR-10 format", 1)
    assert str(tmp_path) not in named and "not the official CIFAR-10" in named
    (copy / cifar10.NAME_FILE).write_text("\n")  # an empty name: the folder again
    assert cifar10.describe_dataset(copy) == by_folder


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
