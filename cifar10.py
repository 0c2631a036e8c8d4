"""CIFAR-10 on disk: the official folder format, read safely and checked, its download, and the
synthetic stand-in written in the same format.

The folder format read here is the official `cifar-10-batches-py/`; tests, demos and --synthetic write
the same format and are read by the same code. Batch files are pickles, so they are read by an
unpickler that builds only what the official files hold and never calls anything a file names. A
split comes back as one uint8 tensor (N, 3, 32, 32) and its labels; data.py makes batches of it.
"""
import functools
import hashlib
import http.client
import io
import math
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from tqdm import tqdm

from utils import UserError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
DATASET_FILES = TRAIN_FILES + ("test_batch", "batches.meta")  # a dataset folder is exactly these
# md5 of each file of the official archive, as published: only a folder matching all is "CIFAR-10"
OFFICIAL_MD5 = {
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
}
SYNTHETIC_FOLDER = "synthetic"  # under --data-dir; holds a cifar-10-batches-py/ that is NOT CIFAR-10
SYNTHETIC_NAME = "synthetic gratings (NOT CIFAR-10)"
NAME_FILE = "NAME.txt"  # beside cifar-10-batches-py/: one line naming other data in the format, for titles
CIFAR10_TRAIN_IMAGES = 50_000    # what the download gives
SYNTHETIC_TRAIN_IMAGES = 10_000  # what synthetic_cifar10 writes
# Tests serve a small archive from 127.0.0.1: these two variables, read only here, point the
# download at it. They are not a user setting.
URL_FOR_TESTS, MD5_FOR_TESTS = "CIFAR10_URL_FOR_TESTS", "CIFAR10_MD5_FOR_TESTS"


# --------------------------------------------------------------------------- batch files, read as data

class _Refused(Exception):
    """What a batch file holds that the official archive never does."""


class _ArrayState:
    """Stands for numpy.core.multiarray._reconstruct(ndarray, ...) until BUILD hands it the array's state."""
    state = None

    def __setstate__(self, state):
        self.state = state


class _DtypeState(_ArrayState):
    """Stands for numpy.dtype('u1'): the only dtype the official archive holds."""


_NDARRAY = object()  # stands for the global numpy.ndarray, which only _reconstruct may receive


def _reconstruct(cls, shape, typecode):
    if cls is not _NDARRAY:
        raise _Refused("an array that is not a numpy.ndarray")
    return _ArrayState()


def _dtype(name, align=False, copy=True):
    if name not in ("u1", b"u1"):
        name = name.decode("latin1") if isinstance(name, bytes) else name
        raise _Refused(f"a numpy array of dtype {name!r}, not uint8")
    return _DtypeState()


def _latin1(text, encoding):
    """_codecs.encode(text, 'latin1'): how Python 3 writes bytes into a protocol-2 pickle."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused(f"_codecs.encode with {encoding!r}")
    return text.encode("latin1")


def _empty_bytes():
    """__builtin__.bytes(): how Python 3 writes b"" into a protocol-2 pickle (with no argument only)."""
    return b""


class _Admitted:
    """A global a batch file may name, as a callable no pickle can alter (no __dict__, no setattr)."""
    __slots__ = ("_make",)

    def __init__(self, make):
        object.__setattr__(self, "_make", make)

    def __call__(self, *args):
        return self._make(*args)

    def __setattr__(self, name, value):
        raise _Refused("a pickle that alters the reader")


_ADMITTED = {("numpy.core.multiarray", "_reconstruct"): _Admitted(_reconstruct),  # numpy 1, Python 2
             ("numpy._core.multiarray", "_reconstruct"): _Admitted(_reconstruct),  # numpy 2
             ("numpy", "ndarray"): _NDARRAY,
             ("numpy", "dtype"): _Admitted(_dtype),
             ("_codecs", "encode"): _Admitted(_latin1),
             ("__builtin__", "bytes"): _Admitted(_empty_bytes)}


class _BatchUnpickler(pickle.Unpickler):
    """Admits only the globals a CIFAR-10 batch file names, each replaced by a stand-in defined above:
    no function or class a file names is ever imported or called."""

    def find_class(self, module, name):
        if (module, name) in _ADMITTED:
            return _ADMITTED[(module, name)]
        raise _Refused(f"{module}.{name}")


def _as_data(obj):
    """The unpickled object with its stand-ins replaced by uint8 arrays; _Refused on anything else."""
    if isinstance(obj, dict):
        return {_as_data(k): _as_data(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_as_data(v) for v in obj]
    if isinstance(obj, (bytes, str, int)):
        return obj
    if type(obj) is _ArrayState:
        state = obj.state
        ok = isinstance(state, tuple) and len(state) == 5
        if ok:
            _, shape, dtype, fortran, raw = state
            ok = (isinstance(shape, tuple) and all(type(s) is int and s >= 0 for s in shape)
                  and type(dtype) is _DtypeState and isinstance(dtype.state, tuple) and len(dtype.state) >= 5
                  and dtype.state[1] in ("|", b"|") and dtype.state[2:5] == (None, None, None)
                  and isinstance(raw, bytes) and len(raw) == math.prod(shape))
        if not ok:
            raise _Refused("a numpy array that is not a plain uint8 array")
        return np.frombuffer(raw, np.uint8).reshape(shape, order="F" if fortran else "C")
    raise _Refused(f"a {type(obj).__name__}")


def _unpickle(path):
    """One batch file of the official archive: a Python-2 pickle whose keys load as bytes. Read with
    _BatchUnpickler, so a file that names anything but dicts, lists, bytes, str, ints and uint8
    arrays is refused before any of it is built."""
    redo = f"delete {path.parent} and extract {CIFAR10_ARCHIVE} again"
    try:
        with open(path, "rb") as f:
            batch = _as_data(_BatchUnpickler(io.BytesIO(f.read()), encoding="bytes").load())
    except _Refused as what:
        raise UserError(f"{path} was refused unread: it holds {what}, which a CIFAR-10 batch file never "
                        f"does (a pickle can carry code); {redo}") from None
    except Exception as err:  # a truncated or foreign file can raise almost anything here
        raise UserError(f"{path} is not a readable CIFAR-10 batch file ({type(err).__name__}); {redo}") from None
    if not isinstance(batch, dict):
        raise UserError(f"{path} holds a {type(batch).__name__}, not a CIFAR-10 batch dict; {redo}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}


def _read_batch(path, num_classes):
    batch = _unpickle(path)
    if "data" not in batch or "labels" not in batch:
        raise UserError(f"{path} has no 'data'/'labels' entries (keys: {sorted(map(str, batch))}); "
                        f"it is not a CIFAR-10 batch file")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise UserError(f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if len(data) == 0:  # an empty split would end in a division by zero
        raise UserError(f"{path} holds no images; every CIFAR-10 batch file holds at least one (the official "
                        f"ones 10,000); delete {path.parent} and extract {CIFAR10_ARCHIVE} again")
    if labels.shape != (data.shape[0],) or labels.dtype.kind not in "iu":
        raise UserError(f"{path}: 'labels' must be {data.shape[0]} integers, one per image; "
                        f"found {labels.size} of {labels.dtype}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise UserError(f"{path}: labels must lie in 0..{num_classes - 1}, "
                        f"found {labels.min()}..{labels.max()}")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels.astype("int64"))


def _check_folder(folder):
    """A dataset folder holds all of DATASET_FILES; any other file in it is ignored."""
    missing = [name for name in DATASET_FILES if not (folder / name).is_file()]
    if missing:
        raise UserError(f"{folder} lacks {', '.join(missing)} (a CIFAR-10 folder holds data_batch_1 "
                        f"to data_batch_5, test_batch and batches.meta); delete the folder and extract "
                        f"{CIFAR10_ARCHIVE} again")


def _class_names(folder):
    path = folder / "batches.meta"
    names = _unpickle(path).get("label_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, (bytes, str)) for n in names):
        raise UserError(f"{path} has no list of class names under 'label_names'; "
                        f"delete {folder} and extract {CIFAR10_ARCHIVE} again")
    return [n.decode("latin1") if isinstance(n, bytes) else n for n in names]


# --------------------------------------------------------------------------- what the data is

def _md5(path):
    """The file's md5, remembered for this process while its size and modification time stay the
    same: plot_all.py names the data once per figure, and the official folder takes ~0.5 s to hash."""
    stat = Path(path).stat()
    return _md5_of(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _md5_of(path, size, mtime_ns):
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def is_official_cifar10(folder):
    """Whether every file of the dataset folder has the md5 of the official archive's file.

    batches.meta (158 bytes) goes first, so other data is told apart without hashing its batches;
    the official folder costs one pass over its 178 MB.
    """
    return all((Path(folder) / name).is_file() and _md5(Path(folder) / name) == md5
               for name, md5 in OFFICIAL_MD5.items())


def describe_dataset(root, synthetic=False):
    """The name of the data in root/cifar-10-batches-py/ for logs, titles and captions.

    "CIFAR-10" only when every file matches the official md5; other data in the format is named by
    the first line of root/NAME.txt where there is one (a name that holds on any machine), else by its
    folder (root), and by its class names (as many as fit in about 100 characters); the synthetic data
    says NOT CIFAR-10.
    """
    if synthetic:
        return SYNTHETIC_NAME
    folder = Path(root) / CIFAR10_FOLDER
    if is_official_cifar10(folder):
        return "CIFAR-10"
    _check_folder(folder)
    classes = _class_names(folder)
    shown = ", ".join(classes)
    if len(shown) > 100:
        cut = max(1, max(k for k in range(len(classes) + 1) if len(", ".join(classes[:k])) <= 90))
        shown = f"{', '.join(classes[:cut])}, ... ({len(classes)} in all)"
    return f"{_own_name(root) or root} (not the official CIFAR-10; classes {shown})"


def _own_name(root):
    """The first line of root/NAME.txt (at most 80 characters), None where there is none."""
    try:
        lines = (Path(root) / NAME_FILE).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    name = lines[0].strip()[:80] if lines else ""
    return name or None


# --------------------------------------------------------------------------- download and extraction

def _archive_source():
    """(URL, md5) of the archive: the official ones, unless a test points them at its own server."""
    return os.environ.get(URL_FOR_TESTS, CIFAR10_URL), os.environ.get(MD5_FOR_TESTS, CIFAR10_MD5)


def _download(url, path):
    """Write what url serves to path with a progress bar; OSError if it ends before its length."""
    with urllib.request.urlopen(url, timeout=60) as response, open(path, "wb") as f:
        expected = response.length  # the Content-Length, or None
        print(f"downloading {url}", flush=True)
        with tqdm(total=expected, unit="B", unit_scale=True, leave=False) as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
        got = f.tell()
    if expected is not None and got != expected:
        raise OSError(f"the download stopped after {got:,} of {expected:,} bytes")


def _fetch_archive(data_dir):
    """data_dir/cifar-10-python.tar.gz with the right md5: the one lying there, or downloaded.

    A download goes to a temporary file that is moved into place only once its md5 is right, so a
    failed or wrong download leaves nothing behind. An archive put there by hand is never deleted:
    it is checked on every run until it is right.
    """
    url, md5 = _archive_source()
    archive = data_dir / CIFAR10_ARCHIVE
    if archive.is_file():
        got = _md5(archive)
        if got != md5:
            raise UserError(f"{archive} has md5 {got}, not {md5}: it is damaged or not the CIFAR-10 "
                            f"archive; delete it and run again to download it, or put the right file there")
        return archive
    fd, part = tempfile.mkstemp(prefix=f".{CIFAR10_ARCHIVE}.", suffix=".part", dir=data_dir)
    os.close(fd)
    try:
        try:
            _download(url, part)
        except (OSError, http.client.HTTPException, ValueError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else "no network"
            raise UserError(
                f"CIFAR-10 is not in {data_dir / CIFAR10_FOLDER} and could not be downloaded "
                f"({type(err).__name__}: {reason}); put {CIFAR10_ARCHIVE} (md5 {md5}) in {data_dir}/ "
                f"and run again, or use --synthetic for an offline demo") from None
        got = _md5(part)
        if got != md5:
            raise UserError(f"the archive downloaded from {url} has md5 {got}, not {md5}, so it was "
                            f"deleted; run again, or put {CIFAR10_ARCHIVE} in {data_dir}/ yourself")
        os.replace(part, archive)
    finally:
        Path(part).unlink(missing_ok=True)
    return archive


def _extract(archive, data_dir):
    """Extract the dataset files of archive into data_dir/cifar-10-batches-py/, all or nothing.

    Only regular files named cifar-10-batches-py/<one of DATASET_FILES> are read out of the archive,
    each written by this code under a temporary folder in data_dir (so no name in the archive can
    point outside it), and the folder is renamed into place once complete.
    """
    tmp = Path(tempfile.mkdtemp(prefix=".extracting-", dir=data_dir))
    try:
        (tmp / CIFAR10_FOLDER).mkdir()
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for member in tar:
                    parts = PurePosixPath(member.name).parts
                    if member.isfile() and len(parts) == 2 and parts[0] == CIFAR10_FOLDER \
                            and parts[1] in DATASET_FILES:
                        with tar.extractfile(member) as src, open(tmp / CIFAR10_FOLDER / parts[1], "wb") as dst:
                            shutil.copyfileobj(src, dst)
        except (tarfile.TarError, EOFError, OSError) as err:
            raise UserError(f"{archive} is not a readable .tar.gz ({type(err).__name__}: {err}); "
                            f"delete it and run again") from None
        missing = [name for name in DATASET_FILES if not (tmp / CIFAR10_FOLDER / name).is_file()]
        if missing:
            raise UserError(f"{archive} lacks {CIFAR10_FOLDER}/{', '.join(missing)}; it is not the "
                            f"CIFAR-10 archive: delete it and run again")
        os.replace(tmp / CIFAR10_FOLDER, data_dir / CIFAR10_FOLDER)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _download_cifar10(data_dir):
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        _extract(_fetch_archive(data_dir), data_dir)
    except OSError as err:  # no such folder, no permission, disk full, ...
        if (data_dir / CIFAR10_FOLDER).is_dir():  # another run extracted it meanwhile
            return
        raise UserError(f"cannot put CIFAR-10 into {data_dir} ({type(err).__name__}: {err}); "
                        f"pass a --data-dir you can write to") from None


# --------------------------------------------------------------------------- the reader and writer

def load_cifar10(data_dir, train, download=True):
    """(images uint8 (N, 3, 32, 32), labels int64 (N,), class names) of one split.

    Reads data_dir/cifar-10-batches-py/ in the official format: data_batch_1..5 for training,
    test_batch for testing, batches.meta for class names; all seven must be there, other files are
    ignored. A folder in the same format with other content (a fixture, --synthetic data) loads
    the same way. Without the folder, the archive in data_dir (or, with download, downloaded there)
    is checked and extracted.
    """
    data_dir = Path(data_dir)
    folder = data_dir / CIFAR10_FOLDER
    if not folder.is_dir():
        if not download:
            raise UserError(f"no {CIFAR10_FOLDER}/ in {data_dir}; extract {CIFAR10_ARCHIVE} there "
                            f"or use --synthetic")
        _download_cifar10(data_dir)
    _check_folder(folder)
    classes = _class_names(folder)
    parts = [_read_batch(folder / name, len(classes)) for name in (TRAIN_FILES if train else ["test_batch"])]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), classes


def write_cifar10_folder(root, train_images, train_labels, test_images, test_labels, classes):
    """Write a cifar-10-batches-py/ folder in the official on-disk format (for tests and --synthetic):
    the training images split over data_batch_1..5, test_batch, and batches.meta written last."""
    folder = Path(root) / CIFAR10_FOLDER
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name, images, labels):
        # bytes keys and protocol 2: what the official Python-2 pickles give under encoding="bytes"
        batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in labels],
                 b"data": images.reshape(len(images), 3072).numpy().astype(np.uint8),
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(len(images))]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)

    for name, idx in zip(TRAIN_FILES, torch.arange(len(train_images)).tensor_split(len(TRAIN_FILES))):
        dump(name, train_images[idx], train_labels[idx])
    dump("test_batch", test_images, test_labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in classes], b"num_vis": 3072,
                     b"num_cases_per_batch": math.ceil(len(train_images) / len(TRAIN_FILES))}, f, protocol=2)
    return folder


def make_synthetic_images(n, seed):
    """Learnable class-structured 32x32 images: class k is a colour grating at angle 18k degrees.

    Phase, frequency, contrast and background vary per image and noise is added, so the classes
    must be told apart by orientation and colour: an easy task, but one a network has to learn.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    angle = labels.float() * math.pi / 10
    freq = 0.35 + 0.25 * torch.rand(n, generator=g)
    phase = 2 * math.pi * torch.rand(n, generator=g)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    proj = xx * torch.cos(angle)[:, None, None] + yy * torch.sin(angle)[:, None, None]
    wave = torch.sin(freq[:, None, None] * proj + phase[:, None, None])  # (n, 32, 32)
    hue = torch.tensor([[1.0, .2, .2], [.2, 1.0, .2], [.2, .2, 1.0], [1.0, 1.0, .2], [1.0, .2, 1.0],
                        [.2, 1.0, 1.0], [1.0, .6, .2], [.6, .2, 1.0], [.2, .6, .4], [.8, .8, .8]])[labels]
    contrast = 0.25 + 0.2 * torch.rand(n, 1, 1, 1, generator=g)
    background = 0.3 + 0.4 * torch.rand(n, 3, 1, 1, generator=g)
    images = background + contrast * hue[:, :, None, None] * wave[:, None]
    images = images + 0.08 * torch.randn(n, 3, 32, 32, generator=g)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels


def synthetic_cifar10(data_dir, num_train=SYNTHETIC_TRAIN_IMAGES, num_test=10000):
    """Write (once) and return the folder of the offline demo data: NOT CIFAR-10.

    The test split has 10,000 images like the real one, so the plot scripts' default indices work.
    """
    root = Path(data_dir) / SYNTHETIC_FOLDER
    if not (root / CIFAR10_FOLDER / "batches.meta").is_file():  # written last
        train = make_synthetic_images(num_train, seed=0)
        test = make_synthetic_images(num_test, seed=1)
        classes = [f"synthetic-grating-{18 * k}deg" for k in range(10)]
        write_cifar10_folder(root, *train, *test, classes)
        (root / "README.txt").write_text("Synthetic gratings in the CIFAR-10 file format, written by "
                                         "cifar10.synthetic_cifar10 for offline demos. Not CIFAR-10.\n", encoding="utf-8")
    return root


def dataset_root(data_dir, synthetic):
    """The folder that load_cifar10 reads for this choice of data."""
    return synthetic_cifar10(data_dir) if synthetic else Path(data_dir)
