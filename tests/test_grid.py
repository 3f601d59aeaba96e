"""The grid comes from Hydra's own override grammar (no Ray, no MLflow needed)."""
import math

import pytest
from omegaconf import OmegaConf
from hydra.core.override_parser.overrides_parser import OverridesParser

from scaling.config import ConfigError
from scaling.grid import build_grid, mixed_batch_sizes_note, stratum_keys
from scaling.grid import points_digest


def parse(*args):
    return OverridesParser.create().parse_overrides(list(args))


def test_choice_and_range_are_axes_and_plain_values_are_fixed():
    g = build_grid(parse("batch_size=32,64", "lr_multiplier=range(1,4)", "epochs=2"))
    assert g.axes == {"batch_size": ["32", "64"], "lr_multiplier": ["1", "2", "3"]}
    assert g.fixed == ["epochs=2"]
    assert len(g.points) == 6 and ["epochs=2", "batch_size=32", "lr_multiplier=1"] in g.points


def test_a_later_override_replaces_an_earlier_axis():
    g = build_grid(parse("batch_size=16,32,64", "lr_multiplier=1,2", "batch_size=128"))
    assert "batch_size" not in g.axes and "batch_size=128" in g.fixed and len(g.points) == 2


def test_log_interval_is_sampled_log_uniformly_num_samples_times():
    g = build_grid(parse("batch_size=32,64", "lr_multiplier=tag(log,interval(0.01,100))"), num_samples=400, seed=1)
    assert len(g.points) == 800 and g.sampled == {"lr_multiplier": "tag(log,interval(0.01,100))"}
    draws = [float(p[-1].split("=")[1]) for p in g.points[::2]]
    assert all(0.01 <= d <= 100 for d in draws)
    logs = sorted(math.log10(d) for d in draws)
    assert abs(logs[len(logs) // 2]) < 0.3, "the median of a log-uniform draw on [1e-2, 1e2] is near 1"
    assert build_grid(parse("lr_multiplier=interval(0.1,1)"), num_samples=3, seed=1).points == \
        build_grid(parse("lr_multiplier=interval(0.1,1)"), num_samples=3, seed=1).points


@pytest.mark.parametrize("sweep", ["int(interval(16,2048))", "int(tag(log,interval(16,2048)))"])
def test_an_int_interval_draws_integers_log_tagged_or_not(sweep):
    """A batch size cannot be a float: a log-tagged int interval used to draw 181.02..."""
    g = build_grid(parse(f"batch_size={sweep}"), num_samples=50, seed=3)
    draws = [p[-1].split("=")[1] for p in g.points]
    assert all(d.isdigit() and 16 <= int(d) <= 2048 for d in draws) and len(set(draws)) > 10


@pytest.mark.parametrize("sweep, end", [("tag(log,interval(0,1))", "start"), ("tag(log,interval(1,0))", "end"),
                                        ("tag(log,interval(1e-3,-1))", "end")])
def test_a_log_interval_through_zero_is_an_error_naming_the_key_and_its_value_once(sweep, end):
    """An end at or below 0 was a bare `error: math domain error`, naming no key."""
    with pytest.raises(ConfigError) as info:
        build_grid(parse(f"lr_multiplier={sweep}"))
    assert str(info.value) == f"lr_multiplier='{sweep}': a log interval needs a positive {end}"


def test_empty_sweep_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match="batch_size"):
        build_grid(parse("batch_size=range(5,5)"))


def test_strata_exclude_lr_and_seed_unless_group_by_is_given():
    axes = ["batch_size", "lr_multiplier", "scaling.rule", "seed", "+warmup.epochs"]
    assert stratum_keys(axes, None) == ["batch_size", "scaling.rule", "+warmup.epochs"]
    assert stratum_keys(axes, ["batch_size"]) == ["batch_size"]
    assert stratum_keys(axes, []) == []


def _planning_sweeper(*args: str):
    """Return a ScalingSweeper set up by real Hydra for `scaling-train -m <args>` (no launch)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import HydraContext
    from hydra import initialize_config_dir
    from hydra.types import RunMode
    from hydra.utils import instantiate
    from hydra._internal.callbacks import Callbacks
    from scaling.cli import CONF_DIR, register_configs
    from scaling.sweeper import ScalingSweeper

    register_configs()
    GlobalHydra.instance().clear()
    initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3")
    loader = GlobalHydra.instance().config_loader()
    master = loader.load_configuration("config", overrides=list(args), run_mode=RunMode.MULTIRUN)
    sweeper = instantiate(master.hydra.sweeper)  # as Hydra's multirun does
    assert isinstance(sweeper, ScalingSweeper)
    sweeper.setup(hydra_context=HydraContext(config_loader=loader, callbacks=Callbacks()), task_function=None,
                  config=master)
    return sweeper


def test_shared_composition_equals_composing_every_point_whole():
    """Points that differ only in plain values share one composition; the result is Hydra's own."""
    args = ["model.width=64", "optimizer=sgd,adam", "batch_size=32,256", "lr_multiplier=0.5,2"]
    sweeper = _planning_sweeper()
    calls = []
    compose = sweeper._compose
    sweeper._compose = lambda point, **kw: calls.append(point) or compose(point, **kw)
    grid, configs = sweeper.plan(args)
    assert len(configs) == 8 and len(calls) == 2, "one composition per optimizer choice"
    for point, cfg in zip(grid.points, configs):
        whole = compose(point)
        assert OmegaConf.to_container(cfg, resolve=True) == OmegaConf.to_container(whole, resolve=True), point
    by_point = {tuple(p): c for p, c in zip(grid.points, configs)}
    assert by_point[("model.width=64", "optimizer=adam", "batch_size=256", "lr_multiplier=2")].optimizer.name == "adam"


def test_a_bad_value_in_a_shared_composition_names_the_override_and_its_value_once():
    """The line was the whole point as a key and '' as its value: `batch_size=32 lr_multiplier=abc='': Error
    merging override lr_multiplier=abc: ...`."""
    sweeper = _planning_sweeper()
    with pytest.raises(ConfigError) as info:
        sweeper.plan(["batch_sise=32,64"])
    assert str(info.value) == "batch_sise='32': Key 'batch_sise' not in 'TrialConfig'"
    with pytest.raises(ConfigError) as info:
        sweeper.plan(["batch_size=32", "lr_multiplier=1,abc"])
    assert str(info.value) == ("lr_multiplier='abc': Value 'abc' of type 'str' could not be converted to Float "
                               "(key: lr_multiplier)")
    with pytest.raises(ConfigError) as info:
        _planning_sweeper("hydra.sweeper.params.lr_multiplier=[1,abc]").plan(["batch_size=32"])
    assert str(info.value).startswith("lr_multiplier='abc': Value 'abc' of type 'str' could not be converted")


def test_a_list_in_hydra_sweeper_params_is_a_choice_of_its_values(tmp_path):
    """A list was merged as one value (batch_size=[32,128]); it is the axis it reads as, the same study as
    its values typed on the command line."""
    listed = _planning_sweeper(f"hydra.sweeper.storage_path={tmp_path}", "hydra.sweeper.params.batch_size=[32,64]",
                               "hydra.sweeper.params.optimizer=[sgd,adam]")
    typed = _planning_sweeper(f"hydra.sweeper.storage_path={tmp_path}")
    grid, configs = listed.plan(["epochs=1"])
    assert grid.axes == {"batch_size": ["32", "64"], "optimizer": ["sgd", "adam"]}
    assert [(c.batch_size, c.optimizer.name) for c in configs] == [(32, "sgd"), (32, "adam"), (64, "sgd"), (64, "adam")]
    assert listed.study_name(grid) == typed.study_name(typed.plan(["batch_size=32,64", "optimizer=sgd,adam",
                                                                   "epochs=1"])[0])
    with pytest.raises(ConfigError, match=r"^hydra.sweeper.params.batch_size=\[\]: sweeps over no values"):
        _planning_sweeper("hydra.sweeper.params.batch_size=[]").plan([])


def test_the_study_name_is_the_grid_whatever_the_order_of_its_fixed_overrides(tmp_path):
    """A resume finds its study by name: the same points typed in another order are the same study; points
    in another order are not (a trial's index is its identity in the record and the checkpoints)."""
    def name(*args: str, resume: bool = False) -> str:
        sweeper = _planning_sweeper(f"hydra.sweeper.storage_path={tmp_path}", f"hydra.sweeper.resume={resume}")
        return sweeper.study_name(sweeper.plan(list(args))[0])

    first = name("batch_size=32,64", "lr_multiplier=1,2", "model.width=32", "epochs=1")
    assert first == name("epochs=1", "batch_size=32,64", "model.width=32", "lr_multiplier=1,2")
    assert first == name("batch_size=32,64", "epochs=1", "lr_multiplier=1,2", "model.width=32")
    assert first != name("batch_size=32,64", "lr_multiplier=2,1", "epochs=1", "model.width=32")  # other indices
    assert first != name("lr_multiplier=1,2", "batch_size=32,64", "model.width=32", "epochs=1")
    assert first == name("batch_size=32,64", "lr_multiplier=1,2", "model.width=64", "model.width=32", "epochs=1")
    assert first != name("batch_size=32,64", "lr_multiplier=1,2", "model.width=32", "model.width=64", "epochs=1")
    assert first != name("batch_size=32,64", "lr_multiplier=1,2", "model.width=32", "epochs=2")
    # a study started before the name ignored the order resumes under its old name
    sweeper = _planning_sweeper(f"hydra.sweeper.storage_path={tmp_path}", "hydra.sweeper.resume=true")
    grid = sweeper.plan(["epochs=1", "batch_size=32,64"])[0]
    old = f"study-{points_digest(grid.points)}"
    assert old != first and sweeper.study_name(grid) != old
    (tmp_path / old).mkdir()
    assert sweeper.study_name(grid) == old
    assert name("epochs=1", "batch_size=32,64") != old, "without resume, the name is the new one"


def test_an_axis_in_hydra_sweeper_params_is_the_same_study_as_on_the_command_line(tmp_path):
    """A resume finds its study whichever way its axes were given: the points, so the name, are the same."""
    def planned(*args: str, grid: tuple[str, ...] = ()):
        sweeper = _planning_sweeper(f"hydra.sweeper.storage_path={tmp_path}", *args)
        return sweeper.plan(list(grid))[0], sweeper

    shell, sweeper = planned(grid=("batch_size=32,64", "lr_multiplier=1,2", "epochs=1"))
    name = sweeper.study_name(shell)
    for args in (["hydra.sweeper.params.batch_size='32,64'", "hydra.sweeper.params.lr_multiplier='1,2'"],
                 ["hydra.sweeper.params={batch_size:'32,64',lr_multiplier:'1,2'}"]):
        given, sweeper = planned(*args, grid=("epochs=1",))
        assert given.axes == shell.axes and sweeper.study_name(given) == name
    given, sweeper = planned("hydra.sweeper.params.batch_size='32,64'", grid=("lr_multiplier=1,2", "epochs=1"))
    assert given.axes == shell.axes and sweeper.study_name(given) == name


@pytest.mark.parametrize("asha, axes, noted", [
    ({"group_by": ["scaling.rule"]}, ["batch_size", "lr_multiplier", "scaling.rule"], "group_by=['scaling.rule']"),
    ({"group_by": []}, ["+batch_size", "lr_multiplier"], "group_by=[]"),
    ({"stratified": False}, ["batch_size", "lr_multiplier"], "stratified=false"),
    ({}, ["batch_size", "lr_multiplier"], None),  # the default strata: every axis but the LR and seed
    ({"group_by": ["batch_size@foo"]}, ["batch_size", "lr_multiplier"], None),
    ({"group_by": ["scaling.rule"]}, ["lr_multiplier", "scaling.rule"], None),  # one batch size: nothing to mix
    ({"group_by": [], "enabled": False}, ["batch_size", "lr_multiplier"], None),
])
def test_asha_that_compares_batch_sizes_is_noted(asha, axes, noted):
    conf = OmegaConf.create({"enabled": True, "stratified": True, "group_by": None, **asha})
    strata = stratum_keys(axes, conf.group_by) if conf.stratified else []
    note = mixed_batch_sizes_note(conf, axes, strata)
    if noted is None:
        assert note == ""
    else:
        assert note.startswith(f"note: ASHA compares trials of different batch sizes at each rung "
                               f"(hydra.sweeper.asha.{noted})"), note
