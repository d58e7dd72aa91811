"""Speech encoders: the light log-mel encoder and tiny random wav2vec2/HuBERT/WavLM backbones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from transformers import (
    AutoModel,
    BertConfig,
    HubertConfig,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    WavLMConfig,
)

from mmtalker.errors import MMTalkerError
from mmtalker.nn.speech import (
    LightSpeechEncoder,
    PretrainedSpeechEncoder,
    SpeechConfig,
    _standardize,
    build_speech_encoder,
    decoder_levels,
    mel_filterbank,
    phone_readout,
    read_phones,
    register_factor,
    resample_frames,
    scale_gradient,
    voice_pitch,
    warp_matrix,
)

# transformers' WavLM attention mixes a float bias with a boolean padding mask; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")

SR = 16000
# (config class, feat_extract_norm): both input conventions, all three model families.
BACKBONES = {
    "wav2vec2": (Wav2Vec2Config, "layer"),
    "hubert": (HubertConfig, "group"),
    "wavlm": (WavLMConfig, "layer"),
}


def speechlike(seconds: float, seed: int = 0, batch: int = 1) -> torch.Tensor:
    """Amplitude-modulated noise with a drifting tone: broadband, non-stationary, deterministic."""
    gen = torch.Generator().manual_seed(seed)
    n = round(seconds * SR)
    t = torch.arange(n) / SR
    envelope = 0.5 + 0.5 * torch.sin(2 * torch.pi * 3.0 * t + seed)
    tone = torch.sin(2 * torch.pi * (150 + 40 * torch.sin(2 * torch.pi * 0.7 * t)) * t)
    noise = torch.randn(batch, n, generator=gen)
    return (envelope * (0.3 * tone + 0.1 * noise)).float()


def light(**overrides: object) -> LightSpeechEncoder:
    torch.manual_seed(0)
    encoder = build_speech_encoder(SpeechConfig(dim=32, **overrides))
    assert isinstance(encoder, LightSpeechEncoder)
    return encoder.eval()


def save_backbone(directory: Path, kind: str) -> Path:
    config_class, norm = BACKBONES[kind]
    config = config_class(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16, 16, 16),
        conv_kernel=(10, 8, 8),
        conv_stride=(5, 8, 8),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        feat_extract_norm=norm,
        do_stable_layer_norm=norm == "layer",
        num_buckets=16,
        vocab_size=8,
    )
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def backbones(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("backbones")
    return {kind: save_backbone(root / kind, kind) for kind in BACKBONES}


def pretrained(path: Path, **overrides: object) -> PretrainedSpeechEncoder:
    torch.manual_seed(0)
    encoder = build_speech_encoder(
        SpeechConfig(kind="pretrained", path=str(path), dim=24, **overrides)
    )
    assert isinstance(encoder, PretrainedSpeechEncoder)
    return encoder


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


# --- configuration and shared pieces ---------------------------------------------------------


def test_config_rejects_inconsistent_settings() -> None:
    with pytest.raises(ValidationError, match="needs path"):
        SpeechConfig(kind="pretrained")
    with pytest.raises(ValidationError, match="one hidden-state index per level"):
        SpeechConfig(layers=[1, 2], levels=3)
    with pytest.raises(ValidationError, match="register_hz applies to the light encoder"):
        SpeechConfig(kind="pretrained", path="model", register_hz=120.0)
    with pytest.raises(ValidationError, match="width sets the light encoder's channels"):
        SpeechConfig(kind="pretrained", path="model", width=192)
    with pytest.raises(ValidationError, match="multirate sets the light encoder's stage rates"):
        SpeechConfig(kind="pretrained", path="model", multirate=True)
    with pytest.raises(ValidationError, match="sorted"):
        SpeechConfig(layers=[3, 1], levels=2)
    with pytest.raises(ValidationError, match="greater than or equal to 2"):
        SpeechConfig(max_chunk_seconds=1.5)
    with pytest.raises(ValidationError, match="Extra inputs"):
        SpeechConfig(hidden=12)


def test_resample_frames_is_interpolate_when_frames_tile_the_audio() -> None:
    x = torch.randn(2, 37, 5)
    for num_frames in (1, 10, 37, 90):
        expected = F.interpolate(
            x.transpose(1, 2), size=num_frames, mode="linear", align_corners=False
        ).transpose(1, 2)
        torch.testing.assert_close(resample_frames(x, num_frames, 37.0), expected)


# --- light encoder --------------------------------------------------------------------------


@pytest.mark.parametrize("num_frames", [1, 7, 30, 75])
@pytest.mark.parametrize("batch", [1, 3])
def test_light_shapes(num_frames: int, batch: int) -> None:
    out = light()(speechlike(1.3, batch=batch), num_frames)
    assert len(out) == 3
    for level in out:
        assert level.shape == (batch, num_frames, 32)
        assert torch.isfinite(level).all()


@pytest.mark.parametrize("multirate", [False, True])
@pytest.mark.parametrize("samples", [1, 159, 161, 12345, SR - 1, SR + 1])
def test_light_odd_and_tiny_lengths(samples: int, multirate: bool) -> None:
    audio = speechlike(samples / SR)
    assert audio.shape[1] == samples
    out = light(levels=3, n_mels=33, multirate=multirate)(audio, 5)
    assert [level.shape for level in out] == [(1, 5, 32)] * 3
    assert all(torch.isfinite(level).all() for level in out)


def test_light_width_sets_the_channels_not_the_features() -> None:
    narrow, wide = light(), light(width=48)
    assert narrow.stem.out_channels == 32
    assert wide.stem.out_channels == 48
    assert all(block.mix2.out_channels == 48 for block in wide.blocks)
    audio = speechlike(1.0, batch=2)
    assert [level.shape for level in wide(audio, 20)] == [(2, 20, 32)] * 3
    assert sum(p.numel() for p in wide.parameters()) > sum(p.numel() for p in narrow.parameters())


@pytest.mark.parametrize(("multirate", "rates"), [(False, [50, 50, 50]), (True, [50, 25, 12.5])])
def test_light_multirate_halves_each_stage_rate(multirate: bool, rates: list[float]) -> None:
    encoder = light(levels=3, blocks_per_level=2, multirate=multirate)
    seen: list[int] = []
    for block in encoder.blocks:
        block.register_forward_hook(lambda module, args, out: seen.append(out.shape[-1]))
    out = encoder(speechlike(2.0), 60)
    assert seen == [round(2 * rate) for rate in rates for _ in range(2)]
    assert [level.shape for level in out] == [(1, 60, 32)] * 3


def test_light_is_deterministic() -> None:
    audio = speechlike(2.0, batch=2)
    first = light()(audio, 50)
    second = light()(audio, 50)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def voice(pitch: float, seconds: float = 1.5, formant_scale: float = 1.0) -> torch.Tensor:
    """A vowel-like voice: a pulse train at ``pitch`` through resonances at 700, 1200 and
    2500 Hz (times ``formant_scale``), on for 0.3 s and off for 0.1 s."""
    t = torch.arange(round(seconds * SR)) / SR
    pulses = torch.zeros_like(t)
    pulses[(torch.arange(0.0, seconds, 1.0 / pitch) * SR).long()] = 1.0
    ring = torch.arange(400) / SR
    resonances = sum(
        torch.exp(-ring * 300) * torch.sin(2 * torch.pi * hz * formant_scale * ring)
        for hz in (700.0, 1200.0, 2500.0)
    )
    out = torch.nn.functional.conv1d(
        pulses[None, None], resonances.flip(0)[None, None], padding=399
    )[0, 0, : len(t)]
    return (0.3 * out / out.abs().max() * ((t % 0.4) < 0.3))[None].float()


@pytest.mark.parametrize("pitch", [85.0, 120.0, 210.0, 300.0, 330.0])
def test_voice_pitch_of_voiced_audio(pitch: float) -> None:
    found = voice_pitch(voice(pitch), torch.tensor([round(1.5 * SR)]), SR)
    assert found.item() == pytest.approx(pitch, rel=0.05)


def test_voice_pitch_is_unknown_without_a_voice_and_ignores_padding() -> None:
    noise = torch.randn(1, SR, generator=torch.Generator().manual_seed(0)) * 0.1
    silence = torch.zeros(1, SR)
    assert voice_pitch(torch.cat([noise, silence]), torch.tensor([SR, SR]), SR).isnan().all()
    low, high = voice(100.0), voice(200.0, seconds=1.0)
    # A short high voice padded with the low one's audio: the padding is not heard.
    batch = torch.cat([low, torch.cat([high, low[:, : SR // 2]], dim=1)])
    together = voice_pitch(batch, torch.tensor([low.shape[1], high.shape[1]]), SR)
    alone = [voice_pitch(x, torch.tensor([x.shape[1]]), SR) for x in (low, high)]
    assert together.tolist() == [alone[0].item(), alone[1].item()]


def test_register_factor_moves_higher_voices_down_within_bounds() -> None:
    pitch = torch.tensor([120.0, 150.0, 240.0, 60.0, float("nan")])
    factor = register_factor(pitch, 120.0)
    expected = [1.0, 0.8 ** (1 / 3), 0.8, 1.0, 1.0]  # 2 ** (-1/3) = 0.794: bounded at 0.8
    assert factor.tolist() == pytest.approx(expected)


def test_warp_matrix_moves_every_frequency_by_the_factor() -> None:
    power = torch.zeros(3, 201, 2)
    power[:, 100] = 1.0
    warped = warp_matrix(201, torch.tensor([1.0, 0.8, 1.25])) @ power
    assert warped[0].equal(power[0])
    assert warped[1].argmax(0).tolist() == [80, 80]
    assert warped[2].argmax(0).tolist() == [125, 125]
    # Lowered, the top of the band reads past Nyquist: nothing is there.
    assert ((warp_matrix(201, torch.tensor([0.8])) @ torch.ones(201, 2))[0, 161:] == 0).all()


def test_register_normalisation_brings_a_higher_voice_towards_a_lower_one() -> None:
    # Twice the pitch with formants 2 ** (1/3) higher (a smaller vocal tract): moved to the
    # lower voice's register, its spectral envelope meets the lower voice's.
    low, high = voice(110.0), voice(220.0, formant_scale=2 ** (1 / 3))
    lengths = torch.tensor([low.shape[1]])
    filters = mel_filterbank(SR, 400, 32).T

    def envelope(audio: torch.Tensor, register_hz: float) -> torch.Tensor:
        power = torch.stft(audio, 400, 160, window=torch.hann_window(400), return_complex=True)
        power = power.abs().square().mean(-1, keepdim=True)
        factor = register_factor(voice_pitch(audio, lengths, SR), register_hz)
        # Bands below 6 kHz: lowered by 0.8, the top fifth of the band reads past Nyquist.
        return torch.log(filters @ (warp_matrix(201, factor) @ power)[0, :, 0] + 1e-9)[:26]

    before = relative(envelope(high, 220.0), envelope(low, 110.0))
    after = relative(envelope(high, 110.0), envelope(low, 110.0))
    assert after < 0.5 * before


def test_light_encoder_moves_voices_off_its_register_only() -> None:
    high, lengths = voice(220.0), torch.tensor([round(1.5 * SR)])
    plain = light().log_mel(high, lengths)
    at_its_register = light(register_hz=220.0).log_mel(high, lengths)
    lowered = light(register_hz=110.0).log_mel(high, lengths)
    # Read at its own pitch, the voice's spectrum stays where it was (up to the interpolation).
    assert relative(at_its_register, plain) < 0.1 < 0.2 < relative(lowered, plain)
    # Voices below the reference are left exactly as they are.
    assert torch.equal(light(register_hz=300.0).log_mel(high, lengths), plain)


@pytest.mark.parametrize(
    ("frequency_channels", "register_hz", "multirate"),
    [(0, None, False), (8, None, False), (0, 120.0, False), (0, None, True)],
)
def test_light_padded_batch_matches_unpadded(
    frequency_channels: int, register_hz: float | None, multirate: bool
) -> None:
    short, long = speechlike(1.0, seed=1), speechlike(2.0, seed=2)
    # Garbage in the padding must not matter: only audio_lengths says what is speech.
    batch = torch.cat([torch.cat([short, torch.randn(1, SR)], dim=1), long])
    lengths = torch.tensor([SR, 2 * SR])
    encoder = light(
        frequency_channels=frequency_channels, register_hz=register_hz, multirate=multirate
    )
    together = encoder(batch, 60, audio_lengths=lengths)
    alone_short = encoder(short, 30)
    alone_long = encoder(long, 60)
    # Masking makes padding look like the zero padding of an unpadded signal, so the match holds
    # right up to the end of the shorter utterance.
    for level, a, b in zip(together, alone_short, alone_long, strict=True):
        assert relative(level[0, :30], a[0]) < 1e-5
        assert relative(level[1], b[0]) < 1e-5


def test_light_multirate_pools_odd_lengths_in_a_batch_as_alone() -> None:
    # 1.1 s is 55 frames at 50 Hz, 28 at 25 Hz and 14 at 12.5 Hz: every halving pads a frame.
    short, long = speechlike(1.1, seed=1), speechlike(2.2, seed=2)
    gap = long.shape[1] - short.shape[1]
    batch = torch.cat([torch.cat([short, torch.randn(1, gap)], dim=1), long])
    lengths = torch.tensor([short.shape[1], long.shape[1]])
    encoder = light(multirate=True)
    together = encoder(batch, 66, audio_lengths=lengths)
    for level, alone in zip(together, encoder(short, 33), strict=True):
        assert relative(level[0, :33], alone[0]) < 1e-5


def test_light_receptive_field_grows_with_depth() -> None:
    audio = speechlike(3.0, seed=3)
    # Swap the halves of the last second: the signal there changes, the per-band statistics
    # hardly do, so outside a level's reach only the normalisation moves the features a little.
    cut, half = 2 * SR, SR // 2
    swapped = torch.cat([audio[:, :cut], audio[:, cut + half :], audio[:, cut : cut + half]], 1)
    encoder = light(levels=3)
    with torch.no_grad():
        before, after = encoder(audio, 300), encoder(swapped, 300)  # frame k: [10k, 10k + 10) ms

    def change(frames: slice) -> list[float]:
        """Per level: change in these frames over the change in frames beyond every reach."""
        return [
            relative(b[:, frames], a[:, frames]) / relative(b[:, :30], a[:, :30])
            for a, b in zip(before, after, strict=True)
        ]

    # 100-250 ms before the swap: out of level 0's reach (~90 ms), within level 1's (~330 ms).
    near = change(slice(175, 190))
    assert near[2] > near[1] > 3 * near[0]
    # 0.4-1 s before: only level 2 (~1.3 s) reaches.
    far = change(slice(100, 160))
    assert far[2] > 3 * max(far[0], far[1])


def level_reach_ms(encoder: LightSpeechEncoder, level: int) -> tuple[int, int]:
    """How far (ms) before and after its 20 ms cell output frame 50 of 100 sees in 2 s."""
    logmel = torch.randn(1, encoder.config.n_mels, 200, requires_grad=True)
    # Gradients from the log-mel frames (10 ms) show the reach exactly; the per-utterance
    # standardisation before them would blur it.
    encoder.log_mel = lambda audio, lengths: logmel  # type: ignore[method-assign]
    features = encoder(torch.zeros(1, 200 * encoder.hop), 100)[level]
    features[0, 50].sum().backward()  # the 20 ms cell [1000, 1020) ms
    assert logmel.grad is not None
    reached = logmel.grad[0].abs().sum(0).nonzero().flatten()
    return 10 * (100 - int(reached.min())), 10 * (int(reached.max()) + 1 - 102)


@pytest.mark.parametrize(("blocks_per_level", "reach_ms"), [(1, 75), (3, 195)])
def test_light_level_reach_follows_blocks_per_level(blocks_per_level: int, reach_ms: int) -> None:
    before, after = level_reach_ms(light(levels=2, blocks_per_level=blocks_per_level), 0)
    assert abs(before - reach_ms) <= 20 and abs(after - reach_ms) <= 20, (before, after)


@pytest.mark.parametrize("level", [1, 2])
def test_light_multirate_keeps_each_level_reach(level: int) -> None:
    single = level_reach_ms(light(levels=3, blocks_per_level=1), level)
    multi = level_reach_ms(light(levels=3, blocks_per_level=1, multirate=True), level)
    # Pooled frames widen the reach by at most a cell of each halved rate (40 + 80 ms).
    assert all(0 <= m - s <= 40 * level + 20 for s, m in zip(single, multi, strict=True)), (
        single,
        multi,
    )


def test_light_rejects_bad_inputs() -> None:
    encoder = light()
    with pytest.raises(ValueError, match="batch, samples"):
        encoder(torch.zeros(SR), 10)
    with pytest.raises(ValueError, match="num_frames"):
        encoder(torch.zeros(1, SR), 0)
    with pytest.raises(ValueError, match="one length per item"):
        encoder(torch.zeros(2, SR), 10, audio_lengths=torch.tensor([SR]))
    with pytest.raises(ValueError, match=r"lie in 1\.\.16000"):
        encoder(torch.zeros(2, SR), 10, audio_lengths=torch.tensor([SR, SR + 1]))


@pytest.mark.parametrize("frequency_channels", [0, 4])
def test_light_trains_end_to_end(frequency_channels: int) -> None:
    encoder = light(frequency_channels=frequency_channels).train()
    assert (encoder.frequency is None) == (frequency_channels == 0)
    assert encoder.stem.in_channels == (frequency_channels * 32 or 64)
    sum(level.square().mean() for level in encoder(speechlike(1.0), 30)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())


def test_phone_readout_feeds_its_posteriors_to_the_deepest_level_only() -> None:
    torch.manual_seed(0)
    levels = [torch.randn(2, 7, 16, requires_grad=True) for _ in range(3)]
    plain = phone_readout(SpeechConfig(dim=16, levels=3, phone_classes=5))
    assert plain is not None and plain.feedback is None
    assert decoder_levels(plain, levels) is levels
    assert decoder_levels(None, levels) is levels
    assert read_phones(None, levels) == (levels, None)
    readout = phone_readout(SpeechConfig(dim=16, levels=3, phone_classes=5, phone_features=True))
    assert readout is not None and readout.feedback is not None
    fed, logits = readout(levels)
    assert logits.shape == (2, 7, 5)
    assert fed[0] is levels[0] and fed[1] is levels[1]
    posteriors = torch.softmax(logits, dim=-1)
    torch.testing.assert_close(fed[2], levels[2] + readout.feedback(posteriors))
    torch.testing.assert_close(decoder_levels(readout, levels)[2], fed[2])
    # The motion losses teach how the posteriors are read, never what they say.
    fed[2].square().sum().backward()
    assert readout.linear.weight.grad is None
    assert readout.feedback.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("phone_features", [False, True])
def test_motion_gradient_scales_only_what_the_decoder_passes_back(phone_features: bool) -> None:
    torch.manual_seed(0)
    config = SpeechConfig(dim=16, levels=3, phone_classes=5, phone_features=phone_features)
    readout = phone_readout(config)
    assert readout is not None
    levels = [torch.randn(2, 7, 16, requires_grad=True) for _ in range(3)]

    def gradients(scale: float, loss: str) -> list[torch.Tensor]:
        fed, logits = read_phones(readout, levels, scale)
        torch.testing.assert_close(fed, read_phones(readout, levels)[0])  # forward unchanged
        value = sum(level.sin().sum() for level in fed) if loss == "motion" else logits.sum()
        return torch.autograd.grad(value, levels)

    for whole, scaled in zip(gradients(1.0, "motion"), gradients(0.1, "motion"), strict=True):
        torch.testing.assert_close(scaled, 0.1 * whole)
    for whole, scaled in zip(gradients(1.0, "phones"), gradients(0.1, "phones"), strict=True):
        torch.testing.assert_close(scaled, whole)
    readout.zero_grad()
    fed, _ = read_phones(readout, levels, 0.0)
    fed[2].square().sum().backward()
    if phone_features:  # the feedback still learns how the posteriors are read
        assert readout.feedback.weight.grad.abs().sum() > 0
    assert all(level.grad is None or level.grad.abs().sum() == 0 for level in levels)


def test_scale_gradient() -> None:
    x = torch.randn(4, requires_grad=True)
    y = scale_gradient(x, 0.25)
    torch.testing.assert_close(y, x)
    (y * torch.arange(4.0)).sum().backward()
    torch.testing.assert_close(x.grad, 0.25 * torch.arange(4.0))


# --- pretrained encoders --------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(BACKBONES))
def test_pretrained_shapes(backbones: dict[str, Path], kind: str) -> None:
    encoder = pretrained(backbones[kind]).eval()
    assert encoder.layers == [2, 2, 3]  # upper half of 3 layers, deepest last
    audio = speechlike(1.01, batch=2)
    for num_frames in (1, 25, 60):
        out = encoder(audio, num_frames, audio_lengths=torch.tensor([SR, audio.shape[1]]))
        assert [level.shape for level in out] == [(2, num_frames, 24)] * 3
        assert all(torch.isfinite(level).all() for level in out)


def test_pretrained_explicit_layers(backbones: dict[str, Path]) -> None:
    encoder = pretrained(backbones["hubert"], layers=[0, 3], levels=2)
    assert [level.shape for level in encoder(speechlike(0.5), 12)] == [(1, 12, 24)] * 2
    with pytest.raises(MMTalkerError, match="exceed the 3 layers"):
        pretrained(backbones["hubert"], layers=[1, 4], levels=2)


def test_frozen_backbone_gets_no_gradients(backbones: dict[str, Path]) -> None:
    encoder = pretrained(backbones["wav2vec2"]).train()
    assert not encoder.backbone.training
    sum(level.square().mean() for level in encoder(speechlike(0.6), 20)).backward()
    assert all(p.grad is None for p in encoder.backbone.parameters())
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.projections.parameters()
    )


def test_unfrozen_backbone_trains(backbones: dict[str, Path]) -> None:
    encoder = pretrained(backbones["wavlm"], freeze=False).train()
    assert encoder.backbone.training
    sum(level.square().mean() for level in encoder(speechlike(1.0), 20)).backward()
    grads = [p.grad for p in encoder.backbone.encoder.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    encoder.eval()
    assert not encoder.backbone.training


def test_train_keeps_frozen_backbone_in_eval(backbones: dict[str, Path]) -> None:
    encoder = pretrained(backbones["hubert"])
    encoder.train()
    assert encoder.training and encoder.projections.training
    assert not any(module.training for module in encoder.backbone.modules())
    audio = speechlike(0.5)
    # Eval mode means no dropout: two training-mode passes agree.
    for a, b in zip(encoder(audio, 10), encoder(audio, 10), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["wav2vec2", "wavlm"])
def test_pretrained_padded_batch_with_attention_mask(backbones: dict[str, Path], kind: str) -> None:
    encoder = pretrained(backbones[kind]).eval()
    assert encoder.use_attention_mask and encoder.normalize
    short, long = speechlike(1.0, seed=1), speechlike(2.0, seed=2)
    batch = torch.cat([F.pad(short, (0, SR)), long])
    with torch.no_grad():
        together = encoder(batch, 50, audio_lengths=torch.tensor([SR, 2 * SR]))
        alone = encoder(short, 25)
    for level, a in zip(together, alone, strict=True):
        assert relative(level[0, :25], a[0]) < 1e-5


def test_normalisation_matches_feature_extractor() -> None:
    audio = [np.random.default_rng(0).normal(3.0, 2.0, n).astype(np.float32) for n in (900, 1600)]
    extractor = Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)
    expected = extractor(audio, sampling_rate=SR, padding=True, return_tensors="pt")
    batch = torch.stack([F.pad(torch.from_numpy(a), (0, 1600 - len(a))) for a in audio])
    mask = expected["attention_mask"].float()
    torch.testing.assert_close(_standardize(batch, mask), expected["input_values"])


def test_preprocessor_config_overrides_model_defaults(
    backbones: dict[str, Path], tmp_path: Path
) -> None:
    directory = save_backbone(tmp_path / "m", "hubert")
    Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True).save_pretrained(
        directory
    )
    encoder = pretrained(directory)
    assert encoder.normalize and encoder.use_attention_mask
    plain = pretrained(backbones["hubert"])
    assert not plain.normalize and not plain.use_attention_mask

    Wav2Vec2FeatureExtractor(sampling_rate=8000).save_pretrained(directory)
    with pytest.raises(MMTalkerError, match="expects 8000 Hz"):
        pretrained(directory)


def test_chunked_audio(backbones: dict[str, Path]) -> None:
    whole = pretrained(backbones["wav2vec2"], layers=[0, 3], levels=2).eval()
    chunked = pretrained(backbones["wav2vec2"], layers=[0, 3], levels=2, max_chunk_seconds=2.5)
    chunked.eval()
    short = speechlike(1.5)
    for a, b in zip(whole(short, 40), chunked(short, 40), strict=True):
        assert torch.equal(a, b)

    # 4.5 s at 50 frames per second: chunks [0, 125), [75, 200), [150, 225), cross-faded over
    # [75, 125) and [150, 200). Hidden state 0 only sees +-9 frames (convolutions and the
    # positional convolution), so away from chunk edges it must equal the unchunked features.
    audio = speechlike(4.5, batch=2)
    lengths = torch.tensor([4 * SR, audio.shape[1]])
    with torch.no_grad():
        out = chunked(audio, 225, audio_lengths=lengths)
        reference = whole(audio, 225, audio_lengths=lengths)
    assert [level.shape for level in out] == [(2, 225, 24)] * 2
    assert all(torch.isfinite(level).all() for level in out)
    away = torch.ones(225, dtype=torch.bool)
    for edge in (75, 125, 150, 200):
        away[edge - 10 : edge + 10] = False
    torch.testing.assert_close(out[0][:, away], reference[0][:, away], atol=1e-5, rtol=1e-4)
    assert relative(out[0], reference[0]) < 0.05


def test_missing_or_wrong_model_folders(tmp_path: Path) -> None:
    with pytest.raises(MMTalkerError, match=r"does not exist.*download"):
        pretrained(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(MMTalkerError, match="is not a folder"):
        pretrained(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MMTalkerError, match=r"no config\.json"):
        pretrained(tmp_path / "empty")
    BertConfig(hidden_size=8, num_hidden_layers=1).save_pretrained(tmp_path / "bert")
    with pytest.raises(MMTalkerError, match="'bert' model"):
        pretrained(tmp_path / "bert")
    Wav2Vec2Config().save_pretrained(tmp_path / "weightless")
    with pytest.raises(MMTalkerError, match="cannot load the weights"):
        pretrained(tmp_path / "weightless")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text(json.dumps({"model_type": "nonsense"}))
    with pytest.raises(MMTalkerError, match="cannot read"):
        pretrained(tmp_path / "broken")
