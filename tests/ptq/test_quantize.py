import copy

import pytest
import torch

import effllm.ptq.quantize as ptq_quantize
from effllm.ptq.config import PTQConfig
from effllm.ptq.quantize import quantize


class Interrupted(Exception):
    pass


def interrupt_after(monkeypatch, windows: int):
    """Make the run stop right after writing its ``windows``-th checkpoint."""
    real_save = ptq_quantize._save_checkpoint
    calls = {"n": 0}

    def save_then_stop(*args, **kwargs):
        real_save(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == windows:
            raise Interrupted

    monkeypatch.setattr(ptq_quantize, "_save_checkpoint", save_then_stop)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_resume_gives_the_same_model(tmp_path, monkeypatch, calib_ids, make_llama, method):
    config = PTQConfig(method=method, bits=3, group_size=16, calib="unused-ids-given", nsamples=6, seqlen=16)
    reference = make_llama(layers=4)
    quantize(reference, config, calib_ids, progress=False)

    interrupted = make_llama(layers=4)
    interrupt_after(monkeypatch, 2)
    with pytest.raises(Interrupted):
        quantize(interrupted, config, calib_ids, checkpoint_dir=tmp_path / "ckpt", progress=False)
    monkeypatch.undo()
    resumed = make_llama(layers=4)  # a fresh process would reload the original model
    reports = quantize(resumed, config, calib_ids[:0], checkpoint_dir=tmp_path / "ckpt", resume=True, progress=False)
    assert [r.first_block for r in reports] == [0, 1, 2, 3]
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert torch.equal(resumed(ids).logits, reference(ids).logits)


def test_config_errors(tiny_llama, calib_ids):
    with pytest.raises(ValueError, match="weight bits"):
        PTQConfig(bits=1)
    with pytest.raises(ValueError, match="unknown method"):
        PTQConfig(method="awq")
    with pytest.raises(ValueError, match="needs calibration text"):
        PTQConfig(method="gptq")
    with pytest.raises(ValueError, match="activation bits"):
        PTQConfig(act_bits=2)
    with pytest.raises(ValueError, match="unknown PTQ config keys"):
        PTQConfig.from_dict({"bits": 4, "groupsize": 64})
    before = copy.deepcopy(tiny_llama.state_dict())
    with pytest.raises(ValueError, match="group size 24 does not divide the input dimension 32"):
        quantize(tiny_llama, PTQConfig(group_size=24), calib_ids, progress=False)
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.state_dict().items())  # untouched


def test_resume_without_checkpoint(tmp_path, tiny_llama, calib_ids):
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        quantize(tiny_llama, PTQConfig(group_size=16), calib_ids, checkpoint_dir=tmp_path / "none", resume=True,
                 progress=False)
