import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from clat.config.schema import Config, to_dict
from clat.config.load import config_from_dict, dump_yaml, load_config, parse_overrides
from clat.base.errors import ConfigError


def test_defaults_follow_the_paper():
    c = Config()
    assert c.attack.eps == pytest.approx(8 / 255) and c.attack.alpha == pytest.approx(2 / 255) and c.attack.steps == 10
    assert (c.pretrain.method, c.pretrain.epochs, c.finetune.method, c.finetune.epochs) == ("pgd_at", 50, "clat", 50)
    assert c.pretrain.lr == 0.1 and c.pretrain.momentum == 0.9 and c.pretrain.weight_decay == 5e-4
    assert c.clat.reselect_every == 10 and c.clat.dynamic and c.clat.ce_on == "clean"


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("attack: {eps: 4/255}\nclat: {k: 3, layers: [layer3.0.conv2, 5]}\n")
    c = load_config(p, ["clat.k=2", "data.dataset=bundled", "eval.every=2"])
    assert c.attack.eps == pytest.approx(4 / 255)
    assert c.clat.k == 2 and c.clat.layers == ["layer3.0.conv2", 5]
    assert c.data.dataset == "bundled" and c.eval.every == 2


def test_resolved_config_round_trips():
    c = load_config(None, ["clat.k=2", "attack.eps=8/255", "init=x.safetensors"])
    again = config_from_dict(yaml.safe_load(dump_yaml(c)))
    assert to_dict(again) == to_dict(c)


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(1, 50),
    lam=st.floats(0, 1e3, allow_nan=False),
    eps_num=st.integers(1, 32),
    bs=st.integers(1, 4096),
    dyn=st.booleans(),
)
def test_valid_overrides_parse_to_their_values(k, lam, eps_num, bs, dyn):
    c = load_config(None,
                    [f"clat.k={k}", f"clat.lam={lam!r}", f"attack.eps={eps_num}/255", f"data.batch_size={bs}",
                     f"clat.dynamic={str(dyn).lower()}"])
    assert c.clat.k == k and c.clat.lam == pytest.approx(lam) and c.attack.eps == pytest.approx(eps_num / 255)
    assert c.data.batch_size == bs and c.clat.dynamic is dyn


@settings(max_examples=200, deadline=None)
@given(
    key=st.sampled_from(["clat.k", "clat.lam", "attack.eps", "data.batch_size", "data.dataset", "clat.dynamic", "clat.layers",
                         "model.name", "eval.steps", "seed", "init", "clat.criticality.scaling", "nope", "clat.nope", "a.b.c"]),
    value=st.one_of(st.text(max_size=12), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True), st.booleans()),
)
def test_any_override_either_parses_or_raises_config_error(key, value):
    try:
        load_config(None, [f"{key}={value}"])
    except ConfigError as e:
        assert str(e)  # a message, never an empty error
    # any other exception type fails the test


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=40))
def test_arbitrary_yaml_text_never_crashes(tmp_path_factory, text):
    p = tmp_path_factory.mktemp("y") / "c.yaml"
    p.write_text(text)
    try:
        load_config(p)
    except ConfigError:
        pass


def test_parse_overrides_nested():
    assert parse_overrides(["a.b.c=1", "a.b.d=x", "e=[1, 2]"]) == {"a": {"b": {"c": 1, "d": "x"}}, "e": [1, 2]}
