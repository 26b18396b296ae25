"""Calibrated (GPTQ-style) rounding of packed codes, and column-major blocks: unit level, on small tensors."""

import pytest
import torch

from effllm.compress.bct import BCTConfig, StoredSpec, compress
from effllm.compress.bct.calibrated_rounding import gptq_codes
from effllm.compress.bct.packed_tensor import PackedTensor

W4 = StoredSpec(4, 256, "fitted", "uint8", clip_search=True)


def _correlated_inputs(n: int, features: int, seed: int) -> torch.Tensor:
    """Inputs with strongly correlated features (a few shared factors plus noise), as real activations have."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(8, features, generator=torch.Generator().manual_seed(99))  # same factors for every seed
    return torch.randn(n, 8, generator=generator) @ mixing + 0.1 * torch.randn(n, features, generator=generator)


def _decode(packed: PackedTensor, codes: torch.Tensor) -> torch.Tensor:
    return packed.qmap[codes.long()] * packed.element_scales()


def test_calibrated_rounding_lowers_output_error_on_correlated_inputs():
    torch.manual_seed(0)
    weight = torch.randn(48, 96)
    packed = PackedTensor.from_float(weight, W4)
    calib, held_out = _correlated_inputs(2048, 96, seed=1), _correlated_inputs(1024, 96, seed=2)
    hessian = 2 * calib.T @ calib / calib.shape[0]
    nearest = packed.dequantize()
    calibrated = _decode(packed, gptq_codes(weight, hessian, packed.element_scales(), packed.qmap))
    reference = held_out @ weight.T
    nearest_error = (held_out @ nearest.T - reference).square().mean()
    calibrated_error = (held_out @ calibrated.T - reference).square().mean()
    assert calibrated_error < 0.5 * nearest_error
    # it trades weight error for output error: the weights themselves are further from the float ones
    assert (calibrated - weight).square().mean() > (nearest - weight).square().mean()


def test_identity_hessian_gives_nearest_rounding():
    """With uncorrelated inputs of equal variance there is nothing to compensate: the codes are the nearest ones."""
    torch.manual_seed(0)
    weight = torch.randn(16, 40)
    packed = PackedTensor.from_float(weight, W4)
    codes = gptq_codes(weight, torch.eye(40), packed.element_scales(), packed.qmap, percdamp=0.0)
    assert torch.equal(codes.reshape(-1), packed.unpacked_codes())


def test_set_codes_round_trips_in_both_layouts():
    torch.manual_seed(0)
    weight = torch.randn(12, 20)
    for layout in ("row_major", "column_major"):
        packed = PackedTensor.from_float(weight, StoredSpec(4, 32, "fitted", block_layout=layout))
        codes = torch.randint(0, 16, weight.shape, dtype=torch.uint8)
        packed.set_codes_(codes)
        assert torch.equal(packed.dequantize(), _decode(packed, codes))


def test_column_major_blocks_isolate_an_outlier_column():
    torch.manual_seed(0)
    table = torch.randn(512, 64)
    table[:, 5] *= 30  # one hidden dimension much larger than the others, as in real embeddings
    row_major = PackedTensor.from_float(table, W4)
    column_major = PackedTensor.from_float(table, StoredSpec(**{**W4.__dict__, "block_layout": "column_major"}))
    normal = torch.arange(64) != 5
    # the other dimensions no longer share their blocks' scale with the outlier
    error = {name: ((p.dequantize() - table)[:, normal].square().sum() / table[:, normal].square().sum()).item()
             for name, p in (("row", row_major), ("column", column_major))}
    assert error["column"] < 0.5 * error["row"]
    rows = torch.tensor([[0, 511], [7, 7]])
    assert torch.equal(column_major.gather_rows(rows), column_major.dequantize()[rows])
    assert column_major.nbytes() == row_major.nbytes()  # the layout costs nothing


@pytest.mark.parametrize("data, message", [
    ({"linear_weights": {"rounding": "best"}}, "linear_weights.rounding must be one of"),
    ({"embeddings": {"rounding": "gptq"}}, "embeddings.rounding must be 'nearest'"),
    ({"linear_weights": {"damp": -1}}, "linear_weights.damp must be a number >= 0"),
    ({"embeddings": {"block_layout": "diagonal"}}, "embeddings.block_layout must be one of"),
])
def test_bad_rounding_configs_name_the_problem(data, message):
    with pytest.raises(ValueError, match=message):
        BCTConfig.from_dict(data)


def _w4(rounding: str, act_bits=None) -> BCTConfig:
    from dataclasses import replace

    config = BCTConfig.uniform(4, act_bits)
    # float embeddings: their rounding error (not calibrated) would hide the linears' in the comparison
    return replace(config, linear_weights=replace(config.linear_weights, rounding=rounding),
                   embeddings=StoredSpec(None))


def _random_batches(count: int, seed: int, vocab: int = 300, seq: int = 11):
    """Random texts over the first ``vocab`` tokens: a small vocabulary gives correlated hidden features, as
    real text does (uniform ids over a random model's whole vocabulary give nearly isotropic ones)."""
    generator = torch.Generator().manual_seed(seed)
    return [dict(input_ids=torch.randint(0, vocab, (4, seq), generator=generator),
                 attention_mask=torch.ones(4, seq, dtype=torch.long)) for _ in range(count)]


def test_compress_with_calibrated_rounding_is_closer_to_the_float_model(tiny_bert):
    import copy

    batch = _random_batches(1, seed=6, vocab=12)[0]  # held out: not among the calibration batches
    with torch.no_grad():
        reference = tiny_bert(**batch).last_hidden_state
    errors = {}
    for rounding in ("nearest", "gptq"):
        calib = _random_batches(8, seed=5, vocab=12) if rounding == "gptq" else None
        model = compress(copy.deepcopy(tiny_bert), _w4(rounding), calib=calib)
        with torch.no_grad():
            errors[rounding] = (model(**batch).last_hidden_state - reference).square().mean().item()
    assert errors["gptq"] < 0.8 * errors["nearest"]


def test_calibrated_rounding_changes_codes_only_and_round_trips(tiny_bert, batch, tmp_path):
    import copy

    import effllm
    from effllm.compress.bct import save_compressed

    nearest = compress(copy.deepcopy(tiny_bert), _w4("nearest", 8))
    calibrated = compress(copy.deepcopy(tiny_bert), _w4("gptq", 8), calib=_random_batches(2, seed=5))
    state_n, state_c = nearest.state_dict(), calibrated.state_dict()
    changed = [name for name in state_n if not torch.equal(state_n[name], state_c[name])]
    assert changed and all(name.endswith("weight_packed.codes") for name in changed)
    save_compressed(calibrated, tmp_path / "out")
    loaded = effllm.load(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).last_hidden_state, calibrated(**batch).last_hidden_state)


def test_gptq_rounding_without_calibration_data_is_a_clear_error(tiny_bert):
    with pytest.raises(ValueError, match="needs calibration data: pass calib="):
        compress(tiny_bert, _w4("gptq"))


def test_tiny_tensors_are_stored_at_8_bits():
    spec = StoredSpec(4, 256, "fitted", "uint8", clip_search=True, min_low_bit_elements=1024)
    tiny, large = PackedTensor.from_float(torch.randn(2, 384), spec), PackedTensor.from_float(torch.randn(4, 384), spec)
    assert tiny.spec.bits == 8 and tiny.codes.numel() == 768
    assert large.spec.bits == 4 and large.codes.numel() == 768
    shell = PackedTensor((2, 384), spec)  # a loaded folder rebuilds the same layout from the shape alone
    assert shell.spec.bits == 8 and shell.fitted_map.numel() == 256


def test_calibrated_rounding_on_a_tied_llama_leaves_the_tied_head_to_its_embedding():
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from effllm.compress.bct.calibrated_rounding import calibrated_linears

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 12, (2, 9), generator=torch.Generator().manual_seed(3))
    calib = [torch.randint(0, 12, (4, 9), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    with torch.no_grad():
        reference = model(ids).logits
    errors = {}
    for rounding in ("nearest", "gptq"):
        compressed = compress(copy.deepcopy(model), _w4(rounding), calib=calib if rounding == "gptq" else None)
        with torch.no_grad():
            errors[rounding] = (compressed(ids).logits - reference).square().mean().item()
    assert len(calibrated_linears(compressed)) == 2 * 7  # q, k, v, o, gate, up, down; not the tied lm_head
    assert errors["gptq"] < 0.5 * errors["nearest"]
