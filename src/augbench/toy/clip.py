"""`ToyClipModel`: a CLIP with a small convolutional image tower, for the toy world only.

Why not a `CLIPModel` with a ViT image tower: measured on 2 CPU cores, a tiny ViT (patch 8,
width 96, 4 layers) trained for 600 steps of batch 256 on the toy pool reached 0.23 top-1 even
with the *true* labels, and contrastively 0.07 image->image precision@10 (chance 0.05). A small
CNN learns shape in the same budget. The text tower is a real transformers `CLIPTextModel`, the
whole model is a transformers `PreTrainedModel` registered with `AutoModel`, and it exposes
CLIP's interface (`get_image_features`, `get_text_features`, `logit_scale`), so every later
stage loads it exactly as it loads `openai/clip-vit-large-patch14`: `from_pretrained` on a folder.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, CLIPTextConfig, CLIPTextModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling


class ToyClipConfig(PretrainedConfig):
    """Text tower config (a `CLIPTextConfig` dict), CNN widths and the projection size."""

    model_type = "augbench_toy_clip"

    def __init__(
        self,
        text_config: dict[str, Any] | None = None,
        vision_widths: list[int] | None = None,
        image_size: int = 32,
        projection_dim: int = 128,
        logit_scale_init_value: float = math.log(1 / 0.07),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.text_config = dict(text_config or {})
        self.vision_widths = list(vision_widths or [32, 64, 128, 256])
        self.image_size = image_size
        self.projection_dim = projection_dim
        self.logit_scale_init_value = logit_scale_init_value


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class ToyVisionTower(nn.Module):
    """Stem + stride-2 stages + global average pooling: the pooled output is the last width."""

    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
        for cin, cout in itertools.pairwise(widths):
            layers.append(_block(cin, cout, 2))
        self.body = nn.Sequential(*layers)

    def forward(self, pixel_values: torch.Tensor) -> BaseModelOutputWithPooling:
        h = self.body(pixel_values)
        return BaseModelOutputWithPooling(last_hidden_state=h, pooler_output=h.mean(dim=(2, 3)))


class ToyClipModel(PreTrainedModel):
    """CLIP's two-tower contrastive model with a CNN image tower (see module docstring)."""

    config_class = ToyClipConfig
    base_model_prefix = "toy_clip"
    main_input_name = "pixel_values"

    def __init__(self, config: ToyClipConfig) -> None:
        super().__init__(config)
        text_cfg = CLIPTextConfig(**config.text_config)
        self.text_model = CLIPTextModel(text_cfg)
        self.vision_model = ToyVisionTower(config.vision_widths)
        self.visual_projection = nn.Linear(config.vision_widths[-1], config.projection_dim, bias=False)
        self.text_projection = nn.Linear(text_cfg.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Kaiming for convolutions; the text tower keeps CLIPTextModel's own initialisation."""
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif module is getattr(self, "visual_projection", None) or module is getattr(self, "text_projection", None):
            nn.init.normal_(module.weight, std=module.in_features ** -0.5)

    def get_image_features(self, pixel_values: torch.Tensor, **_: Any) -> BaseModelOutputWithPooling:
        """Projected image embedding in `.pooler_output` (as transformers 5 CLIPModel returns it)."""
        out = self.vision_model(pixel_values)
        out.pooler_output = self.visual_projection(out.pooler_output)
        return out

    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any
    ) -> BaseModelOutputWithPooling:
        """Projected text embedding in `.pooler_output`."""
        out = self.text_model(input_ids=input_ids, attention_mask=attention_mask)
        out.pooler_output = self.text_projection(out.pooler_output)
        return out

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None,
                return_loss: bool = True, **_: Any) -> dict[str, torch.Tensor]:
        """Symmetric InfoNCE over the batch, as in CLIP."""
        img = F.normalize(self.get_image_features(pixel_values).pooler_output, dim=-1)
        txt = F.normalize(self.get_text_features(input_ids, attention_mask).pooler_output, dim=-1)
        logits = self.logit_scale.exp().clamp(max=100) * img @ txt.T
        target = torch.arange(len(img), device=img.device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        return {"loss": loss, "logits_per_image": logits}


AutoConfig.register(ToyClipConfig.model_type, ToyClipConfig)
AutoModel.register(ToyClipConfig, ToyClipModel)
