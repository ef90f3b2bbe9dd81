"""Judge refills at several temperatures (JudgeTrainConfig.refill_temperatures)."""

import pytest
import torch

from dgrpo.config import JudgeTrainConfig, SamplerConfig
from dgrpo.training.train_judge import build_refills


class Fixed(torch.nn.Module):
    """A 'generator' whose logits ignore the input: token 0 likely, the 7 others less so, everywhere."""
    mask_id = 8

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, 8)
        logits[..., 0] = 2.0
        return logits


def test_refills_are_drawn_at_each_of_the_temperatures():
    windows = torch.full((400, 16), 1)
    fractions = torch.ones(400)
    sampler = SamplerConfig(steps=4, order="random")
    single = build_refills(Fixed(), windows, fractions, sampler, torch.Generator().manual_seed(0))
    assert not bool((single == Fixed.mask_id).any())
    # at temperature 0.05 every draw is token 0, at 50 nearly uniform: a mix of the two shows both kinds of row
    mixed = build_refills(Fixed(), windows, fractions, sampler, torch.Generator().manual_seed(0),
                          temperatures=[0.05, 50.0])
    share_of_zero = (mixed == 0).float().mean(1)
    sharp, flat = share_of_zero == 1.0, share_of_zero < 0.5
    assert 150 < int(sharp.sum()) < 250 and 150 < int(flat.sum()) < 250 and int((sharp | flat).sum()) == 400
    # without the list, the sampler's own temperature (0.5): neither extreme
    assert 0.7 < float((single == 0).float().mean()) < 0.99


def test_refill_temperatures_are_validated():
    with pytest.raises(ValueError, match="refill_temperatures must all be > 0"):
        JudgeTrainConfig(generator="g", refill_temperatures=[0.5, 0.0])
    with pytest.raises(ValueError, match="at least 1 item"):
        JudgeTrainConfig(generator="g", refill_temperatures=[])
