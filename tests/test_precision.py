"""A stage's training precision on a CPU: timed, not read off the CPU flags
(imgclf.train.precision), saved in the checkpoint and kept by a resume."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn as nn

from helpers_train import import_tiny, interrupt_at, tiny_recipe
from imgclf.runtime import device
from imgclf.runtime.checkpoint import load_checkpoint
from imgclf.runtime.device import Hardware
from imgclf.runtime.distributed import SINGLE
from imgclf.train import precision
from imgclf.train.api import train
from imgclf.train.recipe import load_recipe
from imgclf.train.trainer import Trainer

CPU_BF16 = Hardware(torch.device("cpu"), torch.bfloat16, False, False)
CPU_FP32 = Hardware(torch.device("cpu"), None, False, False)


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)
    ).train()


def no_sample() -> torch.Tensor:
    raise AssertionError("a choice that is not timed must not make a sample batch")


def test_choice_times_a_copy_leaving_weights_statistics_and_rng_alone():
    net = small_net()
    net(torch.randn(2, 3, 8, 8))  # materialise the lazy layer
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(4, 3, 8, 8)
    rng = torch.get_rng_state()
    name, why = precision.choose(net, x, CPU_BF16)
    assert name in ("fp32", "bf16")
    assert re.fullmatch(
        r"bf16 \d+\.\d\dx (faster|slower) in a probe of 2 passes of 4 images; cached in .+", why
    )
    assert torch.equal(torch.get_rng_state(), rng)
    for key, value in net.state_dict().items():  # BatchNorm in training mode included
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize(
    ("hw", "recipe_precision", "want"),
    [
        (CPU_FP32, "auto", None),  # no native bf16: fp32, nothing to time
        (CPU_BF16, "bf16", torch.bfloat16),  # named in the recipe: kept
        (CPU_FP32, "fp32", None),
    ],
)
def test_a_named_precision_or_a_cpu_without_bf16_is_not_timed(
    hw, recipe_precision, want, imgclf_home
):
    said = []
    got = precision.stage_precision(
        small_net(), no_sample, hw, recipe_precision, None, SINGLE, said.append
    )
    assert got == want and said == []
    assert not (imgclf_home / "probes").exists()


def test_a_saved_choice_is_kept_without_timing():
    got = precision.stage_precision(small_net(), no_sample, CPU_BF16, "auto", "bf16", SINGLE, print)
    assert got == torch.bfloat16
    got = precision.stage_precision(small_net(), no_sample, CPU_BF16, "auto", "fp32", SINGLE, print)
    assert got is None


def fake_timer(monkeypatch, timings: dict) -> list:
    """``pass_seconds`` answers from ``timings`` (dtype → seconds); returns the list of the
    dtypes it was asked for, so a test sees whether a probe ran."""
    asked: list = []

    def timed(net, x, dtype):
        asked.append(dtype)
        return timings[dtype]

    monkeypatch.setattr(precision, "pass_seconds", timed)
    return asked


def sample() -> torch.Tensor:
    return torch.randn(4, 3, 8, 8)


def test_auto_on_a_bf16_cpu_takes_the_faster_and_says_so(monkeypatch, imgclf_home, tmp_path):
    fake_timer(monkeypatch, {torch.bfloat16: 2.0, None: 1.0})  # fp32 twice as fast
    said = []
    got = precision.stage_precision(
        small_net(), sample, CPU_BF16, "auto", None, SINGLE, said.append
    )
    assert got is None
    cache = imgclf_home / "probes" / "precision.json"
    assert said == [
        "precision: fp32 for this stage (bf16 2.00x slower in a probe of 2 passes of 4 images; "
        f"cached in {cache})"
    ]
    # The other way, on another machine's cache (another IMGCLF_HOME).
    monkeypatch.setenv("IMGCLF_HOME", str(tmp_path / "elsewhere"))
    fake_timer(monkeypatch, {torch.bfloat16: 1.0, None: 1.5})
    got = precision.stage_precision(
        small_net(), sample, CPU_BF16, "auto", None, SINGLE, said.append
    )
    assert got == torch.bfloat16 and "bf16 1.50x faster" in said[-1]


def test_a_probe_is_cached_per_machine_and_network_and_not_rerun(monkeypatch, imgclf_home):
    asked = fake_timer(monkeypatch, {torch.bfloat16: 1.0, None: 3.0})
    said = []
    first = precision.stage_precision(small_net(), sample, CPU_BF16, "auto", None, SINGLE, print)
    assert first == torch.bfloat16 and len(asked) == 2
    # The same network and sample shape: the cache answers, even against new timings.
    fake_timer(monkeypatch, {torch.bfloat16: 3.0, None: 1.0})
    asked.clear()
    again = precision.stage_precision(
        small_net(), sample, CPU_BF16, "auto", None, SINGLE, said.append
    )
    assert again == torch.bfloat16
    assert "bf16 3.00x faster" in said[0] and f"from {imgclf_home}" in said[0]
    entries = json.loads((imgclf_home / "probes" / "precision.json").read_text())
    assert len(entries) == 1
    (key,) = entries
    assert torch.__version__ in key and "Sequential" in key and "4x3x8x8" in key
    # Another network (or shape, or thread count) is another key: timed again.
    wider = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Flatten(), nn.LazyLinear(3)).train()
    got = precision.stage_precision(wider, sample, CPU_BF16, "auto", None, SINGLE, print)
    assert got is None
    assert len(json.loads((imgclf_home / "probes" / "precision.json").read_text())) == 2


@pytest.mark.parametrize(
    "content", [b"{not json", b"[1, 2]", b'{"k": {"choice": "int8"}}', b"\xff\xfe", b""]
)
def test_a_corrupt_cache_is_ignored_and_rewritten(monkeypatch, imgclf_home, content):
    cache = imgclf_home / "probes" / "precision.json"
    cache.parent.mkdir(parents=True)
    cache.write_bytes(content)
    asked = fake_timer(monkeypatch, {torch.bfloat16: 2.0, None: 1.0})
    got = precision.stage_precision(small_net(), sample, CPU_BF16, "auto", None, SINGLE, print)
    assert got is None and len(asked) == 2
    (entry,) = json.loads(cache.read_text()).values()
    assert entry["choice"] == "fp32" and entry["seconds"] == {"bf16": 2.0, "fp32": 1.0}
    assert sorted(p.name for p in cache.parent.iterdir()) == ["precision.json"]  # no temp


def test_a_cache_that_cannot_be_written_costs_nothing_but_the_note(monkeypatch, imgclf_home):
    imgclf_home.mkdir(parents=True)
    (imgclf_home / "probes").write_text("a file where the folder would go")
    fake_timer(monkeypatch, {torch.bfloat16: 2.0, None: 1.0})
    said = []
    got = precision.stage_precision(
        small_net(), sample, CPU_BF16, "auto", None, SINGLE, said.append
    )
    assert got is None and "; not cached: UserError: cannot create" in said[0]


@pytest.fixture
def bf16_cpu(monkeypatch):
    """This CPU as one with native bf16, precision auto (the suite runs fp32 otherwise)."""
    monkeypatch.setenv("IMGCLF_CPU_BF16", "1")
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)


def test_each_stage_records_its_choice_and_a_resume_keeps_it(tmp_path, monkeypatch, bf16_cpu):
    ds = import_tiny(tmp_path)
    stages = [{"epochs": 1, "train": "all"}, {"epochs": 2, "train": "all", "lr": 0.01}]
    recipe = load_recipe(tiny_recipe(stages=stages))
    picks = iter(["bf16", "fp32"])
    monkeypatch.setattr(precision, "choose", lambda net, x, hw: (next(picks), "stub"))
    out = tmp_path / "run"
    trainer = Trainer(recipe, ds, out, threads=1, progress=False)
    interrupt_at(trainer, 3, 1)  # in stage 2's second epoch
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert load_checkpoint(out / "last.pt")["progress"]["stage_precision"] == {
        "0": "bf16",
        "1": "fp32",
    }

    def must_not_time(net, x, hw):
        raise AssertionError("a resumed stage re-timed its precision")

    monkeypatch.setattr(precision, "choose", must_not_time)
    train(None, resume=out, threads=1, progress=False)
    final = load_checkpoint(out / "last.pt")["progress"]["stage_precision"]
    assert final == {"0": "bf16", "1": "fp32"}


def test_a_cached_stage_times_its_suffix_on_the_cached_activations(tmp_path, bf16_cpu, capsys):
    ds = import_tiny(tmp_path)
    recipe = tiny_recipe(
        model="complex",
        augment={"crop_padding": 0, "flip": True},
        stages=[{"epochs": 3, "train": ["block3", "head"]}, {"epochs": 1, "train": "all"}],
    )
    run = train(recipe, ds, out=tmp_path / "run", threads=1, progress=True)
    said = "".join(capsys.readouterr())
    assert "feature cache: 2 view(s)" in said and said.count("precision: ") == 2
    chosen = load_checkpoint(run.last)["progress"]["stage_precision"]
    assert set(chosen) == {"0", "1"} and set(chosen.values()) <= {"fp32", "bf16"}


def test_a_time_budget_prices_each_stage_in_the_precision_it_will_train_in(
    tmp_path, bf16_cpu, monkeypatch
):
    """The budget's probe times cached and uncached stages both ways too (on activations
    made in inference mode for the cached one), and the run then trains."""
    ds = import_tiny(tmp_path)
    recipe = tiny_recipe(
        model="complex",
        augment={"crop_padding": 0, "flip": True},
        stages=[{"epochs": 3, "train": ["block3", "head"]}, {"epochs": 1, "train": "all"}],
    )
    timed = []
    choose = precision.choose

    def counting(net, x, hw):
        timed.append(tuple(x.shape[1:]))
        return choose(net, x, hw)

    monkeypatch.setattr(precision, "choose", counting)
    # 20 s, not less: the plan counts the setup before it, which took 8 s of a machine
    # whose two cores ran other jobs too (and "too short" was the result at 8 and 12 s).
    run = train(recipe, ds, out=tmp_path / "run", threads=1, progress=False, time_budget=20)
    assert run.summary["budget_seconds"] == 20
    # Probe: the cached stage's suffix on activations, then the whole net on images; the
    # trainer: the same two again.
    assert len(timed) == 4 and timed[1] == timed[3] == (3, 16, 16) and timed[0] != timed[1]


def test_a_second_run_on_this_machine_takes_the_cached_choice(
    tmp_path, bf16_cpu, monkeypatch, capsys, imgclf_home
):
    """Two runs of one recipe: the first times its stage (the real probe, on this CPU),
    the second reads the answer from $IMGCLF_HOME/probes/precision.json and says so."""
    ds = import_tiny(tmp_path)
    recipe = tiny_recipe(epochs=1)
    first = train(recipe, ds, out=tmp_path / "a", threads=1, progress=True)
    said = "".join(capsys.readouterr())
    cache = imgclf_home / "probes" / "precision.json"
    fresh = r"precision: (fp32|bf16) for this stage \(bf16 [\d.]+x \w+ in a probe of 2 passes"
    assert re.search(rf"{fresh} .*; cached in {re.escape(str(cache))}\)", said)
    asked = fake_timer(monkeypatch, {torch.bfloat16: 1.0, None: 1.0})
    second = train(recipe, ds, out=tmp_path / "b", threads=1, progress=True)
    said = "".join(capsys.readouterr())
    assert asked == [] and f"; from {cache})" in said
    chosen = load_checkpoint(first.last)["progress"]["stage_precision"]
    assert load_checkpoint(second.last)["progress"]["stage_precision"] == chosen
