"""Faithfulness of class-evidence maps: does what a map highlights matter to the prediction?

Every function takes maps as input (visualize.attribution makes them), so a map from anywhere can be
scored, and two baselines that know nothing of the network are made here: random_map and edge_map.

Conventions, each a choice the papers leave open at 32x32 (written down so an independent
implementation can be held against this one):

    relevance   a pixel map (N, 3, H, W) is reduced to sum_c |m_c| (Petsiuk et al.); a map (N, h, w)
                (Grad-CAM) is used as it is, bilinearly upsampled (align_corners=False) where it is
                at a stage's resolution. Pixels are ranked most relevant first; ties (Grad-CAM's
                ReLU zeros) are broken in a seeded random order, the same for every map of a call.
    deletion    (Petsiuk et al. 2018) the k * step % most relevant pixels, k = 0, 1, ..., all 3
                colours of each, are set to the baseline image, 0 in normalised space (the data's
                mean colour, the baseline of integrated gradients); the curve is the target's
                softmax probability after each step, over the fraction of pixels removed.
    insertion   the same pixels are copied from the image into a blurred copy of it (a Gaussian of
                BLUR_SIGMA pixels, reflected at the border, in normalised space).
    AUC         the trapezoid rule over the fraction of pixels, so a curve that stays at p has AUC p.
                Deletion: lower is more faithful; insertion: higher.
    ROAD        (Rong et al. 2022) at each level q (10 %..90 %) the q % most relevant pixels (MoRF)
                or the q % least relevant (LeRF) are removed and replaced by road_impute's noisy
                linear imputation of the [0, 1] image; the score is the fraction of images still
                classified as the target. MoRF: lower is more faithful; LeRF: higher.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data import mean_std, normalize
from visualize.scoring import classify, default_batch_size

DELETION_STEP = 5  # percent of the pixels removed (or inserted) a step: 21 points from 0 % to 100 %
ROAD_LEVELS = (10, 20, 30, 40, 50, 60, 70, 80, 90)  # percent removed, Rong et al.'s
ROAD_NOISE = 0.01  # the imputation's noise, standard deviation in [0, 1] pixels (Rong et al.'s default)
BLUR_SIGMA = 2.0  # insertion's blurred start, in pixels: at 32x32, a garment's outline but no detail
# road_impute's conjugate gradients stop at this residual norm relative to the right side's, by the
# precision they run in (the images'): in float32 the imputed pixels are then within 3e-6 of float64's
# exact solve (measured on 55 Fashion-MNIST images at all 9 levels), far below the noise (0.01) and a
# uint8 step (0.004), and it takes half the time of float64
SOLVER_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-6}
SOLVE_BLOCK = 256  # systems solved together (each 32x32: at most 2 MiB a vector of the block)
CHUNK = 500  # perturbed images made at a time (memory); they go through the network scoring.default_batch_size a pass


# --------------------------------------------------------------------------- maps and rankings

def relevance(maps, size=(32, 32)):
    """A map's relevance per pixel, float32 (N, H, W): sum_c |m_c| of a pixel map (N, 3, H, W), a map
    (N, h, w) as it is, upsampled bilinearly (align_corners=False) to `size` where it is smaller."""
    maps = maps.detach()
    maps = maps if maps.dtype == torch.float64 else maps.float()  # float64 maps (the tests') stay exact
    if maps.dim() == 4:
        maps = maps.abs().sum(1)
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return maps


def ranks(maps, seed=0):
    """Each pixel's place in its image's ranking, most relevant first: int64 (N, H*W), 0 = the most
    relevant. Ties are broken by one seeded random permutation of the pixels (the same for every
    image and every map of a seed), not by position, so a flat region is not read top-down."""
    scores = relevance(maps).flatten(1).cpu()  # ranked on the CPU, where the tie-break's generator is
    tie_break = torch.randperm(scores.shape[1], generator=torch.Generator().manual_seed(seed))
    order = tie_break[torch.sort(scores[:, tie_break], dim=1, descending=True, stable=True).indices]
    places = torch.empty_like(order)
    places.scatter_(1, order, torch.arange(scores.shape[1]).expand_as(order))
    return places


def random_map(n, seed=0, size=(32, 32)):
    """The baseline that knows nothing: uniform noise (n, H, W) from a generator seeded with `seed`."""
    return torch.rand((n, *size), generator=torch.Generator().manual_seed(seed))


SOBEL = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def edge_map(images):
    """The baseline that knows only the image: the Sobel gradient magnitude sqrt(gx^2 + gy^2) of the
    grey image (the mean of the three colours of the [0, 1] pixels), the border replicated; (N, H, W).
    images: uint8 (N, 3, H, W)."""
    grey = images.float().mean(1, keepdim=True) / 255
    kernels = torch.stack([SOBEL, SOBEL.T])[:, None].to(grey.device)
    g = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernels)
    return g.pow(2).sum(1).sqrt()


# --------------------------------------------------------------------------- deletion and insertion

def step_counts(num_pixels, step=DELETION_STEP):
    """The pixels removed after each step, round(k * step % of num_pixels) for k = 0, 1, ..., ending
    with all of them (the last step may be shorter)."""
    if not 0 < step <= 100:
        raise ValueError(f"step must be a percentage in (0, 100], got {step}")
    fractions = [min(k * step, 100) / 100 for k in range(math.ceil(100 / step) + 1)]
    return [round(f * num_pixels) for f in fractions]


def trapezoid(fractions, curves):
    """The area under each curve (..., K) over the fractions (K,), by the trapezoid rule."""
    fractions = torch.as_tensor(fractions, dtype=torch.float64)
    curves = curves.double()
    return ((curves[..., 1:] + curves[..., :-1]) / 2 * fractions.diff()).sum(-1)


def target_probabilities(model, x, targets):
    """softmax(model(x))[target] for a normalised batch x and its targets, under inference mode."""
    rows = default_batch_size(x.device)
    with torch.inference_mode():
        return torch.cat([classify(model, x[i:i + rows]).float().softmax(1)
                          .gather(1, targets[i:i + rows, None])[:, 0] for i in range(0, len(x), rows)])


def predictions(model, x):
    """argmax of model(x) for a normalised batch x, under inference mode."""
    rows = default_batch_size(x.device)
    with torch.inference_mode():
        return torch.cat([classify(model, x[i:i + rows]).argmax(1) for i in range(0, len(x), rows)])


def gaussian_blur(x, sigma=BLUR_SIGMA):
    """x (N, C, H, W) convolved with a normalised Gaussian of `sigma` pixels, 2 ceil(3 sigma) + 1 wide,
    separably, the border reflected."""
    radius = math.ceil(3 * sigma)
    taps = torch.exp(-torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device) ** 2 / (2 * sigma ** 2))
    taps = taps / taps.sum()
    channels = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1),
                 groups=channels)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), taps.view(1, 1, -1, 1).expand(channels, 1, -1, 1),
                    groups=channels)


@dataclass
class Curve:
    """A deletion or insertion curve of N images."""
    fractions: list           # the fraction of pixels removed (inserted) at each point, 0 .. 1
    probabilities: torch.Tensor  # (N, points) the target's softmax probability at each point
    auc: torch.Tensor         # (N,) float64, trapezoid(fractions, probabilities)


def perturbation_curve(model, images, targets, maps, kind, step=DELETION_STEP, seed=0):
    """The deletion (kind "deletion") or insertion (kind "insertion") curve of each image (see the
    module's docstring). images: uint8 (N, 3, H, W); targets: class indices (N,); maps: (N, 3, H, W)
    or (N, h, w). perturbation_curves of the one map."""
    return perturbation_curves(model, images, targets, {None: maps}, (kind,), step, seed)[None][kind]


def perturbation_curves(model, images, targets, maps, kinds=("deletion", "insertion"), step=DELETION_STEP, seed=0):
    """{name: {kind: Curve}}: the curves of `kinds` of every map {name: maps (N, 3, H, W) or (N, h, w)}
    of the same images. A curve's first and last points change no pixel or every pixel, whatever the
    map (deletion: the image, then the baseline; insertion: the blurred image, then the image), so the
    network sees those three images once for all maps and kinds; the points between are each map's,
    the images of a chunk and all their steps through the network together."""
    parameter = next(model.parameters())
    device = parameter.device
    x = normalize(images.to(device)).to(parameter.dtype)
    n, _, h, w = x.shape
    counts = torch.tensor(step_counts(h * w, step), device=device)
    fractions = (counts.double() / (h * w)).tolist()
    ends = {"deletion": (x, torch.zeros_like(x)),  # 0 in normalised space: the data's mean colour
            "insertion": (gaussian_blur(x), x)}
    unknown = [kind for kind in kinds if kind not in ends]
    if unknown:
        raise ValueError(f"unknown kind {unknown[0]!r}; choose deletion or insertion")
    targets = targets.to(device)
    # the end points: the image, the baseline and the blurred image, each once
    image_p, baseline_p, blurred_p = target_probabilities(
        model, torch.cat([x, ends["deletion"][1], ends["insertion"][0]]), targets.repeat(3)).view(3, n)
    end_points = {"deletion": (image_p, baseline_p), "insertion": (blurred_p, image_p)}
    inner = counts[1:-1]
    per_chunk = max(1, CHUNK // max(len(inner), 1))
    curves = {}
    for name, m in maps.items():
        places = ranks(m, seed).to(device)
        changed = (places[:, None, :] < inner[None, :, None]).view(n, len(inner), 1, h, w)  # (N, K - 2, 1, H, W)
        curves[name] = {}
        for kind in kinds:
            start, end = ends[kind]
            middle = [] if len(inner) else [image_p.new_empty(n, 0)]  # a step of 100 %: the ends alone
            for i in range(0, n if len(inner) else 0, per_chunk):
                steps = torch.where(changed[i:i + per_chunk], end[i:i + per_chunk, None], start[i:i + per_chunk, None])
                chunk_targets = targets[i:i + per_chunk, None].expand(-1, len(inner))
                middle.append(target_probabilities(model, steps.flatten(0, 1), chunk_targets.flatten()).view(-1, len(inner)))
            first, last = end_points[kind]
            probabilities = torch.cat([first[:, None], torch.cat(middle), last[:, None]], 1).double().cpu()
            curves[name][kind] = Curve(fractions=fractions, probabilities=probabilities,
                                       auc=trapezoid(fractions, probabilities))
    return curves


def deletion(model, images, targets, maps, step=DELETION_STEP, seed=0):
    return perturbation_curve(model, images, targets, maps, "deletion", step, seed)


def insertion(model, images, targets, maps, step=DELETION_STEP, seed=0):
    return perturbation_curve(model, images, targets, maps, "insertion", step, seed)


# --------------------------------------------------------------------------- ROAD

# The imputation's neighbour weights (Rong et al.): 1/6 for the 4 edge neighbours, 1/12 for the 4
# diagonal ones, 0 for the pixel itself; they sum to 1.
EDGE_WEIGHT, DIAGONAL_WEIGHT = 1 / 6, 1 / 12
assert EDGE_WEIGHT == 2 * DIAGONAL_WEIGHT  # neighbour_sum's separable (1 2 1) passes rest on it


def neighbour_sum(v):
    """sum_q w_q v(p + q) over the 8 neighbours q of every pixel p of v (B, H, W), those outside the
    image left out. The weights are (1 2 1)^T (1 2 1) / 12 less the centre's 4 / 12, so two passes of
    (1 2 1), each a shifted add into the slices that have the neighbour: no padding, few temporaries
    (8x faster than padded shifts, and than a 3x3 conv2d, on a CPU)."""
    rows = v * 2
    rows[:, :, 1:] += v[:, :, :-1]
    rows[:, :, :-1] += v[:, :, 1:]
    out = rows * 2
    out[:, 1:] += rows[:, :-1]
    out[:, :-1] += rows[:, 1:]
    return out.sub_(v, alpha=4).mul_(DIAGONAL_WEIGHT)


def conjugate_gradients(x, mask, tol):
    """road_impute's systems for the images x (B, H, W) and their removed pixels (mask, 1 where removed):
    the solution, 0 on the kept pixels. Each system stops at a residual norm of tol times its right
    side's; those that have converged leave the batch, a few at a time. The steps update in place:
    the vectors are small and the arithmetic little, so a new tensor per operation would be most of
    the time."""
    h, w = x.shape[-2:]
    tiny = torch.finfo(x.dtype).tiny  # guards the divisions of a system already solved
    dot = lambda a, b: torch.linalg.vecdot(a.flatten(1), b.flatten(1))  # per system
    right = mask * neighbour_sum(x * (1 - mask))
    solution = torch.zeros_like(x)
    active = torch.arange(len(x), device=x.device)  # the systems still iterating, and their state below
    inverse_diagonal = 1 / (neighbour_sum(torch.ones_like(x)) * mask + (1 - mask))  # 1 / W_p; 1 on kept pixels
    diagonal = 1 / inverse_diagonal
    v = torch.zeros_like(x)
    residual = right.clone()
    direction = residual * inverse_diagonal
    rz = dot(residual, direction)
    limit = tol * right.flatten(1).norm(dim=1)
    for _ in range(h * w + 1):  # CG is exact in at most as many steps as unknowns
        done = residual.flatten(1).norm(dim=1) <= limit
        if done.all() or done.sum() * 8 >= len(done):  # keep the converged systems' solutions
            solution[active[done]] = v[done]
            going = ~done
            active, mask, diagonal, inverse_diagonal, v, residual, direction, rz, limit = (
                t[going] for t in (active, mask, diagonal, inverse_diagonal, v, residual, direction, rz, limit))
            if len(active) == 0:
                break
        a_direction = (diagonal * direction).sub_(neighbour_sum(direction)).mul_(mask)  # the matrix, 0 on kept pixels
        step = (rz / dot(direction, a_direction).clamp_min(tiny))[:, None, None]
        v.addcmul_(step, direction)
        residual.addcmul_(step, a_direction, value=-1)
        z = residual * inverse_diagonal
        rz_next = dot(residual, z)
        direction = z.addcmul_((rz_next / rz.clamp_min(tiny))[:, None, None], direction)
        rz = rz_next
    solution[active] = v  # none left unless h * w + 1 steps were not enough (rounding)
    return solution


def road_impute(images, removed, noise=ROAD_NOISE, generator=None, tol=None):
    """Rong et al.'s noisy linear imputation: every removed pixel becomes the weighted mean of its 8
    neighbours (EDGE_WEIGHT, DIAGONAL_WEIGHT, renormalised over those inside the image), removed
    neighbours included, so all removed pixels of an image are one sparse linear system, per colour:
        W_p v_p - sum_{q removed} w_pq v_q = sum_{q kept} w_pq x_q    for each removed p,
    W_p = sum of w_pq over p's neighbours in the image; then N(0, noise^2) is added to each solved value.
    The system is symmetric (w_pq = w_qp) and positive definite (every group of removed pixels
    touches a kept one, unless all are removed), and is solved by Jacobi-preconditioned conjugate
    gradients (conjugate_gradients, SOLVE_BLOCK systems at a time) in the images' precision (float64
    for float64 images, else float32), each to a residual norm of tol (default SOLVER_TOLERANCE of that
    precision) times its right side's. images: float (N, C, H, W) in [0, 1]; removed: bool (N, H, W),
    not every pixel of an image; generator: the noise's. Returns float32 (N, C, H, W), float64 for
    float64 images: kept pixels unchanged."""
    n, c, h, w = images.shape
    if removed.shape != (n, h, w):
        raise ValueError(f"removed must be (N, H, W) = {(n, h, w)}, got {tuple(removed.shape)}")
    if removed.flatten(1).all(1).any():
        raise ValueError("road_impute needs at least one kept pixel in each image")
    dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    tol = SOLVER_TOLERANCE[dtype] if tol is None else tol
    x = images.to(dtype).flatten(0, 1)                                   # (B, H, W), one system a colour
    mask = removed.to(x.device).repeat_interleave(c, 0).to(dtype)        # 1 where removed
    # on a CPU in blocks of SOLVE_BLOCK systems, whose vectors stay in its cache (2.3x faster than 1485
    # at once); on a GPU all at once, as each step's kernels take as long for one system as for many
    block = SOLVE_BLOCK if x.device.type == "cpu" else max(len(x), 1)
    solution = torch.cat([conjugate_gradients(x[i:i + block], mask[i:i + block], tol)
                          for i in range(0, len(x), block)])
    if noise:
        solution = solution + noise * torch.randn(solution.shape, generator=generator, dtype=solution.dtype).to(x.device)
    out = torch.where(mask.bool(), solution, x)
    return out.view(n, c, h, w)


@dataclass
class RoadScores:
    """ROAD of N images at each removal level, in one order."""
    levels: list             # percent removed
    order: str               # "MoRF" (most relevant removed first) or "LeRF" (least relevant first)
    correct: torch.Tensor    # (N, levels) bool: still classified as the target

    @property
    def accuracy(self):
        """The fraction of images still classified as the target, per level: a list."""
        return self.correct.double().mean(0).tolist()

    @property
    def mean(self):
        """The mean of accuracy over the levels (Rong et al.'s summary of a curve)."""
        return self.correct.double().mean().item()


def road(model, images, targets, maps, order="MoRF", levels=ROAD_LEVELS, noise=ROAD_NOISE, seed=0):
    """ROAD (see the module's docstring) for each image and level; the imputation's noise is drawn
    from a generator seeded with `seed`, and pixel ties broken with it too. images: uint8
    (N, 3, H, W); targets (N,); maps (N, 3, H, W) or (N, h, w). Level 0 removes nothing."""
    if order not in ("MoRF", "LeRF"):
        raise ValueError(f"unknown order {order!r}; choose MoRF or LeRF")
    parameter = next(model.parameters())
    device = parameter.device
    n, _, h, w = images.shape
    places = ranks(maps, seed)
    if order == "LeRF":
        places = h * w - 1 - places
    counts = torch.tensor([round(level / 100 * h * w) for level in levels])
    removed = (places[:, None, :] < counts[None, :, None]).view(n * len(levels), h, w)
    pixels = (images.to(device).float() / 255).repeat_interleave(len(levels), 0)  # imputed on the model's device
    generator = torch.Generator().manual_seed(seed)
    per_chunk = max(1, CHUNK // len(levels)) * len(levels)
    mean, std = mean_std(device)
    correct = []
    for i in range(0, len(pixels), per_chunk):
        imputed = road_impute(pixels[i:i + per_chunk], removed[i:i + per_chunk], noise, generator)
        correct.append(predictions(model, ((imputed - mean) / std).to(parameter.dtype)).cpu())
    correct = torch.cat(correct).view(n, len(levels)) == targets.cpu()[:, None]
    return RoadScores(levels=list(levels), order=order, correct=correct)
