"""Towers that start from random weights (the tiny demo's) can learn: initialised as
transformers initialises them, with a fresh audio encoder's feature statistics fitted on its
stage's own clips (docs/media_learning_investigation.md)."""

from __future__ import annotations

import logging
import math
import random

import pytest
import torch
from torch import nn

from phi4core.config import preset
from phi4core.data import synthetic_media as sm
from phi4core.models.audio import AudioEncoder, MeanVarianceNorm
from phi4core.models.audio_features import log_mel
from phi4core.models.vision import PatchEmbedding
from phi4core.train.feature_stats import MAX_CLIPS, fit_fresh_feature_norms

TINY = preset("phi4_multimodal_tiny")


def test_a_fresh_patch_embedding_is_initialised_as_siglip() -> None:
    torch.manual_seed(0)
    vc = TINY.vision
    emb = PatchEmbedding(vc, torch.float32)
    fan_in = 3 * vc.patch_size ** 2
    assert emb.patch_embedding.weight.std().item() == pytest.approx(fan_in ** -0.5, rel=0.1)
    assert torch.count_nonzero(emb.patch_embedding.bias) == 0
    assert emb.position_embedding.weight.std().item() == pytest.approx(
        vc.hidden_size ** -0.5, rel=0.1)
    # What a patch shows outweighs where it is: a red and a blue crop differ by more than the
    # positions vary, so a projector can read colour off single rows.
    red, blue = (torch.tensor(sm.COLOURS[c], dtype=torch.float32) / 127.5 - 1 for c in
                 ("red", "blue"))
    crops = torch.stack([red, blue])[:, :, None, None].expand(2, 3, vc.image_size, vc.image_size)
    side = vc.image_size // vc.patch_size
    x = emb(crops, torch.ones(2, side, side, dtype=torch.bool))
    content = (x[0] - x[1]).pow(2).mean().sqrt()
    positions = emb.position_embedding.weight.std()
    assert content > 2 * positions, (content, positions)


def test_a_fresh_audio_encoder_has_zero_biases_and_states_that_follow_the_clip() -> None:
    torch.manual_seed(0)
    enc = AudioEncoder(TINY.audio)
    biased = [m for m in enc.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))
              and m.bias is not None]
    assert biased and all(torch.count_nonzero(m.bias) == 0 for m in biased)
    clips = [sm.speak([w], random.Random(i)) for i, w in enumerate(list(sm.SPOKEN_WORDS) * 2)]
    enc.encoder_embedding.fit([log_mel(c) for c in clips])
    feats = log_mel(sm.speak(["red", "cat", "two"], random.Random(99)))[None]
    with torch.no_grad():
        states, _ = enc(feats)
    over_time = states.std(dim=1).mean() / states.pow(2).mean().sqrt()
    assert over_time > 0.2, over_time  # unfitted and with torch's biases: ~0.05


def test_feature_statistics_fit_per_bin_and_refuse_what_cannot_be_fitted() -> None:
    norm = MeanVarianceNorm(4)
    assert norm.is_identity()
    frames = torch.tensor([[1.0, 10.0, -3.0, 0.0], [3.0, 30.0, -1.0, 0.0]])
    norm.fit([frames[:1], frames[1:]])
    assert not norm.is_identity()
    out = norm(frames)
    assert torch.allclose(out[:, :3].mean(0), torch.zeros(3), atol=1e-6)
    assert torch.allclose(out[:, :3].std(0), torch.ones(3), atol=1e-5)
    assert torch.isfinite(out).all()  # a constant bin: its std is floored, not divided by 0
    for bad in ([frames[:1]], [torch.full((3, 4), math.nan)]):
        with pytest.raises(ValueError, match="cannot fit feature statistics"):
            MeanVarianceNorm(4).fit(bad)


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fresh, self.loaded = MeanVarianceNorm(80), MeanVarianceNorm(80)
        self.loaded.global_mean.fill_(3.0)  # statistics a checkpoint carried


def test_only_fresh_normalisations_are_fitted_on_the_stages_first_clips(caplog) -> None:
    clips = [torch.from_numpy(sm.speak(["dog"], random.Random(i))).float() for i in range(3)]
    samples = [{"audios": []}, {"audios": clips[:2]}, {"audios": clips[2:]}] * 40
    model = _Model()
    assert fit_fresh_feature_norms([model], samples) == min(MAX_CLIPS, 80)
    assert not model.fresh.is_identity()
    assert (model.loaded.global_mean == 3.0).all() and (model.loaded.global_invstd == 1).all()
    assert fit_fresh_feature_norms([model], samples) == 0  # nothing fresh left

    silent = _Model()
    with caplog.at_level(logging.WARNING, logger="phi4core.train"):
        assert fit_fresh_feature_norms([silent], [{"audios": []}] * 5) == 0
        assert fit_fresh_feature_norms([silent], None) == 0
    assert silent.fresh.is_identity() and "features stay unnormalised" in caplog.text
