"""``ditkit.runtime.draw``: what ``ditkit sample`` does between loading and printing, as library
functions (issue 26, item 4), and ``bench_sample`` timing what a Sampling's step computes."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from ditkit import spec as S
from ditkit.builder import build
from ditkit.runtime.autoencoder import AutoencoderError
from ditkit.runtime.denoiser import Denoiser
from ditkit.runtime.draw import cfg_channels_from, decoder_for, draw, save_images, save_latents
from ditkit.runtime.samplers import sample
from ditkit.runtime.shape_rule import ExportError
from ditkit.spec.sampling import Sampling
from tests.conftest import EXAMPLES
from tests.training.conftest import tiny_model


@pytest.fixture(scope="module")
def pixel():
    spec = S.validate(tiny_model())  # 8x8 grey, 10 classes with a null class
    torch.manual_seed(0)
    return spec, Denoiser(build(spec).eval(), S.EDMObjective())


def test_draw_is_sample_with_the_shape_checked(pixel, tmp_path):
    spec, den = pixel
    s = Sampling(steps=2, sampler="euler", seed=4, cfg_scale=2.0)
    labels = torch.tensor([1, 2, 3])
    images = draw(den, spec, s, count=3, class_labels=labels)
    assert torch.equal(images, sample(den, (3, 1, 8, 8), s, class_labels=labels))
    with pytest.raises(ExportError, match="--resolution"):
        draw(den, spec, s, count=1, resolution=(7, 7), class_labels=labels[:1])
    written = save_images(images, tmp_path / "g.png", ncol=3, individual=tmp_path / "each")
    assert [p.name for p in written] == ["g.png", "000000.png", "000001.png", "000002.png"]
    assert Image.open(tmp_path / "each" / "000002.png").size == (8, 8)
    latents = save_latents(images, tmp_path / "g.png")
    assert latents.name == "g.latents.pt"
    assert torch.equal(torch.load(latents, weights_only=True), images)


def test_decoder_choice_is_checked_before_sampling(pixel, tmp_path):
    spec, _ = pixel
    assert decoder_for(spec) == (None, {})
    with pytest.raises(AutoencoderError, match="--vae: .* pixel-space model"):
        decoder_for(spec, vae=tmp_path)
    latent = S.load(EXAMPLES / "tiny" / "tiny-dit.yaml")
    assert decoder_for(latent) == (None, {})  # the grid path then keeps the latents
    with pytest.raises(AutoencoderError, match="needs? one decoder"):
        decoder_for(latent, required=True)  # an .npz holds images: a decoder is required
    with pytest.raises(AutoencoderError, match="give one decoder, not both"):
        decoder_for(latent, vae=tmp_path, autoencoder=tmp_path / "d.pt")


def test_cfg_channels_come_from_the_metadata_unless_given():
    assert cfg_channels_from(Sampling(), {"ditkit.cfg_channels": "3"}).cfg_channels == 3
    assert (
        cfg_channels_from(Sampling(cfg_channels=2), {"ditkit.cfg_channels": "3"}).cfg_channels == 2
    )
    assert cfg_channels_from(Sampling(), {}).cfg_channels is None


def test_bench_times_the_guided_pair_under_cfg(pixel, monkeypatch):
    from ditkit.deploy.bench import bench_sample

    spec, den = pixel
    batches = []
    original = Denoiser.denoise

    def counting(self, x, *args, **kwargs):
        batches.append(x.shape[0])
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(Denoiser, "denoise", counting)
    model = den.model
    bench_sample(model, S.EDMObjective(), [(8, 8)], engines=("eager",), repeats=1, batch=2)
    assert set(batches) == {2}
    batches.clear()
    bench_sample(
        model,
        S.EDMObjective(),
        [(8, 8)],
        Sampling(cfg_scale=3.0),
        engines=("eager",),
        repeats=1,
        batch=2,
    )
    assert set(batches) == {4}  # conditional and unconditional passes in one call
