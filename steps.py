"""A training step and what it needs: the recipe's optimizer, the step under a run's speed settings,
the test evaluation, the probe's measure, and the memory training takes. train.py, bench.py and the tests train with these.

    optimizer, scheduler = steps.make_optimizer(model, config, settings.cuda_graph)
    step = steps.make_step(model, optimizer, settings, scaler)   # step(x, y) -> (loss, number correct)
    accuracy, loss = steps.evaluate(model, test_images, test_labels, settings.precision)
"""
import math

import torch
import torch.nn.functional as F

import cuda_graph
import data
import speed
from model import ResNet, state_shapes
from utils import UserError

# The report's recipe. On --resume these come from the checkpoint (an explicit, different value is an
# error); the others (--epochs, --iterations, --device, ...) may change on resume.
RECIPE = dict(data_dir="data", synthetic=False, batch_size=128, lr=1e-3, weight_decay=5e-4,
              lr_step_epochs=10, lr_gamma=0.5, width=64, seed=0)
RECIPE_EPOCHS = 52


def make_optimizer(model, config, cuda_graph=False):
    """The recipe's Adam and StepLR. For a CUDA graph, Adam is capturable (its step count lives on the
    device) and its lr is a device tensor, which StepLR updates in place, so a replay sees each decay."""
    lr = config["lr"]
    if cuda_graph:
        lr = torch.tensor(lr, device=next(model.parameters()).device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                 weight_decay=config["weight_decay"], capturable=cuda_graph)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config["lr_step_epochs"],
                                                gamma=config["lr_gamma"])
    return optimizer, scheduler


def train_step(model, optimizer, x, y, precision="fp32", scaler=None):
    """One optimisation step; returns (loss, number correct) as device tensors (no host sync, but
    fp16's GradScaler reads on the host whether the gradients are finite, and skips the step if not)."""
    with speed.autocast(x.device, precision):
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return loss.detach(), (logits.argmax(1) == y).sum()


def make_step(model, optimizer, settings, scaler=None, say=None):
    """The run's step(x, y) -> (loss, number correct) under `settings` (a speed.Settings): train_step
    eagerly, on the torch.compile'd model, or replayed from CUDA graphs (say: where their drop is told)."""
    if settings.cuda_graph:
        return cuda_graph.GraphedStep(lambda x, y: train_step(model, optimizer, x, y, settings.precision),
                                 model, optimizer, say)
    train_model = torch.compile(model) if settings.compile else model
    return lambda x, y: train_step(train_model, optimizer, x, y, settings.precision, scaler)


@torch.inference_mode()
def evaluate(model, images, labels, precision="fp32", channels_last=False, batch_size=None):
    """(accuracy as a fraction, mean cross-entropy) on a whole uint8 split."""
    if batch_size is None:  # big batches fill a GPU; on a CPU they spill out of the caches
        batch_size = 1000 if images.device.type in ("cuda", "mps") else 128
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), device=images.device, dtype=torch.long)
    for start in range(0, len(images), batch_size):
        x = data.normalize(images[start:start + batch_size])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = labels[start:start + batch_size]
        with speed.autocast(images.device, precision):
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    model.train(was_training)
    return correct.item() / len(images), loss_sum.item() / len(images)


def probe_measure(config, device, num_classes):
    """measure(settings, steps) -> images/s for speed.decide's probe: a fresh model of the run's width
    trained at its batch size on one random batch (speed does not depend on the pixels) under
    `settings`. A graph that is dropped in the probe would be dropped in the run too: it measures 0."""
    def measure(settings, steps):
        g = torch.Generator().manual_seed(0)
        batch = config["batch_size"]
        images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=g).to(device)
        y = torch.randint(0, num_classes, (batch,), generator=g).to(device)
        x = data.prepare_batch(images, torch.arange(batch, device=device), torch.full((batch, 2), 4, device=device),
                               torch.zeros(batch, dtype=torch.bool, device=device), settings.channels_last)
        model = ResNet(config["width"], num_classes).to(device)
        if settings.channels_last:
            model.to(memory_format=torch.channels_last)
        optimizer, _ = make_optimizer(model, config, settings.cuda_graph)
        step = make_step(model, optimizer, settings, speed.grad_scaler(device, settings.precision),
                         say=lambda line: None)

        def one_step():
            step(x, y)
            return batch
        rate = speed.probe_rate(one_step, steps, device)
        return 0.0 if getattr(step, "dropped", None) else rate
    return measure


def training_memory(width, batch_size, num_classes=10, cuda_graph=False, eval_batch=1000):
    """(bytes, parameters, activation floats per image) that training this network needs, estimated
    without allocating it:

        bytes = 16 x parameters           (fp32 weights, gradients, Adam's two moments)
              + 4 x batch x activations   (every layer's output per image, kept for the backward pass)
              [+ 8 x eval_batch x largest] (cuda_graph: see below)

    Parameters come from model.state_shapes. Every layer's output is a multiple of the width (the
    classifier's excepted), so activations are counted in one-image forward passes at widths 1 and 2
    and extrapolated exactly. Within ~15 % of the peak memory measured on a CPU (widths 16-128,
    batches 64-1024).

    CUDA graphs share one pool, and the warm-up's cache is emptied before the capture, so the graphs
    hold one step's activations and gradients as eager training does. But that pool is kept apart from
    the eager allocator, so the test evaluation (inference, eval_batch images at a time, a layer's input
    and output alive at once) cannot reuse it: counted as 2 x 4 B x eval_batch x the largest layer output.
    """
    shapes = state_shapes(width, num_classes)
    parameters = sum(math.prod(shapes[name]) for name, _ in ResNet(1, num_classes).named_parameters())
    counts, largest = [], []
    for small in (1, 2):
        outputs = []
        model = ResNet(small, num_classes).eval()
        for m in model.modules():
            if not list(m.children()):
                m.register_forward_hook(lambda m, i, out: outputs.append(out.numel()))
        with torch.inference_mode():
            model(torch.zeros(1, 3, 32, 32))
        counts.append(sum(outputs))
        largest.append(max(outputs))
    activations = counts[0] + (counts[1] - counts[0]) * (width - 1)
    need = 16 * parameters + 4 * batch_size * activations
    if cuda_graph:
        need += 8 * eval_batch * (largest[0] + (largest[1] - largest[0]) * (width - 1))
    return need, parameters, activations


def check_memory(config, device, cuda_graph=False):
    """UserError, before anything is allocated, if --width and --batch-size need more memory than
    `device` has free (where that is known); cuda_graph: if the run may train from CUDA graphs."""
    free = speed.available_memory(device)
    if free is None:
        return
    need, parameters, activations = training_memory(config["width"], config["batch_size"], cuda_graph=cuda_graph)
    if need > free:
        graphs = " and the CUDA graphs' evaluation room" if cuda_graph else ""
        raise UserError(
            f"--width {config['width']} with --batch-size {config['batch_size']} needs about {need / 2**30:.3g} GiB "
            f"on {device} (16 B x {parameters / 1e6:.3g} M parameters + 4 B x batch x {activations / 1e6:.3g} M "
            f"activations an image{graphs}), but {free / 2**30:.3g} GiB are free; lower --width or --batch-size")
