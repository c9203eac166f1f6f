"""Shared by the multimodal model's tests: stand-in towers that keep the tower contract of
phi4core.models.multimodal (keyword processor outputs and input_mode in, [n_tokens, hidden]
out; an `encoder` child; the rest is the projector group), so assembly is tested apart from
the real towers, and which groups a backward reaches."""

from __future__ import annotations

import torch
from torch import nn

TOKENS_PER_IMAGE = 5
TOKENS_PER_CLIP = 3
FEATURES = 8


class StandInVision(nn.Module):
    """image_pixel_values [n_images, TOKENS_PER_IMAGE, FEATURES] -> [n_images * 5, hidden]."""

    def __init__(self, model_cfg, config=None):
        super().__init__()
        self.encoder = nn.Linear(FEATURES, 16)
        self.sub_GN = nn.Parameter(torch.zeros(16))
        self.projector = nn.Sequential(nn.Linear(16, model_cfg.hidden_size), nn.GELU(),
                                       nn.Linear(model_cfg.hidden_size, model_cfg.hidden_size))

    def forward(self, *, input_mode, image_pixel_values, image_sizes=None,
                image_attention_mask=None):
        x = self.encoder(image_pixel_values) + self.sub_GN
        return self.projector(x).reshape(-1, self.projector[-1].out_features)


class StandInAudio(nn.Module):
    """audio_input_features [n_clips, TOKENS_PER_CLIP, FEATURES]; the projector is picked by
    the mode as the real one is (speech; vision+speech)."""

    def __init__(self, model_cfg, config=None):
        super().__init__()
        self.encoder = nn.Linear(FEATURES, 16)
        h = model_cfg.hidden_size
        self.projector = nn.ModuleDict({"speech": nn.Linear(16, h), "vision": nn.Linear(16, h)})

    def _pick(self, input_mode) -> str:
        return "vision" if int(input_mode) == 3 else "speech"

    def forward(self, *, input_mode, audio_input_features, audio_embed_sizes=None,
                audio_attention_mask=None):
        proj = self.projector[self._pick(input_mode)]
        return proj(self.encoder(audio_input_features)).reshape(-1, proj.out_features)

    def parameter_counts(self):
        """Rows for phi4 model-info (the real tower gives the reference table's)."""
        def count(m):
            return sum(p.numel() for p in m.parameters())

        return {"encoder": count(self.encoder),
                "projector_speech": count(self.projector["speech"]),
                "projector_vision_speech": count(self.projector["vision"])}

    def unused_parameters(self, input_mode):
        other = "speech" if self._pick(input_mode) == "vision" else "vision"
        return list(self.projector[other].parameters())


TOWERS = {"vision": StandInVision, "audio": StandInAudio}


def gradient_kinds(m, trainable, x, **forward) -> dict[str, str]:
    """One training backward with only `trainable` groups trainable: per module group, whether
    its parameters got no gradient ("none"), exact zeros ("zero"), gradients ("some") or a mix
    ("partial")."""
    from phi4core.models.decoder import param_groups, set_trainable

    set_trainable(m, trainable)
    m.train()
    m.zero_grad(set_to_none=True)
    m(x, None, None, labels=x, **forward).float().mean().backward()
    params = dict(m.named_parameters())
    out = {}
    for group, names in param_groups(m).items():
        grads = [params[n].grad for n in names]
        out[group] = ("none" if all(g is None for g in grads)
                      else "zero" if all(g is not None and not g.any() for g in grads)
                      else "some" if all(g is not None for g in grads) else "partial")
    return out
