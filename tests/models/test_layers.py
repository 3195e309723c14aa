"""--list_layers and the hookable taps of kd's CIFAR networks (what the reference projects hook)."""

from __future__ import annotations

import torch

from kd.cli import main
from kd.models.build import build_model
from kd.train.hooks import feature_shapes


def test_list_layers_prints_every_module_a_forward_pass_runs_with_its_shape(capsys):
    assert main(["--flags_file", "none", "--list_layers", "cifar:vgg8", "--image_size", "32"]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[3:]}
    assert rows["relu2"][:2] == ["ReLU", "256×8×8"] and rows["block2"][:2] == ["Sequential", "256×8×8"]
    assert rows["pool4"][1] == "512×1×1" and rows["classifier"][1:] == ["10", "5,130"]
    assert list(rows).index("block0") < list(rows).index("relu0") < list(rows).index("classifier")


def test_list_layers_of_an_unknown_network_is_one_line(capsys):
    assert main(["--flags_file", "none", "--list_layers", "no_such_net"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --list_layers: unknown model 'no_such_net'") and "\n" not in err


def test_list_layers_of_a_network_that_cannot_take_the_image_size_is_one_line(tmp_path, capsys):
    (tmp_path / "net.py").write_text(
        "import torch\nclass Net(torch.nn.Module):\n    def __init__(self, num_classes):\n        super().__init__()\n"
        "        self.fc = torch.nn.Linear(3 * 64 * 64, num_classes)\n"
        "    def forward(self, x):\n        return self.fc(x.flatten(1))\n")
    assert main(["--flags_file", "none", "--list_layers", f"{tmp_path / 'net.py'}:Net", "--image_size", "32"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --list_layers") and "\n" not in err


def test_the_pooled_vector_and_pre_activations_are_modules_to_hook():
    shapes = {arch: feature_shapes(build_model(arch, 100), layers, 32, "--student_layers")
              for arch, layers in {"cifar:wrn_16_2": ["avgpool"], "cifar:ShuffleV2": ["avgpool", "relu"],
                                   "cifar:ShuffleV1": ["avgpool"], "cifar:resnet20": ["layer3.2.preact"]}.items()}
    assert shapes["cifar:wrn_16_2"]["avgpool"] == (128, 1, 1)
    assert shapes["cifar:ShuffleV2"] == {"avgpool": (1024, 1, 1), "relu": (1024, 4, 4)}
    assert shapes["cifar:ShuffleV1"]["avgpool"] == (960, 1, 1)
    assert shapes["cifar:resnet20"]["layer3.2.preact"] == (64, 8, 8)


def test_a_tap_sees_what_the_references_compute_there():
    torch.manual_seed(0)
    vgg, resnet = build_model("cifar:vgg8", 100).eval(), build_model("cifar:resnet20", 100).eval()
    seen = {}
    vgg.block2.register_forward_hook(lambda m, i, o: seen.__setitem__("block2", o))
    vgg.relu2.register_forward_hook(lambda m, i, o: seen.__setitem__("relu2", o))
    block = resnet.layer3[2]
    block.preact.register_forward_hook(lambda m, i, o: seen.__setitem__("preact", o))
    block.register_forward_hook(lambda m, i, o: seen.__setitem__("block", o))
    with torch.no_grad():
        vgg(torch.randn(2, 3, 32, 32))
        resnet(torch.randn(2, 3, 32, 32))
    assert torch.equal(seen["relu2"], torch.relu(seen["block2"])) and (seen["block2"] < 0).any()
    assert torch.equal(seen["block"], torch.relu(seen["preact"])) and (seen["preact"] < 0).any()


def test_a_hooked_module_keeps_its_own_output_when_an_in_place_relu_follows():
    """WRN's bn1 is followed by ReLU(inplace=True): the hooked features are still the BN's, negatives included."""
    from kd.train.hooks import FeatureHooks

    torch.manual_seed(0)
    wrn = build_model("cifar:wrn_16_2", 100).eval()
    seen = {}
    wrn.bn1.register_forward_hook(lambda m, i, o: seen.__setitem__("bn1", o.clone()))
    hooks = FeatureHooks(wrn, ["bn1"], "--teacher_layers")
    with torch.no_grad():
        wrn(torch.randn(2, 3, 32, 32))
    features = hooks.take()["bn1"]
    hooks.remove()
    assert (features < 0).any() and torch.equal(features, seen["bn1"])
