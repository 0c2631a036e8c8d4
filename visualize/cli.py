"""The plot scripts' command line: the flags they share, each parsed once into the value the figure
modules take, and the checks that make it one they can trust. Every bad value gets one line
(utils.UserError) naming the flag and what it accepts, before any figure is computed.

    parser = cli.plot_parser(__doc__, script=__file__, layer="conv5_x", channel=1)
    args = parser.parse_args(argv)  # flags checked that need nothing loaded (--figures-dir included)
    run = parser.load(args)         # the PlotRun; then the flags that need the network or the test split
    channels = args.channels.of(run.model, args.layer)  # which channels --channels names depends on the network
    figure = parser.figure_record(args, "kind", run)  # the JSON's "figure": what the page needs of it
    name = "base" + cli.name_suffix(figure, carried=("--layer",))  # every other flag not at its default

parser.add_quick(...) gives a script --quick: other defaults for the flags whose numbers are estimates.
"""
import argparse
import contextlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

from model import METHODS, PATHS, STAGES
from speed import resolve_device
from utils import OneLineArgumentParser, UserError, check_writable
from visualize.context import load_run, load_snapshots
from visualize.drawing import FEATURE_MAP_TILES, SCALES, format_indices
from visualize.units import ABLATION_IMAGES

RUN_FLAGS = ("checkpoint", "data_dir", "synthetic", "figures_dir", "device")  # which run, not which figure
MAX_IMAGES = 64  # test images a figure may show (--images): beyond that the panels are too small to read
CHANNELS_AUTO_HELP = (f"; auto: every channel of a stage with at most {FEATURE_MAP_TILES}, else the "
                      f"{FEATURE_MAP_TILES} with the largest maximum on the image, most active first")


class PlotParser(OneLineArgumentParser):
    """The flags every plot script has, plus the shared ones it asked for (`shared`, their names).

    Knowing which it has, it checks them: parse_args those that need nothing loaded, load() the
    rest once the checkpoint and test split are in. A script's own flags are its own to check.
    """

    def __init__(self, doc, script=None):
        super().__init__(prog=Path(script).name if script else None, description=doc,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
        self.shared = set()
        self.quick_defaults = {}  # add_quick: the defaults of a --quick run, by dest
        self.script = self.prog  # the file name a figure's command names (the script's, also under plot_all.py)
        self.add_argument("--checkpoint", default="checkpoints/resnet18_cifar10.pt",
                          help="checkpoint written by train.py (default: %(default)s)")
        self.add_argument("--data-dir", help="folder holding cifar-10-batches-py/ (default: the checkpoint's)")
        self.add_argument("--synthetic", action=argparse.BooleanOptionalAction, default=None,
                          help="use the synthetic gratings, not CIFAR-10 (default: whatever the checkpoint was "
                               "trained on)")
        self.add_argument("--figures-dir", default="figures", help="where the PNGs go (default: %(default)s/)")
        self.add_argument("--device", default="auto", type=resolve_device,
                          help="auto (a CUDA GPU, else an Apple GPU (mps), else the CPU), cpu, cuda, mps, ... "
                               "(default: auto)")

    def add_shared(self, name, *args, **kwargs):
        self.shared.add(name)
        self.add_argument(*args, **kwargs)

    def add_ascent_flags(self, steps, lr, penalty, lr_help, penalty_help):
        """--steps, --lr and --penalty of an optimisation in input space, each range-checked."""
        self.add_shared("ascent", "--steps", type=int, default=steps, help="optimisation steps, at least 1 "
                                                                           "(default: %(default)s)")
        self.add_argument("--lr", type=float, default=lr, help=f"{lr_help}, above 0 (default: %(default)s)")
        self.add_argument("--penalty", type=float, default=penalty, help=f"{penalty_help}, 0 or above "
                                                                         f"(default: %(default)s)")

    def add_quick(self, what, **defaults):
        """--quick: a first look, the flags `defaults` (dest: value, as the command line would give it)
        taking these defaults instead of the full run's; `what` says what is cut, for --help. A flag
        given on the command line still wins. The file names carry it (_quick), as any flag changed."""
        self.quick_defaults = defaults
        self.add_argument("--quick", action="store_true",
                          help=f"a first look, quick: {what}; the figure and its file names say so "
                               f"(default: the full run)")

    @contextlib.contextmanager
    def quick_run(self, quick):
        """Within it, the parser's defaults are the --quick run's (when `quick`)."""
        saved = {dest: self.get_default(dest) for dest in self.quick_defaults}
        if quick:
            self.set_defaults(**self.quick_defaults)
        try:
            yield
        finally:
            self.set_defaults(**saved)

    def defaults(self, quick=False):
        """Every flag's default (the --quick run's with `quick`), types applied as to a given value."""
        with self.quick_run(quick):
            return vars(argparse.ArgumentParser.parse_args(self, []))

    def parse_args(self, args=None, namespace=None):
        quick = bool(self.quick_defaults) and super().parse_known_args(args)[0].quick
        with self.quick_run(quick):
            args = super().parse_args(args, namespace)
        if "layer" in self.shared:
            check_layer(args.layer)
        if "path" in self.shared:
            check_path(args.path)
        if "ascent" in self.shared:
            check_ascent(args.steps, args.lr, args.penalty)
        check_writable(args.figures_dir, "--figures-dir", folder=True)
        return args

    def figure_record(self, args, kind, run=None):
        """What the page needs of a figure, for the JSON beside it (its key "figure"): {"kind", "script",
        "flags" (every flag of the figure's own, as text, defaults included), "changed" (those not at
        their default: a --quick run's defaults are its own), "command" (the line that draws it again:
        the changed flags and the run's), "checkpoint" (its absolute path) and, given the PlotRun,
        "iteration" (how far that checkpoint was trained)}. name_suffix(record) names the files."""
        defaults = self.defaults(quick=getattr(args, "quick", False))
        flags, changed, run_words = {}, {}, []
        for action in self._actions:
            if not action.option_strings or action.dest == "help":
                continue
            flag = next(o for o in action.option_strings if o.startswith("--"))
            value, default = flag_text(getattr(args, action.dest)), flag_text(defaults[action.dest])
            if action.dest in RUN_FLAGS:
                if value != default and value is not None:
                    run_words.append(switch_text(flag, value))
                continue
            flags[flag] = value
            if value != default:
                changed[flag] = value
        words = [f"python {self.script}", *(switch_text(f, v) for f, v in changed.items()), *run_words]
        record = {"kind": kind, "script": self.script, "flags": flags, "changed": changed,
                  "command": " ".join(w for w in words if w), "checkpoint": str(Path(args.checkpoint).resolve())}
        if run is not None:
            record["iteration"] = run.checkpoint.get("iteration")
        return record

    def load(self, args, test_split=True):
        """The PlotRun the flags name, then the flags checked against it: --channel and --channels against
        --layer of this network, the test image indices and --ablation-images against the test split."""
        run = load_run(args.checkpoint, args.device, args.data_dir, args.synthetic, test_split)
        self.check_run(args, run, test_split)
        return run

    def load_snapshots(self, args):
        """[(epoch, PlotRun)] of the snapshots beside --checkpoint (context.load_snapshots), the flags
        checked against the last as load() checks them against the checkpoint."""
        runs = load_snapshots(args.checkpoint, args.device, args.data_dir, args.synthetic)
        self.check_run(args, runs[-1][1])
        return runs

    def check_run(self, args, run, test_split=True):
        """load()'s checks of the flags against a loaded run."""
        if "channel" in self.shared:
            check_channel(run.model, args.layer, args.channel)
        if "channels" in self.shared and args.channels is not None:
            args.channels.check(run.model, args.layers if "layers" in self.shared else [args.layer])
        if test_split:
            for name in ("images", "image_index"):
                value = getattr(args, name) if name in self.shared else None
                if value is not None:
                    check_image_indices(value if name == "images" else [value], len(run.images))
            if "ablation_images" in self.shared and args.ablation_images is not None \
                    and not 1 <= args.ablation_images <= len(run.images):
                raise UserError(f"--ablation-images {args.ablation_images} is out of range: the test split has "
                                f"{len(run.images)} images; choose 1..{len(run.images)}")


def flag_text(value):
    """A parsed flag's value as its command line writes it: a list of indices as 4531-4546, a list of
    names comma-separated, a switch as True/False, a device by its name; None for a flag left unset."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, ChannelChoice):
        return value.text
    if isinstance(value, (list, tuple)):
        if all(type(v) is int for v in value):
            return format_indices(list(value))
        return ",".join(flag_text(v) for v in value)
    return str(value)


def name_suffix(record, carried=()):
    """The file name's part for every flag of a figure_record not at its default, except the flags
    `carried` (those its name writes its own way): '_images0-3_seed2', '_quick'; '' for the defaults.
    So two runs with other flags never write the same file."""
    words = []
    for flag, value in record["changed"].items():
        if flag in carried or value is None:
            continue
        name = flag[2:]
        if isinstance(value, bool):
            word = name if value else f"no-{name}"
        else:  # images0-3, lr0.1; a word after a dash: target-true, channels-all
            word = name + ("" if value[:1].isdigit() else "-") + value
        words.append(re.sub(r"[^A-Za-z0-9.,+=-]", "-", word))  # a file name on every system
    return "".join(f"_{word}" for word in words)


def is_quick(record):
    """Whether a figure_record is of a --quick run (None: no record, the full run)."""
    return bool(record and record["flags"].get("--quick"))


def switch_text(flag, value):
    """'--flag value' as a command line gives it ('--flag' / '--no-flag' for a switch, '' for unset)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    if value.startswith("-"):  # argparse would read "-8:8:1" as a flag of its own
        return f"{flag}={quote_word(value)}"
    return f"{flag} {quote_word(value)}"


def quote_word(text):
    """`text` as one word of a command line on any shell: double-quoted if it holds a space."""
    return f'"{text}"' if any(c.isspace() for c in text) or not text else text


TOP_ACTIVATING = "the top-activating one"  # plot_parser(image_index=...): no index unless one is given


def plot_parser(doc, script=None, image_index=None, images=None, layer=None, layers=None, channel=None, path=None, channels=None,
                stage_channels=None, top1=None, scale=None, method=None, ablation_images=False):
    """A PlotParser with the shared flags whose default is given here (None: the script has no such flag);
    script: the plot script's __file__, whose name its figures' commands give (also when plot_all.py runs it).

    image_index=TOP_ACTIVATING: --image-index without a default (the figure finds its image). layers:
    --layer naming several stages (args.layers, a list). stage_channels: --channels of each of those
    stages, unset by default (the words say what that means). ablation_images: --ablation-images."""
    p = PlotParser(doc, script)
    if image_index is not None:
        top = image_index == TOP_ACTIVATING
        p.add_shared("image_index", "--image-index", type=int, default=None if top else image_index,
                     help=f"index of the test image (default: {image_index if top else '%(default)s'})")
    if images is not None:
        p.add_shared("images", "--images", default=images, type=parse_indices,
                     help=f"test image indices: a range A-B (inclusive), a list 1,2,3 or both mixed; at most "
                          f"{MAX_IMAGES} a figure (default: %(default)s)")
    if layer is not None:
        p.add_shared("layer", "--layer", default=layer, help=f"one of {', '.join(STAGES)} (default: %(default)s)")
    if layers is not None:
        p.add_shared("layers", "--layer", dest="layers", default=layers, type=parse_layers,
                     help=f"stages, a comma list from {', '.join(STAGES)} (default: %(default)s)")
    if channel is not None:
        p.add_shared("channel", "--channel", type=int, default=channel,
                     help="channel (filter) of --layer, 0..C-1 (default: %(default)s)")
    if path is not None:
        p.add_shared("path", "--path", default=path, help=f"where the signal goes back at the residual sums "
                                                          f"of --layer: {', '.join(PATHS)} (default: %(default)s)")
    if channels is not None:
        p.add_shared("channels", "--channels", default=channels, type=channel_choice,
                     help=f"channels of --layer: a range A-B (inclusive), a list 1,2,3 or both mixed, or 'all'"
                          f"{CHANNELS_AUTO_HELP if channels == 'auto' else ''} (default: %(default)s)")
    if stage_channels is not None:
        p.add_shared("channels", "--channels", type=channel_choice, help=f"channels of each stage, as --images elsewhere: a range A-B, "
                                                    f"a list 1,2,3 or both mixed, or all (default: {stage_channels})")
    if ablation_images:
        p.add_shared("ablation_images", "--ablation-images", type=int,
                     help=f"ablate each channel on the first N test images (default: {ABLATION_IMAGES}, "
                          f"or all of a smaller test split)")
    if top1 is not None:
        p.add_argument("--top1", action=argparse.BooleanOptionalAction, default=top1,
                       help="project only the channel's strongest activation in each image, as Zeiler & Fergus "
                            "(default: the whole feature map)")
    if scale is not None:
        p.add_argument("--scale", choices=SCALES, default=scale,
                       help="image: each reconstruction scaled to its own max|r|; shared: one max|r| for all "
                            "panels, so their strengths compare (default: %(default)s)")
    if method is not None:
        p.add_argument("--method", choices=METHODS, default=method,
                       help="the way back to the pixels (ResNet.reconstruct): deconvnet (Zeiler & Fergus, the "
                            "report's), guided (guided backpropagation) or gradient (default: %(default)s)")
    return p


def parse_indices(text, flag="--images", what="test image indices", example="4531-4546", limit=MAX_IMAGES):
    """'4531-4546' -> [4531, ..., 4546]; '1,2,3' -> [1, 2, 3]; both forms may be mixed: '1,5-7'.

    flag, what and example name the flag in the error for text that is not such a list. At most
    `limit` indices (None: any number), counted before any list is made. drawing.format_indices
    writes a list back as text.
    """
    return expand(index_ranges(text, flag, what, example), text, flag, what, example, limit)


def index_ranges(text, flag, what, example):
    """parse_indices' ranges, none made into a list yet."""
    ranges = []
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            first, last = int(first), int(last or first)
            if last < first:
                raise ValueError
            ranges.append(range(first, last + 1))
    except ValueError:
        raise UserError(f"{flag} {text!r} is not a list of {what}; "
                        f"write a range like {example} or a list like 1,2,3") from None
    return ranges


def expand(ranges, text, flag, what, example, limit):
    """The indices of `ranges`, in order, if there are at most `limit` (None: any number)."""
    count = sum(map(len, ranges))
    if limit is not None and count > limit:
        raise UserError(f"{flag} {text} names {count} {what}, but at most {limit} fit here; "
                        f"pick fewer, e.g. {example}")
    return [i for r in ranges for i in r]


@dataclass(frozen=True)
class ChannelChoice:
    """--channels as parsed (channel_choice): 'auto' (the figure chooses), 'all', or index ranges. Which
    channels these are depends on the network: check() them against it, then of() gives a stage's."""
    text: str
    ranges: tuple = ()

    def check(self, model, layers):
        """UserError unless every channel named is one of each of `layers` (none too many to list)."""
        if self.text not in ("auto", "all"):
            for layer in layers:
                for channel in self.indices(max(model.channels(name) for name in layers)):
                    check_channel(model, layer, channel, flag="--channels: channel")

    def indices(self, limit):
        return expand(self.ranges, self.text, "--channels", "channel indices", "0-15", limit)

    def of(self, model, layer):
        """The channels of `layer` chosen: None for 'auto', every one for 'all', else those named."""
        if self.text == "auto":
            return None
        if self.text == "all":
            return list(range(model.channels(layer)))
        return self.indices(None)


def channel_choice(text):
    """--channels text -> a ChannelChoice; one line for text that is no list of channels."""
    if text in ("auto", "all"):
        return ChannelChoice(text)
    return ChannelChoice(text, tuple(index_ranges(text, "--channels", "channel indices", "0-15")))


def check_layer(layer):
    if layer not in STAGES:
        raise UserError(f"--layer {layer!r} is not a stage of the network; choose one of {', '.join(STAGES)}")


def parse_layers(text):
    """'conv2_x,conv5_x' -> ['conv2_x', 'conv5_x'], each checked."""
    layers = [name.strip() for name in text.split(",") if name.strip()]
    if not layers:
        raise UserError(f"--layer {text!r} names no stage; choose from {', '.join(STAGES)}")
    for layer in layers:
        check_layer(layer)
    return list(dict.fromkeys(layers))


def check_channel(model, layer, channel, flag="--channel"):
    """model.check_channel's range check, as one line that names the flag."""
    try:
        model.check_channel(layer, channel, name=flag)
    except ValueError as err:
        raise UserError(str(err)) from None


def check_image_indices(indices, num_images):
    bad = [i for i in indices if not 0 <= i < num_images]
    if bad:
        raise UserError(f"test image index {bad[0]} is out of range: the test split has {num_images} "
                        f"images; choose 0..{num_images - 1}")


def check_path(path):
    if path not in PATHS:
        raise UserError(f"--path {path!r} is not a deconvnet path; choose one of {', '.join(PATHS)}")


def check_seed(seed):
    """--seed of the scripts that draw at random (a torch generator's seed): 0..2^63-1."""
    if not 0 <= seed < 2 ** 63:
        raise UserError(f"--seed {seed}: must be in 0..{2 ** 63 - 1}")


def check_ascent(steps, lr, penalty):
    """The optimisation flags of plot_gradient_pattern.py and plot_feature_visualization.py: each
    out-of-range one gets its own line."""
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    if not (math.isfinite(lr) and lr > 0):
        raise UserError(f"--lr must be a finite number above 0, got {lr}")
    if not (math.isfinite(penalty) and penalty >= 0):
        raise UserError(f"--penalty must be a finite number, 0 or above (0: no pull towards the start image), "
                        f"got {penalty}")
