"""What each stage had learned, and when, in numbers: each stage at each snapshot train.py kept
(train.py --snapshots; snapshots.py), as one figure of curves (visualize/dynamics.py states every
convention).

    python plot_learning_dynamics.py [--checkpoint checkpoints/resnet18_cifar10.pt] [--images 1000]
        [--probe-images 5000] [--threshold 0.9] [--count 64] [--seed 0] [--quick]

    convergence   linear CKA (Kornblith et al. 2019) between each stage's representation at the snapshot
                  and at the last one, on the first --images test images (each image's stage output
                  flattened), and the first epoch from which it stays at or above --threshold: Zeiler &
                  Fergus's "lower layers converge first", printed as a table
    probes        a linear probe's test accuracy (Alain & Bengio 2016: multinomial logistic regression
                  on the stage's globally averaged channels, fitted on the first --probe-images training
                  images), and the stage's mean class selectivity (the unit atlas's)
    evidence      for Grad-CAM at conv4_x and the plain gradient, the trust table's class test (rho to
                  a random other class's map) and ROAD gap (LeRF - MoRF), each a mean with its standard
                  error on the first --count test images, beside the network's test accuracy

Saved: dynamics.png and dynamics.json = {"figure", "epochs", "iterations", "test_acc", "images",
"threshold", "probe_images", "probe_l2", "count", "seed", "stages": {stage: {"cka", "converged_epoch",
"probe_accuracy", "selectivity"}: a list over the snapshots each}, "evidence": {"Grad-CAM conv4_x" |
"saliency": {"class", "class SE", "ROAD gap", "ROAD gap SE"}}}; a non-default choice is added to both
names (dynamics_images500_count16.png; dynamics_quick.png: --quick takes 250, 1,000 and 16 images, and
scores the probes and the selectivity on the first 2,000 test images). --checkpoint names the run: its
snapshots are the files of <checkpoint>.snapshots/ (or pass that folder).
"""
import math

import utils
from visualize import cli, dynamics
from visualize.context import QUICK_SPLIT


def main(argv=None):
    p = cli.plot_parser(__doc__, script=__file__)
    p.add_argument("--images", type=int,
                   help=f"the first N test images the CKA is measured on, 2..the split's size (default: "
                        f"{dynamics.IMAGES}, or the whole split if smaller)")
    p.add_argument("--probe-images", type=int,
                   help=f"the first N training images the probes are fitted on, 2..the split's size (default: "
                        f"{dynamics.PROBE_IMAGES}, or the whole split if smaller)")
    p.add_argument("--threshold", type=float, default=dynamics.THRESHOLD,
                   help="the CKA to the last snapshot from which a stage counts as converged, in (0, 1] "
                        "(default: %(default)s)")
    p.add_argument("--count", type=int,
                   help=f"the first N test images Grad-CAM's and the gradient's class test and ROAD are measured "
                        f"on, 2..the split's size (default: {dynamics.COUNT}, or the whole split if smaller)")
    p.add_argument("--seed", type=int, default=0,
                   help="the random other class's and ROAD's noise, 0..2^63-1 (default: %(default)s)")
    p.add_quick(f"the CKA on {dynamics.QUICK_IMAGES} test images, the probes fitted on {dynamics.QUICK_PROBE_IMAGES} "
                f"training images and the evidence on {dynamics.QUICK_COUNT}, unless a flag says; the probes' test "
                f"accuracy and the selectivity on the first {QUICK_SPLIT} test images")
    args = p.parse_args(argv)
    if not (math.isfinite(args.threshold) and 0 < args.threshold <= 1):
        raise utils.UserError(f"--threshold {args.threshold}: a CKA threshold must lie in (0, 1]; the default is "
                              f"{dynamics.THRESHOLD}")
    cli.check_seed(args.seed)
    flags = (("--images", "images", dynamics.QUICK_IMAGES if args.quick else dynamics.IMAGES),
             ("--probe-images", "probe_images", dynamics.QUICK_PROBE_IMAGES if args.quick else dynamics.PROBE_IMAGES),
             ("--count", "count", dynamics.QUICK_COUNT if args.quick else dynamics.COUNT))
    for flag, name, _ in flags:
        if getattr(args, name) is not None and getattr(args, name) < 2:
            raise utils.UserError(f"{flag} {getattr(args, name)}: must be at least 2 (a spread needs two images)")
    runs = p.load_snapshots(args)
    sizes = dict(images=len(runs[-1][1].images), count=len(runs[-1][1].images),
                 probe_images=len(dynamics.training_split(runs[-1][1])[0]))
    chosen = {}
    for flag, name, default in flags:
        split = "training" if name == "probe_images" else "test"
        value = getattr(args, name)
        if value is not None and value > sizes[name]:
            raise utils.UserError(f"{flag} {value} is out of range: the {split} split has {sizes[name]} images; "
                                  f"choose 2..{sizes[name]}")
        chosen[name] = min(default, sizes[name]) if value is None else value
    split = QUICK_SPLIT if args.quick else None
    numbers = dynamics.learning_dynamics(runs, chosen["images"], chosen["probe_images"], chosen["count"], args.seed,
                                         split)
    changed = [(name, chosen[name]) for _, name, default in flags if chosen[name] != min(default, sizes[name])]
    changed += [(name, getattr(args, name)) for name, default in (("threshold", dynamics.THRESHOLD), ("seed", 0))
                if getattr(args, name) != default]
    suffix = "".join(f"_{name.replace('_images', '')}{value:g}" for name, value in changed)
    suffix += "_quick" if args.quick else ""
    return dynamics.plot_learning_dynamics(numbers, args.figures_dir, chosen["images"], chosen["probe_images"],
                                           chosen["count"], args.seed, args.threshold,
                                           {"figure": p.figure_record(args, "learning_dynamics")}, suffix, split)


if __name__ == "__main__":
    utils.run_cli(main)
