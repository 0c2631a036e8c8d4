"""Each unit's numbers (visualize/units.py): class selectivity and ablation, each against an
independent route: ResNet.capture's activations and the whole network's forward pass with a hook."""
import pytest
import torch

import cifar10

import data
import checkpoint
from visualize import scoring, units
from model import ResNet


def direct_selectivity(acts, labels):
    """Morcos et al.'s index of every channel of the captured maps acts (N, C, H, W), by plain Python:
    mu_c the mean over the images of class c of the map's mean, (mu_max - mu_rest) / (mu_max + mu_rest)."""
    means = acts.double().mean((2, 3))
    classes = sorted(set(labels.tolist()))
    result = []
    for channel in range(acts.shape[1]):
        mu = [means[labels == c, channel].mean().item() for c in classes]
        mu_max = max(mu)
        mu_rest = (sum(mu) - mu_max) / (len(mu) - 1)
        result.append(0.0 if mu_max == 0 else (mu_max - mu_rest) / (mu_max + mu_rest))
    return result


def test_selectivity_equals_the_captured_activations_silent_is_0_one_class_is_1(one_thread):
    """Known data: class 0 bright, classes 1-3 dark. conv1 channel 0 sums its 3x3x3 input with positive
    weights, so it fires on bright images only; channel 1's BN shift keeps it below 0 on every image."""
    torch.manual_seed(0)
    model = ResNet(4).eval()
    with torch.no_grad():
        model.conv1.conv.weight[0] = 1 / 27
        bn = model.conv1.bn
        bn.running_mean[:2], bn.running_var[:2], bn.weight[:2] = 0, 1, 1
        bn.bias[0], bn.bias[1] = -0.01, -1e3
    labels = torch.arange(200) % 4
    images = torch.randint(0, 40, (200, 3, 32, 32), dtype=torch.uint8)
    images[labels == 0] = torch.randint(200, 256, images[labels == 0].shape, dtype=torch.uint8)
    layers = ["conv1", "conv3_x"]
    scores = scoring.score_units(model, images, layers, batch_size=64)  # the atlas's pass
    with torch.no_grad(), model.capture(*layers) as acts:
        model(data.normalize(images))
    for layer in layers:
        selectivity, leading = units.class_selectivity(scores[layer].mean, labels)
        expected = direct_selectivity(acts[layer], labels)
        assert selectivity.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-9), layer
        active = acts[layer].double().mean((2, 3))
        for channel, lead in enumerate(leading.tolist()):
            if expected[channel] > 0:
                mu = [active[labels == c, channel].mean().item() for c in range(4)]
                assert lead == max(range(4), key=mu.__getitem__)
    selectivity, leading = units.class_selectivity(scores["conv1"].mean, labels)
    assert (acts["conv1"][labels != 0, 0] == 0).all() and (acts["conv1"][labels == 0, 0] > 0).all()
    assert selectivity[0] == 1 and leading[0] == 0  # fires on class 0 only
    assert (acts["conv1"][:, 1] == 0).all()
    assert selectivity[1] == 0 and leading[1] == -1  # silent
    assert 0 < selectivity[2:].min() and selectivity[2:].max() < 1  # the untouched channels lie between


def hooked_predictions(model, x, layer, channel):
    """model(x)'s classes with `channel` of stage `layer`'s output zeroed by a forward hook: the
    whole network runs, from the pixels."""
    def zero_channel(module, inputs, output):
        output = output.clone()
        output[:, channel] = 0
        return output
    handle = model.stage(layer).register_forward_hook(zero_channel)
    try:
        with torch.no_grad():
            return model(x).argmax(1)
    finally:
        handle.remove()


def test_ablation_equals_the_whole_network_with_the_channel_hooked_to_0(trained_checkpoint, small_data_dir,
                                                                        one_thread):
    model, ckpt = checkpoint.load_checkpoint(trained_checkpoint)
    images, labels, _ = cifar10.load_cifar10(cifar10.dataset_root(small_data_dir, False), train=False)
    images, labels = images[:300], labels[:300]
    classes = ckpt["config"]["classes"]
    channels = {"conv2_x": [0, 3, 5, 7], "conv4_x": [1, 20, 31]}
    # batches of 64 (the last one partial), three channels a batch: the groups straddle both
    unablated, ablated = units.ablate(model, images, channels, batch_size=64, group=3)
    x = data.normalize(images)
    with torch.no_grad():
        assert torch.equal(unablated, model(x).argmax(1))
    changed = 0
    for layer, layer_channels in channels.items():
        assert ablated[layer].shape == (300, len(layer_channels))
        for column, channel in enumerate(layer_channels):
            expected = hooked_predictions(model, x, layer, channel)
            assert torch.equal(ablated[layer][:, column], expected), (layer, channel)
            changed += (expected != unablated).sum().item()
            effect = units.ablation_effect(ablated[layer][:, column], unablated, labels, classes)
            # the per-class accuracies, by plain Python over the hooked predictions
            right = (expected == labels).tolist()
            right_before = (unablated == labels).tolist()
            per_class = {}
            for k in sorted(set(labels.tolist())):
                rows = [i for i in range(300) if labels[i] == k]
                per_class[k] = (sum(right_before[i] for i in rows) / len(rows), sum(right[i] for i in rows) / len(rows))
            drops = {k: before - after for k, (before, after) in per_class.items()}
            worst = max(drops, key=lambda k: (drops[k], -k))
            assert effect == pytest.approx(dict(
                images=300, accuracy=sum(right) / 300, unablated_accuracy=sum(right_before) / 300,
                **{"class": classes[worst]}, class_accuracy=per_class[worst][1],
                class_unablated_accuracy=per_class[worst][0], class_drop=drops[worst]))
    assert changed > 0  # some ablation changed some prediction: the comparison can fail
    assert (unablated == labels).double().mean() > 0.3  # a trained network, well above chance
