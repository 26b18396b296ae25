import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from effllm.eval.perplexity import load_eval_text, perplexity


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def test_matches_manual_window_loss(tiny_llama):
    ids = torch.randint(0, 64, (16 * 5 + 3,))
    result = perplexity(tiny_llama, ids, seqlen=16, batch_size=2, progress=False)
    assert result.windows == 5 and result.tokens == 5 * 15
    manual = [tiny_llama(ids[i * 16:(i + 1) * 16][None], labels=ids[i * 16:(i + 1) * 16][None]).loss.item()
              for i in range(5)]
    assert math.isclose(result.nll, sum(manual) / 5, rel_tol=1e-5)
    assert math.isclose(result.perplexity, math.exp(result.nll))


def test_uniform_model_has_vocab_perplexity(tiny_llama):
    with torch.no_grad():
        tiny_llama.lm_head.weight.zero_()
    result = perplexity(tiny_llama, torch.randint(0, 64, (64,)), seqlen=32, progress=False)
    assert math.isclose(result.perplexity, 64, rel_tol=1e-4)


def test_errors(tmp_path, tiny_llama):
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(tiny_llama, torch.zeros(10, dtype=torch.long), seqlen=16, progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        load_eval_text(str(empty))
    with pytest.raises(ValueError, match="neither a text file"):
        load_eval_text("no-such-dataset")
