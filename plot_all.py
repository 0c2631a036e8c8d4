"""Every figure, in one Python process: each plot script's own code, run with its defaults (the
report's figures, the unit atlas, the feature visualization and the sanity checks), on one checkpoint;
last, figures/index.html (visualize.page): one page with every figure in the folder and the run.

    python plot_all.py [--checkpoint checkpoints/resnet18_cifar10.pt] [--figures-dir figures] [--quick]

--quick draws every figure as a first look: where a number is an estimate over test images, over
fewer of them (each script's --quick: the atlas's ablations, the sanity checks' images, the trust
table's, the learning dynamics'), the feature visualization with fewer steps, and the snapshots'
figures over the first 2,000 test images; each such figure, its file names (_quick) and the page say
so, so a quick run and the full one never overwrite each other.

The checkpoint and the test split are loaded once, and one pass over the test split scores every
stage for all the scripts, whichever asks first (visualize.context.test_split_scores:
the atlas's units, the gradient pattern's search), so this is much faster than running the scripts one
by one. Prints every file it writes, and the time each script took (bench_figures.py reads them, as a
multiple of one forward pass of the test split).
"""
import importlib
import time

import utils
from visualize import cli, context, page
from visualize.context import QUICK_SPLIT

# Run in this order (any order computes the same: what they share is computed once, by whichever
# needs it first); a new figure script is one more line.
SCRIPTS = (
    "plot_learning_progress",
    "plot_conv1_filters",
    "plot_conv1_feature_map",
    "plot_conv5_feature_map",
    "plot_conv1_reconstructed_pattern",
    "plot_conv5_reconstructed_pattern_shortcut",
    "plot_conv5_reconstructed_pattern_trunk",
    "plot_unit_atlas",
    "plot_gradient_pattern",
    "plot_feature_visualization",
    "plot_sanity_checks",
    "plot_class_evidence",
    "plot_trust",  # after the sanity checks: its unit rows are their numbers (sanity.unit_sanity_checks)
    "plot_invariance",
    "plot_occlusion",
)
# The figures of training, drawn where train.py kept snapshots beside the checkpoint (they share one
# pass over the test split per snapshot)
SNAPSHOT_SCRIPTS = ("plot_feature_evolution", "plot_learning_dynamics")
QUICK = {"plot_unit_atlas", "plot_sanity_checks", "plot_trust", "plot_feature_visualization",  # with a --quick
         "plot_feature_evolution", "plot_learning_dynamics"}


def main(argv=None):
    parser = cli.plot_parser(__doc__, script=__file__)
    parser.add_argument("--quick", action="store_true",
                        help=f"a first look: {', '.join(sorted(QUICK))} with --quick: their estimates over fewer "
                             f"test images, the feature visualization with fewer steps, the snapshots' figures over "
                             f"the first {QUICK_SPLIT} test images (default: the full run)")
    args = parser.parse_args(argv)
    shared = ["--checkpoint", args.checkpoint, "--figures-dir", args.figures_dir, "--device", str(args.device)]
    if args.data_dir is not None:
        shared += ["--data-dir", args.data_dir]
    if args.synthetic is not None:
        shared += ["--synthetic" if args.synthetic else "--no-synthetic"]
    start = time.perf_counter()
    paths = []
    scripts = SCRIPTS
    if context.has_snapshots(args.checkpoint):
        scripts += SNAPSHOT_SCRIPTS
    else:
        print(f"{', '.join(f'{name}.py' for name in SNAPSHOT_SCRIPTS)}: skipped, {args.checkpoint} has no snapshots "
              f"(train.py --snapshots keeps them)")
    for name in scripts:
        began = time.perf_counter()
        written = importlib.import_module(name).main(shared + (["--quick"] if args.quick and name in QUICK else []))
        print(f"{name}.py: {len(written)} files in {time.perf_counter() - began:.1f} s")
        paths += written
    began = time.perf_counter()
    paths.append(page.write_page(args.figures_dir, args.checkpoint, args.device, args.data_dir, args.synthetic))
    print(f"index.html: in {time.perf_counter() - began:.2f} s")
    print(f"plot_all.py: {len(paths)} files in {args.figures_dir}/ in {time.perf_counter() - start:.1f} s")
    return paths


if __name__ == "__main__":
    utils.run_cli(main)
