"""DMinConfig and SketchSpec: validation, JSON round trips, fingerprints."""

import logging
import subprocess
import sys

import pytest

from diffusers_dmin import ConfigError, DMinConfig, SketchSpec


def test_defaults():
    config = DMinConfig()
    assert config.num_timesteps == 10
    assert config.timestep_spacing == "cubic"
    assert config.sketch_dim == 4096
    assert config.params == "auto"
    assert config.dtype == "float16"
    assert config.target is None
    assert config.normalize == "layer"


def test_explicit_timesteps_set_num_timesteps():
    config = DMinConfig(timestep_spacing=[900, 500, 100])
    assert config.timestep_spacing == (900, 500, 100)
    assert config.num_timesteps == 3
    assert DMinConfig(timestep_spacing=[1, 2], num_timesteps=2).num_timesteps == 2


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_timesteps": 0}, "num_timesteps"),
        ({"num_timesteps": 2.5}, "num_timesteps"),
        ({"timestep_spacing": "linear"}, "timestep_spacing"),
        ({"timestep_spacing": []}, "timestep_spacing"),
        ({"timestep_spacing": [5, 5]}, "more than once"),
        ({"timestep_spacing": [-1]}, "non-negative"),
        ({"timestep_spacing": [1, 2], "num_timesteps": 3}, "disagrees"),
        ({"sketch_dim": 0}, "sketch_dim"),
        ({"sketch_dim": 2**25}, "sketch_dim"),
        ({"sketch_dim": True}, "sketch_dim"),
        ({"seed": -1}, "seed"),
        ({"params": "attn"}, "params"),
        ({"params": []}, "params"),
        ({"params": [""]}, "params"),
        ({"dtype": "float64"}, "dtype"),
        ({"target": "epsilon"}, "target"),
        ({"normalize": "global"}, "normalize"),
        ({"num_noise_draws": 0}, "num_noise_draws"),
        ({"resolution": (16,)}, "resolution"),
        ({"resolution": -4}, "resolution"),
    ],
)
def test_bad_values_raise_config_error_naming_the_field(kwargs, match):
    with pytest.raises(ConfigError, match=match) as info:
        DMinConfig(**kwargs)
    assert isinstance(info.value, ValueError)


def test_json_round_trip():
    config = DMinConfig(
        timestep_spacing=[999, 500, 10],
        sketch_dim=1024,
        seed=7,
        params=["*attn1*", "mid_block.*"],
        dtype="bfloat16",
        target="noise",
        normalize="layer",
        num_noise_draws=2,
        resolution=32,
    )
    assert config.resolution == (32, 32)
    again = DMinConfig.from_json(config.to_json())
    assert again == config
    assert again.fingerprint() == config.fingerprint()


def test_unknown_keys_are_ignored_with_a_warning(caplog):
    data = {**DMinConfig().to_dict(), "from_the_future": 1}
    with caplog.at_level(logging.WARNING, logger="diffusers_dmin"):
        logging.getLogger("diffusers_dmin").propagate = True
        try:
            config = DMinConfig.from_dict(data)
        finally:
            logging.getLogger("diffusers_dmin").propagate = False
    assert config == DMinConfig()
    assert "from_the_future" in caplog.text


def test_invalid_json_raises():
    with pytest.raises(ConfigError, match="invalid JSON"):
        DMinConfig.from_json("{not json")


def test_fingerprint_is_stable_and_ignores_storage_dtype():
    config = DMinConfig(
        num_timesteps=10,
        timestep_spacing="cubic",
        sketch_dim=4096,
        seed=0,
        params="auto",
        target=None,
        normalize="timestep",
        num_noise_draws=1,
        resolution=None,
    )  # every field explicit, so that a change of defaults does not change this value
    # indices on the Hub are checked with this value: changing the hashing breaks every published index
    assert config.fingerprint() == "022787365a1795dc"
    assert config.replace(dtype="float32").fingerprint() == config.fingerprint()
    assert config.replace(seed=1).fingerprint() != config.fingerprint()
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            f"from diffusers_dmin import DMinConfig; print(DMinConfig(**{config.to_dict()!r}).fingerprint())",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == config.fingerprint()


def test_replace_and_differences():
    config = DMinConfig()
    other = config.replace(seed=3, timestep_spacing=[10, 20])
    assert other.num_timesteps == 2
    assert set(config.differences(other)) == {"seed", "timestep_spacing", "num_timesteps"}
    assert config.differences(config.replace(dtype="float32")) == {}


def _spec(**changes):
    base = dict(
        config=DMinConfig(num_timesteps=2),
        family="unet2d",
        target="epsilon",
        timesteps=(999, 500),
        latent_shape=(1, 16, 16),
        param_names=("a.weight", "b.weight"),
        input_dim=10,
        param_fingerprint="abc",
    )
    return SketchSpec(**{**base, **changes})


def test_sketch_spec_round_trip_and_differences():
    spec = _spec()
    assert SketchSpec.from_dict(spec.to_dict()) == spec
    assert spec.num_timesteps == 2
    other = _spec(param_fingerprint="xyz", param_names=("a.weight",), config=DMinConfig(num_timesteps=2, seed=1))
    diffs = spec.differences(other)
    assert set(diffs) == {"param_fingerprint", "param_names", "config.seed"}
    # sketch_dim and dtype do not make sketches incomparable (sketches fold)
    assert spec.differences(_spec(config=DMinConfig(num_timesteps=2, sketch_dim=512, dtype="float32"))) == {}
    with pytest.raises(ConfigError, match="Malformed"):
        SketchSpec.from_dict({"config": {}})
