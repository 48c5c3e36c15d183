"""raytrain.models.encoders: the student towers."""

import torch

from raytrain.models.encoders import TextTower


def test_text_tower_sees_word_order_at_init():
    """Reversing a caption must move its embedding at init; with position embeddings 50×
    smaller than the token embeddings it moved 1 − cos ≈ 3e-5 (a bag of words), and the
    trained students never learned attribute binding (docs/results.md#attribute-binding)."""
    torch.manual_seed(0)
    tower = TextTower(64, 2, 2, vocab_size=100, context_length=24, embed_dim=64, pad_id=0)
    tokens = torch.randint(1, 100, (256, 12))
    with torch.no_grad():
        cos = torch.cosine_similarity(tower(tokens)[0], tower(tokens.flip(1))[0])
    assert 1 - cos.mean() > 1e-3
