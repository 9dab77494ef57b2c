"""Tiny latent diffusion model pieces: latent standardisation is exact, the UNet matches the VAE's latent size."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from augbench.specs import DiffusionSpec
from augbench.toy.diffusion import build_unet, build_vae, denoising_loss, noise_scheduler, standardise_latents


def test_standardised_latents_are_zero_mean_unit_variance_and_decode_the_same() -> None:
    torch.manual_seed(0)
    vae = build_vae(DiffusionSpec(vae_widths=(8, 16), norm_groups=4))
    with torch.no_grad():
        vae.quant_conv.bias[:4] += torch.tensor([1.0, -2.0, 3.0, 0.5])  # an encoder with a large latent mean
        x = torch.rand(8, 3, 32, 32) * 2 - 1
        z = vae.encode(x).latent_dist.mean
        before = vae.decode(z).sample
        standardise_latents(vae, z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3)))
        z2 = vae.encode(x).latent_dist.mean
        after = vae.decode(z2).sample
    torch.testing.assert_close(z2.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(z2.std(dim=(0, 2, 3)), torch.ones(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=0)
    assert vae.config.scaling_factor == 1.0


def test_unet_sample_size_follows_the_vae_factor() -> None:
    spec = DiffusionSpec(image_size=32, vae_widths=(8, 16, 16), unet_widths=(16, 32), unet_attention=(False, True), norm_groups=4)
    unet = build_unet(spec, cross_attention_dim=24)
    assert unet.config.sample_size == 8
    out = unet(torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), encoder_hidden_states=torch.randn(2, 5, 24)).sample
    assert out.shape == (2, 4, 8, 8)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_denoising_loss_is_zero_only_for_the_schedulers_own_target(prediction: str) -> None:
    """The toy UNet is trained against what its saved scheduler will ask of it at sampling time."""
    sched = noise_scheduler(prediction)
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([1, 100, 300, 500, 800, 999])
    own = eps if prediction == "epsilon" else sched.get_velocity(z0, eps, t)
    other = sched.get_velocity(z0, eps, t) if prediction == "epsilon" else eps
    assert denoising_loss(own, z0, eps, t, sched, 5.0).item() == pytest.approx(0.0, abs=1e-10)
    assert denoising_loss(other, z0, eps, t, sched, 5.0).item() > 1e-3
    assert sched.config.prediction_type == prediction


def test_denoising_loss_rejects_an_unknown_prediction_type() -> None:
    sched = noise_scheduler("sample")
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="prediction_type 'sample'"):
        denoising_loss(x, x, x, torch.tensor([10]), sched, 5.0)


def test_unet_training_takes_mirrored_latents_aligns_features_and_records_a_learning_curve() -> None:
    """REPA's head is trained beside the UNet (and not returned); mirrored images' own latents are used for flips;
    the learning-curve callback sees the EMA UNet at each eval step."""
    from augbench.toy.diffusion import train_unet

    torch.manual_seed(0)
    spec = DiffusionSpec(vae_widths=(8, 16), unet_widths=(16, 32), unet_attention=(False, True), norm_groups=4, unet_steps=4,
                         unet_batch_size=4, repa_weight=0.5, eval_every=2)
    latents, mirrored = torch.randn(10, 4, 16, 16), torch.randn(10, 4, 16, 16)
    states, empty = torch.randn(10, 3, 24), torch.zeros(3, 24)
    features = (torch.randn(10, 12, 4, 4).half(), torch.randn(10, 12, 4, 4).half())
    seen = []

    def evaluate(unet, step: int) -> dict:
        seen.append((step, unet.training))
        return {"fidelity": 0.5, "per_class": {}}

    unet, loss, curve = train_unet(latents, states, empty, spec, torch.device("cpu"), mirrored=mirrored, features=features,
                                   evaluate=evaluate)
    assert [c["step"] for c in curve] == [2, 4] and seen == [(2, False), (4, False)]
    assert loss > 0 and not unet.training
    from diffusers import UNet2DConditionModel

    assert type(unet) is UNet2DConditionModel and not any(k.startswith(("head", "net.")) for k in unet.state_dict()), \
        "the alignment head is not part of the saved UNet"


def test_mirrored_latents_and_repa_each_change_what_the_unet_learns() -> None:
    """Each training fix is in the weights: the mirrored latents (a mirror equal to the image gives the no-mirror
    UNet, another one does not), REPA's alignment (weight 0 against 0.5) and the mirrors' own CLIP features."""
    from augbench.toy.diffusion import train_unet

    spec = DiffusionSpec(vae_widths=(8, 16), unet_widths=(16, 32), unet_attention=(False, True), norm_groups=4, unet_steps=3,
                         unet_batch_size=4, repa_weight=0.5)
    g = torch.Generator().manual_seed(1)
    latents, mirrored = torch.randn(8, 4, 16, 16, generator=g), torch.randn(8, 4, 16, 16, generator=g)
    states, empty = torch.randn(8, 3, 24, generator=g), torch.zeros(3, 24)
    feats = (torch.randn(8, 12, 4, 4, generator=g).half(), torch.randn(8, 12, 4, 4, generator=g).half())

    def weights(spec: DiffusionSpec = spec, **kw: object) -> torch.Tensor:
        torch.manual_seed(0)
        unet, _, _ = train_unet(latents, states, empty, spec, torch.device("cpu"), **kw)
        return torch.cat([p.detach().flatten() for p in unet.parameters()])

    plain = weights(spec=dataclasses.replace(spec, repa_weight=0.0))
    assert torch.equal(weights(spec=dataclasses.replace(spec, repa_weight=0.0), mirrored=latents.clone()), plain)
    assert not torch.equal(weights(spec=dataclasses.replace(spec, repa_weight=0.0), mirrored=mirrored), plain)
    aligned = weights(mirrored=mirrored, features=feats)
    assert not torch.equal(aligned, weights(spec=dataclasses.replace(spec, repa_weight=0.0), mirrored=mirrored, features=feats))
    assert not torch.equal(aligned, weights(mirrored=mirrored, features=(feats[0], torch.zeros_like(feats[1]))))
