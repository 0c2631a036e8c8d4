"""The data as the network sees it: normalisation, the batched augmentation and an epoch's batches.

Data is handled as one uint8 tensor (N, 3, 32, 32) per split (cifar10.py reads it from disk): that is
what the official archive holds, and it fits on any device (150 MB for the training set), so an
epoch's batches are gathered, cropped and flipped there as batched tensor ops.
"""
import torch

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


# --------------------------------------------------------------------------- tensors in and out

_MEAN_STD = {}  # (device, dtype) -> (mean, std), each (1, 3, 1, 1)


def mean_std(device, dtype=torch.float32):
    """The CIFAR-10 mean and std as (1, 3, 1, 1) tensors on `device`, made once per device and dtype:
    building them each batch was a blocking host-to-device copy, two host syncs a training step."""
    key = (torch.device(device), dtype)
    if key not in _MEAN_STD:
        with torch.inference_mode(False):  # usable outside inference mode too, where autograd saves them
            _MEAN_STD[key] = tuple(torch.tensor(v, dtype=dtype, device=device).view(1, 3, 1, 1)
                                   for v in (CIFAR10_MEAN, CIFAR10_STD))
    return _MEAN_STD[key]


def normalize(images):
    """uint8 images (N, 3, H, W) -> float network input normalised with the CIFAR-10 mean/std."""
    mean, std = mean_std(images.device)
    return (images.float() / 255 - mean) / std


def denormalize(x):
    """The inverse of normalize, as floats in [0, 1] for display."""
    mean, std = mean_std(x.device)
    return (x * std + mean).clamp(0, 1)


def random_crop_flip(images, offsets, flips, padding=4):
    """Batched RandomCrop(32, padding) + RandomHorizontalFlip on raw uint8 images.

    images (N, C, H, W); offsets (N, 2) int64 in 0..2*padding (top, left) of each crop in the
    zero-padded image; flips (N,) bool. Pure indexing, so it runs on whatever device holds the data.
    """
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    rows = offsets[:, :1] + torch.arange(h, device=images.device)           # (N, H)
    cols = offsets[:, 1:] + torch.arange(w, device=images.device)           # (N, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=images.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2)


def draw_augmentation(n, generator, padding=4):
    """Random crop offsets (N, 2) and flips (N,) from a CPU generator, for random_crop_flip."""
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    return offsets, flips


# --------------------------------------------------------------------------- an epoch's batches

def batches_per_epoch(num_images, batch_size):
    """The batches (training steps) of an epoch: the last one partial where batch_size does not divide."""
    return -(-num_images // batch_size)


def epoch_plan(num_images, epoch, seed):
    """Shuffle order and augmentation of one epoch, drawn from a generator seeded by (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_images, generator=g)
    offsets, flips = draw_augmentation(num_images, g)
    return order, offsets, flips


def prepare_batch(images, index, offsets, flips, channels_last=False):
    """Gather uint8 images on their device, crop + flip, normalise: the network's input batch."""
    x = normalize(random_crop_flip(images[index], offsets, flips))
    # The gather leaves channels-last strides; convolutions on CPU are fastest on the layout asked for.
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def epoch_batches(images, labels, epoch, seed, batch_size, channels_last=False, first=0, last=None):
    """Batches first..last-1 of one epoch as (network input, labels), gathered and augmented on the device."""
    order, offsets, flips = (t.to(images.device) for t in epoch_plan(len(images), epoch, seed))
    last = batches_per_epoch(len(images), batch_size) if last is None else last
    for step in range(first, last):
        batch = slice(step * batch_size, (step + 1) * batch_size)
        index = order[batch]
        yield prepare_batch(images, index, offsets[batch], flips[batch], channels_last), labels[index]
