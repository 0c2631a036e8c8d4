"""figures/index.html (visualize/page.py): every figure of a folder, escaped, linked relatively, and,
in a real browser (headless Chromium), every image loaded, every link resolved and the atlas sortable.

The figures are the real plot scripts' output at width 4 on a few images, trained on data whose class
names and folder name are HTML (a class `<script>alert(1)</script>`), with two files the page does not
know by name, one of them named with HTML too.
"""
import json
import re
import shlex
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch

import cifar10
from conftest import run_in_process
from visualize import cli, page

HOSTILE = "<script>alert(1)</script>"
CLASSES = [HOSTILE, 'a&b "c"'] + [f"class-{k}" for k in range(2, 10)]
STRANGE_PNG = "extra <b>&'.png"  # a figure the page does not know, with a name that is HTML
SCRIPT_ARGS = [  # the real scripts, small: (script, flags)
    ("plot_learning_progress.py", []),
    ("plot_conv1_filters.py", []),
    ("plot_conv1_feature_map.py", ["--image-index", "3"]),
    ("plot_conv1_reconstructed_pattern.py", ["--images", "0-1"]),
    ("plot_conv5_reconstructed_pattern_trunk.py", ["--images", "0-1", "--method", "guided", "--top1"]),
    ("plot_unit_atlas.py", ["--layer", "conv2_x,conv5_x", "--channels", "0-3", "--ablation-images", "32"]),
    ("plot_gradient_pattern.py", ["--steps", "2"]),
    ("plot_feature_visualization.py", ["--steps", "2", "--channels", "0-1"]),
    ("plot_sanity_checks.py", ["--images", "0-1"]),
]
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    """A folder of figures from a width-4 checkpoint trained for 12 iterations, and index.html in it."""
    root = tmp_path_factory.mktemp("page")
    data_dir = root / 'data <i>&"x"'
    cifar10.write_cifar10_folder(data_dir, *cifar10.make_synthetic_images(256, seed=1), *cifar10.make_synthetic_images(64, seed=2),
                              CLASSES)
    checkpoint, folder = root / "ckpt.pt", root / "figures"
    proc = run_in_process("train.py", ["--data-dir", str(data_dir), "--width", "4", "--iterations", "12",
                                       "--checkpoint", str(checkpoint), "--figures-dir", str(root / "train")])
    assert proc.returncode == 0, proc.stderr
    for script, flags in SCRIPT_ARGS:
        proc = run_in_process(script, [*flags, "--checkpoint", str(checkpoint), "--figures-dir", str(folder)])
        assert proc.returncode == 0, f"{script}: {proc.stderr}"
    shutil.copyfile(folder / "conv1_filters_rgb.png", folder / STRANGE_PNG)
    (folder / "mystery.json").write_text('{"what": "a file no script of this version writes"}\n')
    path = page.write_page(folder, checkpoint, torch.device("cpu"))
    return path, checkpoint, data_dir


class Page(HTMLParser):
    """What a test needs of a page: every element's tag and attributes, its text, and the atlas table's
    column keys and rows (each row its cells' data-value)."""

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.elements, self.text, self.keys, self.rows, self._atlas, self._part = [], [], [], [], False, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.elements.append((tag, attrs))
        if tag == "table":
            self._atlas = attrs.get("id") == "atlas-units"
        elif tag in ("thead", "tbody"):
            self._part = tag
        elif self._atlas and tag == "th" and self._part == "thead":
            self.keys.append(attrs["data-key"])
        elif self._atlas and tag == "tr" and self._part == "tbody":
            self.rows.append([])
        elif self._atlas and tag == "td":
            self.rows[-1].append(attrs.get("data-value"))

    def handle_endtag(self, tag):
        if tag == "table":
            self._atlas = False

    def handle_data(self, text):
        self.text.append(text)

    def all(self, tag, attribute=None):
        return [a for t, a in self.elements if t == tag and (attribute is None or attribute in a)]


def column(parsed, name):
    """The data-values of one column of the atlas table, in the order of its rows."""
    return [row[parsed.keys.index(name)] for row in parsed.rows]


def atlas_records(folder):
    return [json.loads(p.read_text()) for p in sorted(folder.glob("atlas_*.json"))]


def test_everything_from_the_checkpoint_or_the_data_is_text(figures):
    path, checkpoint, data_dir = figures
    text = path.read_text()
    assert HOSTILE not in text and "<i>" not in text and "<b>" not in text
    parsed = Page(text)
    assert len(parsed.all("script")) == 1  # the page's own
    shown = "".join(parsed.text)
    for name in [*CLASSES, str(data_dir), STRANGE_PNG]:
        assert name in shown, name  # as text, after the HTML's escapes are read back


def test_every_link_is_relative_and_names_a_file_of_the_folder(figures):
    path, _, _ = figures
    parsed = Page(path.read_text())
    links = [a["href"] for a in parsed.all("a", "href")] + [img["src"] for img in parsed.all("img", "src")]
    ids = {a["id"] for _, a in parsed.elements if "id" in a}
    files = {p.name for p in path.parent.iterdir()}
    assert len(links) > 30
    for link in links:
        parts = urlsplit(link)
        assert not parts.scheme and not parts.netloc and not link.startswith("/"), link
        if parts.path:
            assert "/" not in unquote(parts.path) and unquote(parts.path) in files, link
        elif not parts.fragment.startswith("sort="):
            assert parts.fragment in ids, link
    # every file of the folder is on the page: shown, or linked beside its figure, or among the others
    assert {unquote(urlsplit(link).path) for link in links} >= files - {page.PAGE}


def test_figures_go_to_their_sections_with_the_command_that_draws_them(figures):
    path, checkpoint, _ = figures
    sections, atlas, others = page.classify_files(path.parent)
    assert sorted(others) == sorted([STRANGE_PNG, "mystery.json"])
    names = {key: [f.name for f in found] for key, found in sections.items()}
    assert names["progress"] == ["train_accuracy.png", "train_loss.png", "test_accuracy.png", "test_loss.png"]
    assert names["atlas"] == ["atlas_conv2_x_channels0-3_ablation-images32.png",
                              "atlas_conv5_x_channels0-3_ablation-images32.png"]
    assert names["reconstructions"] == ["conv1_channel0_reconstructions_images0-1.png",  # the deconvnet before guided
                                        "conv5_x_channel1_reconstructions_trunk_guided_top1_images0-1.png"]
    commands = {f.name: f.command for found in sections.values() for f in found}
    run = f"--checkpoint {checkpoint} --figures-dir {path.parent}"
    assert commands["conv5_x_channel1_reconstructions_trunk_guided_top1_images0-1.png"] == \
        f"python plot_conv5_reconstructed_pattern_trunk.py --images 0-1 --top1 --method guided {run}"
    assert commands["atlas_conv2_x_channels0-3_ablation-images32.png"] == \
        f"python plot_unit_atlas.py --layer conv2_x,conv5_x --channels 0-3 --ablation-images 32 {run}"
    assert commands["sanity_conv5_x_channel1_images0-1.png"] == f"python plot_sanity_checks.py --images 0-1 {run}"
    beside = {f.name: f.beside for found in sections.values() for f in found}
    assert beside["feature_visualization_conv5_x_channels0-1_steps2.png"] == \
        ["feature_visualization_conv5_x_channels0-1_steps2.json", "feature_visualization_conv5_x_channels0-1_steps2.pt"]
    assert beside["sanity_conv5_x_channel1_images0-1.png"] == ["sanity_conv5_x_channel1_images0-1.json"]


def test_the_tables_hold_the_jsons_numbers(figures):
    path, _, _ = figures
    parsed = Page(path.read_text())
    units = [(r["layer"], u) for r in atlas_records(path.parent) for u in r["units"]]
    assert len(parsed.rows) == len(units) == 8
    assert column(parsed, "stage") == [layer for layer, _ in units]
    assert [float(v) for v in column(parsed, "selectivity")] == [u["selectivity"] for _, u in units]
    lost = [100 * (u["ablation"]["unablated_accuracy"] - u["ablation"]["accuracy"]) for _, u in units]
    assert [float(v) for v in column(parsed, "lost")] == pytest.approx(lost, abs=1e-9)
    assert all(v in CLASSES for v in column(parsed, "leading") if v != "none (silent)")
    sanity = json.loads((path.parent / "sanity_conv5_x_channel1_images0-1.json").read_text())
    text = path.read_text()
    for technique, values in sanity["similarity"].items():
        row = f"<th>{page.e(technique)}</th>" + "".join(page.cell(v) for v in values)
        assert row in text, technique


def test_a_json_of_a_layout_it_does_not_pin_shows_its_scalars_and_leaves_out_its_maps():
    # the layouts plot_trust.py and plot_class_evidence.py write: a row per technique, a row per image
    trust = {"count": 4, "unit": {"layer": "conv5_x", "channel": 1},
             "rows": {"guided": {"kind": "unit", "weights_top": 0.91, "passes": {"weights": False, "class": True}},
                      HOSTILE: {"kind": "class", "deletion": 0.125, "weights_top": None, "passes": {}}}}
    parsed = Page(page.json_table(trust))
    # the columns in the order of the row with the most of them
    assert [th.get("data-key") for th in parsed.all("th", "data-key")] == ["name", "kind", "deletion", "weights_top",
                                                                           "passes"]
    assert len(parsed.all("script")) == 0 and HOSTILE in parsed.text
    assert [td["data-value"] for td in parsed.all("td")] == ["unit", "NaN", "0.91", "weights no, class yes",
                                                             "class", "0.125", "NaN", ""]
    evidence = {"images": [1, 2], "options": {"smoothgrad": {"n": 50}},
                "per_image": [{"index": i, "true_name": HOSTILE, "probability": 0.5,
                               "maps": {"saliency": [[0.25] * 32] * 32}} for i in (1, 2)]}
    parsed = Page(page.json_table(evidence))
    assert [th["data-key"] for th in parsed.all("th", "data-key")] == ["index", "true_name", "probability"]
    assert [td["data-value"] for td in parsed.all("td")] == ["1", HOSTILE, "0.5", "2", HOSTILE, "0.5"]


def test_the_trust_table_shows_each_mean_with_its_standard_error_and_the_verdicts():
    record = {"rows": {"guided": {"kind": "unit picture", "weights: top": 0.9006, "weights: top SE": 0.037,
                                  "passes": {"weights": "fail"}, "cascade": [0.9, 0.8]},
                       HOSTILE: {"kind": "class map", "weights: top": 0.25, "weights: top SE": 0.1, "class": None,
                                 "class SE": None, "passes": {"weights": "pass", "class": "pass"}},
                       "random map": {"kind": "baseline", "weights: top": 1.0, "weights: top SE": 0.0, "passes": {}}}}
    parsed = Page(page.trust_table(record))
    assert [th["data-key"] for th in parsed.all("th", "data-key")] == ["technique", "kind", "weights: top", "class",
                                                                       "verdicts"]
    assert len(parsed.all("script")) == 0 and HOSTILE in parsed.text
    # each cell sorts by the mean itself and shows it with its standard error
    assert [td["data-value"] for td in parsed.all("td")] == [
        "unit picture", "0.9006", "NaN", "weights fail",
        "class map", "0.25", "NaN", "weights pass, class pass",
        "baseline", "1.0", "NaN", "reference"]
    shown = [text for text in parsed.text if text.strip()]
    assert shown[shown.index("guided"):] == [
        "guided", "unit picture", "0.90 ±0.04", "n/a", "weights fail",
        HOSTILE, "class map", "0.25 ±0.10", "undefined", "weights pass, class pass",
        "random map", "baseline", "1.00 ±0.00", "n/a", "reference"]


def test_the_run_is_described_from_the_checkpoint(figures):
    path, checkpoint, data_dir = figures
    ckpt = torch.load(checkpoint, weights_only=True)
    shown = " ".join(Page(path.read_text()).text)
    assert "width-4 ResNet-18" in shown and "CIFAR-10? no" in shown.replace("  ", " ")
    assert f"{100 * ckpt['history']['test_acc'][-1]:.2f} % at iteration 12" in shown
    for key, value in ckpt["config"].items():
        if key not in ("classes", "data_name"):
            assert key in shown and str(value) in shown, key


def test_writing_the_page_is_quick(figures):
    """Under a second is the budget in plot_all.py; on this tiny folder it must be far under."""
    path, checkpoint, _ = figures
    import time
    began = time.perf_counter()
    page.write_page(path.parent, checkpoint, torch.device("cpu"))
    assert time.perf_counter() - began < 1.0


# --------------------------------------------------------------------------- in a real browser

def browser():
    return shutil.which("chromium") or shutil.which("chromium-browser")


def rendered(path, fragment, tmp_path):
    """The page's DOM after Chromium loaded it from disk with `fragment` and ran its script."""
    proc = subprocess.run([browser(), *BROWSER_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                           path.as_uri() + fragment], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "</html>" in proc.stdout, proc.stderr[-2000:]
    return Page(proc.stdout)


@pytest.mark.skipif(browser() is None, reason="no Chromium installed (apt-get install -y chromium; .ci/run does)")
def test_in_a_browser_every_image_loads_every_link_resolves_and_the_atlas_sorts(figures, tmp_path):
    path, _, _ = figures
    before = Page(path.read_text())
    dom = rendered(path, "#sort=selectivity-desc&selftest", tmp_path)
    # no script but the page's own, and the hostile class name is text in the table
    assert len(dom.all("script")) == 1 and HOSTILE in "".join(dom.text)
    images = dom.all("img")
    assert len(images) == len(before.all("img")) > 15
    for img in images:
        assert int(img.get("data-natural-width", 0)) > 0, img["src"]
    for link in [a["href"] for a in dom.all("a", "href")] + [img["src"] for img in images]:
        target = unquote(urlsplit(link).path)
        if target:
            assert (path.parent / target).is_file(), link
    # sorted by selectivity, largest first: the same rows, in another order than the page's own
    written = [float(v) for v in column(before, "selectivity")]
    shown = [float(v) for v in column(dom, "selectivity")]
    assert shown == sorted(written, reverse=True) and written != shown
    # each row moved whole: its channel and stage go with its selectivity
    rows = sorted(zip(column(before, "selectivity"), column(before, "stage"), column(before, "channel")),
                  key=lambda r: -float(r[0]))
    assert list(zip(column(dom, "selectivity"), column(dom, "stage"), column(dom, "channel"))) == rows
    ascending = rendered(path, "#sort=selectivity-asc", tmp_path)
    assert [float(v) for v in column(ascending, "selectivity")] == sorted(written)


# --------------------------------------------------------------------------- the figure's record

def test_a_figures_command_parses_back_to_its_flags_and_its_names_carry_the_changed_ones(tmp_path):
    p = cli.plot_parser("", script="plot_x.py", images="4531-4546", layer="conv5_x", channel=1, top1=False,
                        method="deconvnet")
    p.add_argument("--seed", type=int, default=0)
    argv = ["--images", "0-2,5", "--top1", "--method", "guided", "--checkpoint", str(tmp_path / "my run.pt"),
            "--figures-dir", str(tmp_path)]
    args = p.parse_args(argv)
    record = p.figure_record(args, "reconstructions")
    assert record["changed"] == {"--images": "0-2,5", "--top1": True, "--method": "guided"}
    assert record["flags"] == {"--images": "0-2,5", "--layer": "conv5_x", "--channel": "1", "--top1": True,
                               "--method": "guided", "--seed": "0"}
    assert record["checkpoint"] == str((tmp_path / "my run.pt").resolve())
    words = shlex.split(record["command"])
    assert words[:2] == ["python", "plot_x.py"]
    assert vars(p.parse_args(words[2:])) == vars(args)  # the command is the run, quoted
    assert cli.name_suffix(record) == "_images0-2,5_top1_method-guided"
    assert cli.name_suffix(record, carried=("--method", "--top1")) == "_images0-2,5"
    assert cli.name_suffix(p.figure_record(p.parse_args(["--figures-dir", str(tmp_path)]), "reconstructions")) == ""


def test_a_quick_run_takes_its_own_defaults_and_says_so_in_its_names(tmp_path):
    p = cli.plot_parser("", script="plot_x.py", images="4531-4546")
    p.add_quick("fewer images", images="4531-4534")
    runs = {"full": [], "quick": ["--quick"], "quick, images given": ["--quick", "--images", "0-1"]}
    args = {name: p.parse_args([*argv, "--figures-dir", str(tmp_path)]) for name, argv in runs.items()}
    assert [a.images for a in args.values()] == [list(range(4531, 4547)), list(range(4531, 4535)), [0, 1]]
    records = {name: p.figure_record(a, "sanity") for name, a in args.items()}
    assert [r["changed"] for r in records.values()] == [{}, {"--quick": True}, {"--images": "0-1", "--quick": True}]
    assert records["quick"]["flags"]["--images"] == "4531-4534"
    assert [cli.name_suffix(r) for r in records.values()] == ["", "_quick", "_images0-1_quick"]
    assert [cli.is_quick(r) for r in records.values()] == [False, True, True]
    assert p.parse_args(["--figures-dir", str(tmp_path)]).images == list(range(4531, 4547))  # defaults restored


def written(proc):
    return {Path(line).name for line in re.findall(r"^wrote (.+)$", proc.stdout, flags=re.M)}


# the flags whose file names once left them out: two runs of each, other flags, one folder
TWO_RUNS = [
    ("plot_sanity_checks.py", ["--images", "0", "--fv-steps", "1", "--pattern-steps", "1"],
     ["--images", "1", "--fv-steps", "1", "--pattern-steps", "1", "--seed", "3"]),
    ("plot_gradient_pattern.py", ["--steps", "1"], ["--steps", "1", "--lr", "0.1", "--image-index", "3"]),
    ("plot_conv1_reconstructed_pattern.py", ["--images", "0"], ["--images", "1"]),
    ("plot_feature_visualization.py", ["--steps", "1", "--channels", "0"],
     ["--steps", "1", "--channels", "1", "--seed", "2"]),
]

REDRAWN = {"plot_gradient_pattern.py", "plot_conv1_reconstructed_pattern.py"}  # the quick ones: each command run again


@pytest.mark.parametrize("script, first, second", TWO_RUNS, ids=[t[0] for t in TWO_RUNS])
def test_two_runs_with_other_flags_write_other_files_each_redrawn_by_its_command(figures, tmp_path, script, first,
                                                                                 second):
    _, checkpoint, _ = figures
    folder, run = tmp_path / "figures", ["--checkpoint", str(checkpoint), "--figures-dir", str(tmp_path / "figures")]
    procs = [run_in_process(script, [*flags, *run]) for flags in (first, second)]
    assert all(proc.returncode == 0 for proc in procs), [proc.stderr for proc in procs]
    files = [written(proc) for proc in procs]
    assert files[0] and files[1] and not files[0] & files[1]
    assert {p.name for p in folder.iterdir()} == files[0] | files[1]  # none overwritten
    sections, _, others = page.classify_files(folder, checkpoint, torch.load(checkpoint, weights_only=True)["iteration"])
    shown = [f for found in sections.values() for f in found]
    assert len(shown) == 2 and not others
    for figure, flags, names in zip(sorted(shown, key=lambda f: f.name not in files[0]), (first, second), files):
        record = json.loads((folder / figure.name.replace(".png", ".json")).read_text())["figure"]
        assert figure.command == record["command"]  # the page gives the record's command
        words = shlex.split(figure.command)  # every flag here takes a value: compare them as pairs
        given = [*flags, *run]
        assert words[1] == script and dict(zip(words[2::2], words[3::2])) == dict(zip(given[::2], given[1::2]))
        if script in REDRAWN:
            for name in names:
                (folder / name).unlink()
            proc = run_in_process(script, words[2:])  # and it draws the same files again
            assert proc.returncode == 0 and written(proc) == names, proc.stderr


def test_the_pages_command_for_every_figure_is_its_records(figures):
    path, _, _ = figures
    sections, _, _ = page.classify_files(path.parent)
    shown = [f for found in sections.values() for f in found]
    assert len(shown) == 16  # every PNG of the fixture but the one without a record
    text = path.read_text()
    for figure in shown:
        record = json.loads((path.parent / figure.name.replace(".png", ".json")).read_text())["figure"]
        assert figure.command == record["command"] and f"<code>{page.e(record['command'])}</code>" in text


def test_a_figure_of_another_checkpoint_is_listed_as_such(figures, tmp_path):
    path, checkpoint, _ = figures
    folder = tmp_path / "figures"
    folder.mkdir()
    for name in ("conv1_feature_maps_image3.png", "conv1_feature_maps_image3.json"):
        shutil.copyfile(path.parent / name, folder / name)
    other = tmp_path / "other.pt"
    shutil.copyfile(checkpoint, other)  # the same network, but another file: not this page's run
    proc = run_in_process("plot_conv1_feature_map.py", ["--image-index", "5", "--checkpoint", str(other),
                                                        "--figures-dir", str(folder)])
    assert proc.returncode == 0, proc.stderr
    later = json.loads((folder / "conv1_feature_maps_image3.json").read_text())  # this file, trained further
    later["figure"]["iteration"] += 100
    shutil.copyfile(folder / "conv1_feature_maps_image3.png", folder / "conv1_feature_maps_image3_later.png")
    (folder / "conv1_feature_maps_image3_later.json").write_text(json.dumps(later))
    iteration = torch.load(checkpoint, weights_only=True)["iteration"]
    sections, _, others = page.classify_files(folder, checkpoint, iteration)
    assert [f.name for f in sections["maps"]] == ["conv1_feature_maps_image3.png"]
    assert [(f.name, f.subsection) for f in sections["elsewhere"]] == [
        ("conv1_feature_maps_image3_later.png", f"Drawn from {checkpoint.resolve()} at iteration {iteration + 100}, "
                                                f"not this page's run"),
        ("conv1_feature_maps_image5.png", f"Drawn from {other.resolve()} at iteration {iteration}, not this page's run")]
    assert not others
    parsed = Page(page.write_page(folder, checkpoint, torch.device("cpu")).read_text())
    shown = "".join(parsed.text)
    assert "Figures of other checkpoints" in shown and f"Drawn from {other.resolve()}" in shown
