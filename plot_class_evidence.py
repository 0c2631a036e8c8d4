"""Class evidence: which pixels made the network give each test image the logit of a class, by five
methods (visualize.attribution): Grad-CAM, the gradient (saliency), SmoothGrad, integrated gradients
and occlusion.

    python plot_class_evidence.py [--images 4531-4546] [--target predicted|true|<class index or name>]
                                  [--methods gradcam,saliency,smoothgrad,integrated_gradients,occlusion]
                                  [--layer conv4_x,conv3_x] [--samples 50] [--sigma 0.15] [--seed 0]
                                  [--steps 50] [--window 8] [--stride 4]

One row a test image: the image with its true class, the class the network says and its probability,
then one column a method, each the evidence for the --target class's logit y_c (before the softmax):
Grad-CAM at each --layer over the image, the pixel maps summed over colour in red (raises y_c) and
blue (lowers it); visualize/evidence.py says how each is drawn, visualize/attribution.py each
method's conventions (baseline, sign, upsampling). Saved: class_evidence.png and, beside it,
class_evidence.json = {"images", "target", "methods", "options", "per_image": [{"index", "true",
"true_name", "predicted", "predicted_name", "probability" (of the predicted class), "target",
"target_name", "target_probability", "maps": {method (gradcam_<layer>): the map as attribute returns
it, (32, 32) or (3, 32, 32)}}]}; every choice that is not the default is added to both names.
"""
import utils
from visualize import cli, evidence
from visualize.attribution import ATTRIBUTION_METHODS, DEFAULT_OPTIONS, GRADCAM_LAYERS


def main(argv=None):
    p = cli.plot_parser(__doc__, script=__file__, images=evidence.DEFAULT_IMAGES)
    p.add_argument("--target", default="predicted",
                   help="whose logit the maps explain: predicted, true, or a class index 0..C-1 or name (default: "
                        "%(default)s)")
    p.add_argument("--methods", default=",".join(ATTRIBUTION_METHODS), type=evidence.parse_methods,
                   help=f"any of {', '.join(ATTRIBUTION_METHODS)}, comma-separated, one column each, in this "
                        f"order (default: %(default)s)")
    p.add_argument("--layer", default=",".join(evidence.DEFAULT_LAYERS), type=evidence.parse_gradcam_layers,
                   help=f"Grad-CAM's stages, any of {', '.join(GRADCAM_LAYERS)}, comma-separated, one column "
                        f"each (default: %(default)s)")
    smooth, ig, occlusion = (DEFAULT_OPTIONS[m] for m in ("smoothgrad", "integrated_gradients", "occlusion"))
    p.add_argument("--samples", type=int, default=smooth["n"],
                   help="SmoothGrad's n noisy copies, at least 1 (default: %(default)s)")
    p.add_argument("--sigma", type=float, default=smooth["sigma"],
                   help="SmoothGrad's noise, a fraction of each image's range, 0 or above (default: %(default)s)")
    p.add_argument("--seed", type=int, default=smooth["seed"],
                   help="SmoothGrad's noise, 0..2**63-1 (default: %(default)s)")
    p.add_argument("--steps", type=int, default=ig["m"],
                   help="integrated gradients' m steps, at least 1 (default: %(default)s)")
    p.add_argument("--window", type=int, default=occlusion["k"],
                   help="occlusion's k x k window, 1..32 (default: %(default)s)")
    p.add_argument("--stride", type=int, default=occlusion["s"],
                   help="occlusion's stride, 1..32 (default: %(default)s)")
    args = p.parse_args(argv)
    options = evidence.method_options(args)
    run = p.load(args)
    target = evidence.parse_target(args.target, run.classes)
    return evidence.plot_class_evidence(run, args.images, target, args.methods, args.layer, options,
                                        args.figures_dir, p.figure_record(args, "class_evidence", run))


if __name__ == "__main__":
    utils.run_cli(main)
