"""ReportGenerator on CPU with tiny shapes: forward/backward, save/load, pretrained parts, generate."""

import dataclasses
import shutil

import pytest
import torch
import torchvision
from transformers import GPT2Config, GPT2LMHeadModel

from medexgen_lib.config import ModelConfig
from medexgen_lib.model import PretrainedUnavailable, ReportGenerator
from medexgen_lib.tokenizer import train_tokenizer

TEXTS = ["Heart size normal. No pleural effusion or pneumothorax.",
         "Cardiomegaly. Small left pleural effusion.", "Right apical pneumothorax."] * 10


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, 400)


def tiny_cfg(**changes):
    base = ModelConfig(encoder="resnet18", encoder_pretrained=False, decoder_pretrained=False,
                       n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    return dataclasses.replace(base, **changes)


def _batch(tokenizer, batch=2, size=64):
    torch.manual_seed(0)
    ids = tokenizer(TEXTS[:batch], return_tensors="pt", padding=True)
    return torch.randn(batch, 2, 3, size, size), ids["input_ids"], ids["attention_mask"]


def test_forward_backward_and_shapes(tokenizer):
    torch.manual_seed(0)
    model = ReportGenerator.build(tiny_cfg(), tokenizer, image_size=64, max_length=32)
    images, ids, mask = _batch(tokenizer)
    visual, visual_mask = model.encode(images)
    assert visual.shape == (2, 2 * 2 * 2, 32) and visual_mask.shape == (2, 8)
    out = model(images, ids, mask, labels=ids)
    assert out.logits.shape == (*ids.shape, len(tokenizer))
    out.loss.backward()
    assert model.projection.weight.grad.abs().sum() > 0
    assert model.encoder[0].weight.grad.abs().sum() > 0  # gradients reach the ResNet
    summary = model.parameter_summary()
    assert summary["total"] == summary["encoder"] + summary["projection + view/grid embeddings"] + summary["decoder"]


def test_view_mask_hides_a_blank_view(tokenizer):
    torch.manual_seed(0)
    model = ReportGenerator.build(tiny_cfg(), tokenizer, 64, 32).eval()
    images, ids, mask = _batch(tokenizer)
    only_frontal = torch.tensor([[True, False], [True, False]])
    changed = images.clone()
    changed[:, 1] = torch.randn_like(changed[:, 1])
    a = model(images, ids, mask, view_mask=only_frontal).logits
    b = model(changed, ids, mask, view_mask=only_frontal).logits
    c = model(changed, ids, mask).logits
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, c, atol=1e-3)


def test_save_then_load_gives_identical_logits(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = ReportGenerator.build(tiny_cfg(), tokenizer, 64, 32).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = ReportGenerator.from_pretrained(tmp_path / "m").eval()
    images, ids, mask = _batch(tokenizer)
    assert torch.equal(model(images, ids, mask).logits, loaded(images, ids, mask).logits)
    assert loaded.tokenizer.encode(TEXTS[0]) == tokenizer.encode(TEXTS[0])
    model.save_pretrained(tmp_path / "m")  # replacing an existing folder works too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.reliability
def test_weights_that_do_not_fit_the_config_are_refused(tokenizer, tmp_path):
    ReportGenerator.build(tiny_cfg(), tokenizer, 64, 32).save_pretrained(tmp_path / "a")
    ReportGenerator.build(tiny_cfg(n_embd=64), tokenizer, 64, 32).save_pretrained(tmp_path / "b")
    shutil.copy(tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.safetensors")
    with pytest.raises(ValueError, match="do not fit .*config.json: size mismatch for"):
        ReportGenerator.from_pretrained(tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="missing; notebook 04_training writes"):
        ReportGenerator.from_pretrained(tmp_path / "missing")
    (tmp_path / "b" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        ReportGenerator.from_pretrained(tmp_path / "b")


@pytest.mark.reliability
@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_damaged_weights_file_is_named(damage, tokenizer, tmp_path):
    ReportGenerator.build(tiny_cfg(), tokenizer, 64, 32).save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\x00junk" * 99}[damage])
    with pytest.raises(ValueError, match=r"m/model\.safetensors are not a readable safetensors file"):
        ReportGenerator.from_pretrained(tmp_path / "m")


def test_pretrained_parts_load_from_local_files(tokenizer, tmp_path):
    torch.manual_seed(1)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=64, n_embd=32,
                                      n_layer=2, n_head=2))  # the tokenizer's own base vocabulary
    gpt2.save_pretrained(tmp_path / "gpt2-tiny")
    resnet = torchvision.models.resnet18(weights=None)
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pth")
    cfg = tiny_cfg(encoder_pretrained=True, encoder_weights=str(tmp_path / "resnet18.pth"),
                   decoder_pretrained=True, decoder_source=str(tmp_path / "gpt2-tiny"),
                   n_embd=999)  # ignored: sizes come from the pretrained GPT-2
    model = ReportGenerator.build(cfg, tokenizer, 64, 32)
    assert model.config.n_embd == 32 and model.config.n_positions == 64
    assert torch.equal(model.encoder[0].weight, resnet.conv1.weight)
    assert torch.equal(model.decoder.transformer.h[1].mlp.c_fc.weight, gpt2.transformer.h[1].mlp.c_fc.weight)
    assert model.decoder.get_input_embeddings().weight.shape[0] == len(tokenizer)  # resized
    assert model.config.decoder_init.startswith("pretrained:")
    assert model.config.encoder_init.startswith("imagenet:")


@pytest.mark.reliability
def test_missing_pretrained_weights_say_how_to_provide_them(tokenizer, tmp_path):
    with pytest.raises(PretrainedUnavailable, match="model.decoder_pretrained=false"):
        ReportGenerator.build(tiny_cfg(decoder_pretrained=True, decoder_source=str(tmp_path / "none")),
                              tokenizer, 64, 32)
    with pytest.raises(PretrainedUnavailable, match="does not exist"):
        ReportGenerator.build(tiny_cfg(encoder_pretrained=True, encoder_weights=str(tmp_path / "x.pth")),
                              tokenizer, 64, 32)


@pytest.mark.reliability
def test_pickled_code_in_encoder_weights_is_refused(tokenizer, tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"conv1.weight": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(PretrainedUnavailable, match="safely"):
        ReportGenerator.build(tiny_cfg(encoder_pretrained=True, encoder_weights=str(tmp_path / "evil.pth")),
                              tokenizer, 64, 32)


def test_generate_greedy_and_beam_return_decodable_text(tokenizer):
    torch.manual_seed(0)
    model = ReportGenerator.build(tiny_cfg(), tokenizer, 64, 32).eval()
    images, _, _ = _batch(tokenizer)
    greedy = model.generate(images, max_new_tokens=6)
    assert greedy.shape[0] == 2 and greedy.shape[1] <= 6
    assert torch.equal(greedy, model.generate(images, max_new_tokens=6))  # deterministic
    beam = model.generate(images, max_new_tokens=6, num_beams=3)
    texts = model.decode(beam)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


@pytest.mark.reliability
def test_wrong_image_size_is_named(tokenizer):
    model = ReportGenerator.build(tiny_cfg(), tokenizer, 64, 32)
    with pytest.raises(ValueError, match="expects 64 px"):
        model.encode(torch.randn(1, 2, 3, 96, 96))
