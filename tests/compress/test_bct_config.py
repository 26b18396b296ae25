import pytest

from effllm.compress.bct import ActivationSpec, BCTConfig, StoredSpec, TableSpec


def test_round_trips_through_dict_and_yaml():
    config = BCTConfig.uniform(4, 8, softmax=TableSpec(8, 10.0), residual=ActivationSpec(8, 32, "dynamic"))
    assert BCTConfig.from_dict(config.to_dict()) == config
    assert BCTConfig.from_yaml(config.to_yaml()) == config
    assert config.linear_weights == StoredSpec(4, 256, "fitted", "uint8", clip_search=True)


def test_partial_dict_keeps_defaults():
    config = BCTConfig.from_dict({"gelu": {"bits": 6}})
    assert config.gelu.bits == 6 and config.linear_weights == BCTConfig().linear_weights


@pytest.mark.parametrize("data, message", [
    ({"embedings": {"bits": 8}}, "unknown BCT components"),
    ({"embeddings": {"bitz": 8}}, "embeddings: unknown keys"),
    ({"embeddings": {"bits": 9}}, "embeddings.bits"),
    ({"linear_weights": {"map": "nf4"}}, "linear_weights.map"),
    ({"activations": {"map": "fitted"}}, "activations.map"),
    ({"biases": {"scale_format": "bf16"}}, "biases.scale_format"),
    ({"residual": {"blocksize": 0}}, "residual.blocksize"),
    ({"softmax": {"input_range": -1}}, "softmax.input_range"),
    ({"gelu": 8}, "gelu: expected a mapping"),
])
def test_bad_configs_name_the_problem(data, message):
    with pytest.raises(ValueError, match=message):
        BCTConfig.from_dict(data)


def test_null_bits_mean_floating_point():
    config = BCTConfig.uniform(None, None)
    assert config.linear_weights.bits is None and config.softmax.bits is None
