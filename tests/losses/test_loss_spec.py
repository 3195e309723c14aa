"""The one resolution of a run's losses (kd.losses.spec): every setting in force with where it came from, read alike
by the objective, the stage record, --tune's space and the report's provenance."""

from __future__ import annotations

import re

import pytest

from kd.config import Config
from kd.errors import KDError
from kd.losses.objective import build_objective
from kd.losses.base import Range
from kd.losses.spec import DEFAULT, Setting, losses_in_force, resolve_losses
from kd.report.provenance import temperature as recorded_temperature
from kd.run.plan import with_weights_in_force
from kd.tune.space import search_space


def _sources(c: Config, key: str) -> dict[str, tuple[object, str]]:
    loss = next(loss for loss in resolve_losses(c).losses if loss.key == key)
    return {name: (setting.value, setting.source) for name, setting in loss.settings.items()}


@pytest.mark.parametrize("flags, value, source", [
    ({}, 4.0, DEFAULT),
    ({"temperature": 2.0}, 2.0, "--temperature"),
    ({"temperature": 2.0, "loss_options": ["temperature=3"]}, 3, "--loss_options temperature"),
    ({"temperature": 2.0, "loss_options": ["temperature=3", "kl_softmax.temperature=5"]}, 5,
     "--loss_options kl_softmax.temperature"),
])
def test_a_losss_own_option_beats_a_shared_one_beats_temperature_beats_the_paper(flags, value, source):
    c = Config(kd_loss=["kl_softmax", "dkd"], **flags)
    assert _sources(c, "kl_softmax")["temperature"] == (value, source)
    objective = build_objective(resolve_losses(c), num_classes=5)
    assert objective.losses["kl_softmax"].temperature == value  # what trains is what the resolution says


def test_weights_come_from_the_flags_or_the_papers_with_their_source():
    papers = resolve_losses(Config(kd_loss=["kl_softmax", "dkd"]))
    assert [(loss.weight.value, loss.weight.source) for loss in papers.losses] == [(0.9, DEFAULT), (1.0, DEFAULT)]
    assert (papers.ce_weight.value, papers.ce_weight.source) == (0.1, DEFAULT)  # the smallest paper CE weight
    given = resolve_losses(Config(kd_loss=["kl_softmax", "dkd"], kd_weights=[0.5, 2.0], ce_weight=0.3))
    assert [loss.weight.source for loss in given.losses] == ["--kd_weights"] * 2
    assert given.weights == [0.5, 2.0] and (given.ce_weight.value, given.ce_weight.source) == (0.3, "--ce_weight")
    assert given.ce_weight.default == 0.1 and given.losses[1].weight.default == 1.0


def test_the_stage_record_the_tune_and_the_report_read_the_same_resolution():
    c = Config(kd_loss=["kl_softmax"], loss_options=["kl_softmax.temperature=6"], tune=4)
    recorded = with_weights_in_force(c)
    assert (recorded.temperature, recorded.kd_weights, recorded.ce_weight) == (6.0, [0.9], 0.1)
    assert "kl_softmax.temperature" not in search_space(c)  # fixed by its option, so not searched
    assert recorded_temperature({"kd_loss": ["kl_softmax", "dkd"]}) == "4 (kl_softmax's default), 4 (dkd's default)"


def test_what_a_run_needs_is_read_from_the_resolution():
    losses = resolve_losses(Config(kd_loss=["kl_softmax", "crd"]))
    assert losses.features and [loss.key for loss in losses.needing("indices")] == ["crd"]
    assert not resolve_losses(Config(kd_loss=["dkd"])).features


def test_a_user_loss_taking_any_setting_gets_what_the_flags_give(tmp_path):
    (tmp_path / "mine.py").write_text("from torch import nn\n"
                                      "class Loose(nn.Module):\n"
                                      "    def __init__(self, **settings):\n"
                                      "        super().__init__()\n"
                                      "        self.settings = settings\n"
                                      "    def forward(self, s, t, y):\n"
                                      "        return (s - t).pow(2).mean()\n")
    spec = f"{tmp_path / 'mine.py'}:Loose"
    losses = losses_in_force([spec], [], None, 3.0, ["Loose.beta=2"])
    loose = losses.losses[0]
    assert loose.accepts_any and loose.options == {"temperature": 3.0, "beta": 2}
    assert losses.temperature == 3.0  # a loss taking anything: no single temperature of its own to record


@pytest.mark.parametrize("specs, weights, options, message", [
    ([], [], [], "--kd_loss: name at least one distillation loss"),
    (["kl_softmax", "kl_softmax"], [], [], "names a loss twice"),
    (["kl_softmax"], [1.0, 2.0], [], "--kd_weights: 2 weight(s) for 1 loss(es)"),
    (["kl_softmax"], [], ["kl_softmax.beta=2"], "--loss_options kl_softmax.beta: kl_softmax has no setting beta"),
    (["kl_softmax"], [], ["num_classes=3"], "--loss_options: num_classes is set by kd"),
])
def test_settings_that_do_not_fit_are_refused_once_for_every_reader(specs, weights, options, message):
    with pytest.raises(KDError, match=re.escape(message)):
        losses_in_force(specs, weights, None, None, options)


@pytest.mark.parametrize("temperature, options, message", [
    (None, ["kl_softmax.temperature=abc"], "--loss_options kl_softmax.temperature: kl_softmax's temperature is a "
                                           "number (its paper's is 4), not 'abc'"),
    (None, ["temperature=-1"], "--loss_options temperature: a softmax temperature must be above 0, got -1"),
    (0.0, [], "--temperature: a softmax temperature must be above 0, got 0"),
    (None, ["dkd.beta=[1, 2]"], "--loss_options dkd.beta: dkd's beta is a number (its paper's is 8), not [1, 2]"),
])
def test_values_a_loss_cannot_use_are_refused_naming_the_option(temperature, options, message):
    with pytest.raises(KDError, match=re.escape(message)):
        losses_in_force(["kl_softmax", "dkd"], [], None, temperature, options)


def test_a_loss_taking_any_setting_still_declares_its_named_ones(tmp_path):
    """``__init__(self, temperature=4.0, **rest)``: its temperature has a default the tune and the report can read."""
    (tmp_path / "mine.py").write_text("from torch import nn\n"
                                      "from kd.losses.base import Range\n"
                                      "class Open(nn.Module):\n"
                                      "    space = {'temperature': Range(1.0, 8.0)}\n"
                                      "    def __init__(self, temperature=4.0, **rest):\n"
                                      "        super().__init__()\n"
                                      "    def forward(self, s, t, y):\n"
                                      "        return (s - t).pow(2).mean()\n")
    spec = f"{tmp_path / 'mine.py'}:Open"
    loss = losses_in_force([spec], [], None, None, []).losses[0]
    assert loss.accepts_any and loss.settings["temperature"] == Setting(4.0, DEFAULT, 4.0) and loss.options == {}
    space = search_space(Config(kd_loss=[spec], tune=2))
    assert {name: bounds for name, bounds in space.items() if "." in name} == {"Open.temperature": Range(1.0, 8.0)}
