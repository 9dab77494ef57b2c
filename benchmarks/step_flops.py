"""FLOPs of one denoiser step of each architecture at its resolution, counted on the real configurations.

Each architecture's denoiser is built on PyTorch's meta device from the configuration its first checkpoint ships
(`augbench.architectures.REGISTRY`, written out below: no download, no weights) and called once, batch 1, at the
architecture's training resolution under `torch.utils.flop_counter.FlopCounterMode`, as its pipeline calls it (packed
latents for FLUX.1 and Qwen-Image, SDXL's size conditioning). The figures, relative to Stable Diffusion v1 at 512 px
(the reference the GPU rates of `augbench.plan` were measured on), set `Architecture.step_flops`.

    PYTHONPATH=src python benchmarks/step_flops.py

It prints figures and asserts nothing. Counted FLOPs are the matrix products (attention included); memory traffic
and kernels are not, so a GPU's time per step follows them only roughly.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode


def _meta(*shape: int) -> torch.Tensor:
    return torch.zeros(*shape, device="meta")


def sd() -> tuple:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    return unet, lambda: unet(_meta(1, 4, 64, 64), _meta(1), encoder_hidden_states=_meta(1, 77, 768))


def sdxl() -> tuple:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=128,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                                attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=256,
                                projection_class_embeddings_input_dim=2816)
    extra = {"text_embeds": _meta(1, 1280), "time_ids": _meta(1, 6)}
    return unet, lambda: unet(_meta(1, 4, 128, 128), _meta(1), encoder_hidden_states=_meta(1, 77, 2048),
                              added_cond_kwargs=extra)


def sd3() -> tuple:  # 3.5 medium
    from diffusers import SD3Transformer2DModel

    net = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                                num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                                pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                                dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
    return net, lambda: net(hidden_states=_meta(1, 16, 128, 128), timestep=_meta(1),
                            encoder_hidden_states=_meta(1, 333, 4096), pooled_projections=_meta(1, 2048))


def flux() -> tuple:  # schnell (dev: the same blocks and a guidance embedding)
    from diffusers import FluxTransformer2DModel

    net = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                                 guidance_embeds=False, axes_dims_rope=(16, 56, 56))
    return net, lambda: net(hidden_states=_meta(1, 4096, 64), timestep=_meta(1), pooled_projections=_meta(1, 768),
                            encoder_hidden_states=_meta(1, 512, 4096), txt_ids=_meta(512, 3), img_ids=_meta(4096, 3))


def sana() -> tuple:  # 1600M, 1024 px
    from diffusers import SanaTransformer2DModel

    net = SanaTransformer2DModel(in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32,
                                 num_layers=20, num_cross_attention_heads=20, cross_attention_head_dim=112,
                                 cross_attention_dim=2240, caption_channels=2304, mlp_ratio=2.5, sample_size=32,
                                 patch_size=1)
    return net, lambda: net(_meta(1, 32, 32, 32), encoder_hidden_states=_meta(1, 300, 2304), timestep=_meta(1))


def pixart_sigma() -> tuple:  # XL-2 1024
    from diffusers import PixArtTransformer2DModel

    net = PixArtTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                   num_layers=28, cross_attention_dim=1152, caption_channels=4096, sample_size=128,
                                   patch_size=2, norm_type="ada_norm_single", attention_bias=True,
                                   activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                   norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=2,
                                   use_additional_conditions=False)
    return net, lambda: net(_meta(1, 4, 128, 128), encoder_hidden_states=_meta(1, 300, 4096), timestep=_meta(1),
                            added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def qwen_image() -> tuple:
    from diffusers import QwenImageTransformer2DModel

    net = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=60,
                                      attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584,
                                      guidance_embeds=False, axes_dims_rope=(16, 56, 56))
    return net, lambda: net(hidden_states=_meta(1, 4096, 64), timestep=_meta(1),
                            encoder_hidden_states=_meta(1, 64, 3584), encoder_hidden_states_mask=None,
                            img_shapes=[[(1, 64, 64)]])


def main() -> None:
    from augbench.architectures import REGISTRY

    counted = {}
    print(f"{'architecture':<14} {'denoiser B':>10} {'side':>5} {'TFLOP/step':>11} {'x SD v1@512':>12} {'registry':>9}")
    for name, arch in REGISTRY.items():
        with torch.device("meta"):
            net, call = globals()[name]()
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            call()
        counted[name] = fc.get_total_flops()
        params = sum(p.numel() for p in net.parameters()) / 1e9
        print(f"{name:<14} {params:>10.2f} {arch.resolution:>5} {counted[name] / 1e12:>11.2f} "
              f"{counted[name] / counted['sd']:>12.2f} {arch.step_tflops:>9.2f}")


if __name__ == "__main__":
    main()
