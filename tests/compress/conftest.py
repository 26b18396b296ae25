import pytest
import torch

VOCAB, HIDDEN, SEQ = 300, 64, 11


@pytest.fixture
def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64)
    return BertModel(config).eval()


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, SEQ), generator=generator)
    mask = torch.ones(3, SEQ, dtype=torch.long)
    mask[1, 7:] = 0  # one padded sequence: masked positions must not leak into the result
    return dict(input_ids=ids, attention_mask=mask)
