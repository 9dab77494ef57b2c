"""Tiny, randomly initialised pipelines of every architecture in `augbench.architectures`, built with the libraries' own
config constructors and tokenizers made in memory from a small vocabulary (no download), saved with `save_pretrained`
in the folder layout the hub serves: real classes at toy sizes, to prove the code path, not the images."""

from __future__ import annotations

from pathlib import Path

WORDS = ("a photo of the circle square triangle dog cat drawing plus sign on wall itap my ring bad quality "
         "an image picture").split()


def clip_tokenizer(max_length: int = 16):  # -> CLIPTokenizer
    """CLIP's byte-level BPE, trained offline on captions of WORDS."""
    from augbench.toy.clip_train import train_tokenizer

    tok = train_tokenizer([f"a photo of a {w}." for w in WORDS] * 10 + [" ".join(WORDS)] * 5, 300)
    tok.model_max_length = max_length
    return tok


def t5_tokenizer():  # -> T5TokenizerFast
    """T5's unigram tokenizer over WORDS (each word one piece) and single characters, no extra ids."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [("▁" + w, -1.0) for w in WORDS]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,<>_-"]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def gemma_tokenizer():  # -> GemmaTokenizerFast
    """Gemma's BPE tokenizer with a character vocabulary and no merges."""
    from transformers import GemmaTokenizerFast

    chars = "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;'\"!?()<>_-/\n"
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", *dict.fromkeys(chars)])}
    return GemmaTokenizerFast(vocab=vocab, merges=[])


def clip_text(tokenizer, hidden: int = 16, projection: int | None = None):  # -> CLIPTextModel(WithProjection)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, projection_dim=projection or hidden)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def t5_encoder(tokenizer, d_model: int = 32):  # -> T5EncoderModel
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1,
                                   num_heads=2, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def vae(latent_channels: int = 4, **config: object):  # -> AutoencoderKL (2x: two levels)
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=4, sample_size=32, **config)


def build(name: str, out: Path) -> Path:
    """Save a tiny pipeline of architecture `name` to `out` and return it."""
    import diffusers
    import torch

    torch.manual_seed(0)
    parts = globals()[f"_{name}"]()
    pipe = getattr(diffusers, parts.pop("_class"))(**parts)
    pipe.save_pretrained(out)
    return out


def _sd() -> dict:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    tok = clip_tokenizer()
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, norm_num_groups=4, cross_attention_dim=16, attention_head_dim=2,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    return {"_class": "StableDiffusionPipeline", "vae": vae(), "text_encoder": clip_text(tok), "tokenizer": tok,
            "unet": unet, "scheduler": DDPMScheduler(beta_schedule="scaled_linear"), "safety_checker": None,
            "feature_extractor": None, "requires_safety_checker": False}


def _sdxl() -> dict:
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    tok, tok2 = clip_tokenizer(), clip_tokenizer()
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, norm_num_groups=4, cross_attention_dim=32, attention_head_dim=(2, 4),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=4,
                                projection_class_embeddings_input_dim=6 * 4 + 16)
    return {"_class": "StableDiffusionXLPipeline", "vae": vae(), "text_encoder": clip_text(tok), "tokenizer": tok,
            "text_encoder_2": clip_text(tok2, 16, projection=16), "tokenizer_2": tok2, "unet": unet,
            "scheduler": EulerDiscreteScheduler(beta_schedule="scaled_linear")}


def _sd3() -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    tok, tok2, tok3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=1, in_channels=4, out_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=32)
    return {"_class": "StableDiffusion3Pipeline", "vae": vae(shift_factor=0.06), "transformer": transformer,
            "text_encoder": clip_text(tok, 16, projection=16), "tokenizer": tok,
            "text_encoder_2": clip_text(tok2, 16, projection=16), "tokenizer_2": tok2,
            "text_encoder_3": t5_encoder(tok3, 32), "tokenizer_3": tok3, "scheduler": FlowMatchEulerDiscreteScheduler()}


def _flux() -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    tok, tok2 = clip_tokenizer(77), t5_tokenizer()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, out_channels=16, num_layers=1,
                                         num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                         joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=False,
                                         axes_dims_rope=(4, 6, 6))
    return {"_class": "FluxPipeline", "vae": vae(shift_factor=0.1), "transformer": transformer,
            "text_encoder": clip_text(tok), "tokenizer": tok, "text_encoder_2": t5_encoder(tok2, 32),
            "tokenizer_2": tok2, "scheduler": FlowMatchEulerDiscreteScheduler()}


def _sana() -> dict:
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    tok = gemma_tokenizer()
    text = Gemma2Model(Gemma2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=8, pad_token_id=0,
                                    eos_token_id=1, bos_token_id=2))
    dc = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                       encoder_block_types=("ResBlock", "EfficientViTBlock"),
                       decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
                       decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)),
                       decoder_qkv_multiscales=((), (5,)), encoder_layers_per_block=(1, 1),
                       decoder_layers_per_block=(1, 1), upsample_block_type="interpolate",
                       downsample_block_type="conv", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                       scaling_factor=0.41)
    transformer = SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=1,
                                         num_attention_heads=2, attention_head_dim=4, num_cross_attention_heads=2,
                                         cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=16,
                                         sample_size=16)
    return {"_class": "SanaPipeline", "tokenizer": tok, "text_encoder": text, "vae": dc, "transformer": transformer,
            "scheduler": FlowMatchEulerDiscreteScheduler()}


def _pixart_sigma() -> dict:
    from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel

    tok = t5_tokenizer()
    transformer = PixArtTransformer2DModel(sample_size=16, num_layers=1, patch_size=2, attention_head_dim=8,
                                           num_attention_heads=2, caption_channels=32, in_channels=4,
                                           cross_attention_dim=16, out_channels=8, attention_bias=True,
                                           activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                           norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    return {"_class": "PixArtSigmaPipeline", "tokenizer": tok, "text_encoder": t5_encoder(tok, 32), "vae": vae(),
            "transformer": transformer, "scheduler": DPMSolverMultistepScheduler()}


def qwen_tokenizer():  # -> Qwen2Tokenizer
    """Qwen2's byte-level BPE with the byte alphabet, no merges, and the chat template's special tokens."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
    vocab = {t: i for i, t in enumerate(sorted(ByteLevel.alphabet()))}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[])
    tok.add_special_tokens({"additional_special_tokens": special[1:]})
    return tok


def _qwen_image() -> dict:
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = qwen_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")}
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": len(tok),
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16, vocab_size=len(tok), vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], image_token_id=ids["<|image_pad|>"])
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                              guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    return {"_class": "QwenImagePipeline", "tokenizer": tok, "text_encoder": Qwen2_5_VLForConditionalGeneration(config),
            "vae": vae, "transformer": transformer, "scheduler": FlowMatchEulerDiscreteScheduler()}
