"""The training loop on a tiny phantom set: groups, fingerprint, checkpoints, resume, NaN, export."""

import hashlib
import json
import logging
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medexgen_lib.acquisition import acquire, build_studies_table
from medexgen_lib.config import load_config
from medexgen_lib.model import ReportGenerator
from medexgen_lib.preprocess import run_preprocessing
from medexgen_lib.optimization import NewTokenRows, parameter_groups
from medexgen_lib.train import NonFiniteLoss, train
from medexgen_lib.validation import evaluation_fingerprint

from conftest import TINY


@pytest.fixture(scope="module")
def prepared_data(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    cfg = load_config("demo", {**TINY, "paths.data_dir": str(data_dir),
                               "paths.output_dir": str(tmp_path_factory.mktemp("unused"))})
    build_studies_table(cfg, acquire(cfg))
    run_preprocessing(cfg)
    return data_dir


@pytest.fixture
def tiny_cfg(prepared_data, tmp_path):
    def make(**changes):
        settings = {**TINY, "paths.data_dir": str(prepared_data), "paths.output_dir": str(tmp_path / "out")}
        settings.update({k.replace("__", "."): v for k, v in changes.items()})
        return load_config("demo", settings)
    return make


def _stopped_after_epoch_1(tiny_cfg):
    """A 3-epoch run interrupted after epoch 1: checkpoints/last holds epoch 1."""
    cfg = tiny_cfg(train__epochs=3)
    train(cfg, stop_after_epoch=1, progress=False)
    return cfg


def _weights_digest(directory):
    return hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()


def test_parameter_groups_cover_everything_once_without_decay_on_biases_and_norms(tiny_cfg):
    cfg = tiny_cfg(train__lr_encoder=1e-5, train__lr_decoder=2e-5, train__lr_new=3e-4)
    from medexgen_lib.tokenizer import load_tokenizer
    model = ReportGenerator.build(cfg.model, load_tokenizer(cfg.paths.processed / "tokenizer"), 32, 48)
    groups = parameter_groups(model, cfg.train)
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(model.parameters()))
    by_name = {g["name"]: g for g in groups}
    assert by_name["encoder"]["lr"] == 1e-5 and by_name["decoder"]["lr"] == 2e-5
    assert any(p is model.projection.weight for p in by_name["new"]["params"])
    wte = model.decoder.get_input_embeddings().weight
    assert any(p is wte for p in by_name["new"]["params"])  # random-init decoder: all tokens new
    for g in groups:
        assert (g["weight_decay"] == 0.0) == all(p.ndim < 2 for p in g["params"])


def test_cross_attention_of_a_pretrained_decoder_trains_at_the_new_rate(tiny_cfg, tiny_gpt2_dir):
    from medexgen_lib.tokenizer import load_gpt2_tokenizer

    cfg = tiny_cfg(model__decoder_pretrained=True, model__decoder_source=str(tiny_gpt2_dir),
                   train__lr_decoder=5e-5, train__lr_new=5e-4)
    model = ReportGenerator.build(cfg.model, load_gpt2_tokenizer(str(tiny_gpt2_dir)), 32, 48)
    group_of = {name: g["name"].split(" ")[0] for g in parameter_groups(model, cfg.train)
                for name in g["param_names"]}
    cross = [n for n in group_of if "crossattention" in n or "ln_cross_attn" in n]
    assert cross and all(group_of[n] == "new" for n in cross)
    assert group_of["decoder.transformer.h.0.attn.c_attn.weight"] == "decoder"
    assert group_of["decoder.transformer.h.0.ln_1.weight"] == "decoder"
    assert group_of["projection.weight"] == "new" and group_of["encoder.0.weight"] == "encoder"


def test_a_pretrained_decoder_with_another_tokenizer_is_refused(tiny_cfg, tiny_gpt2_dir):
    from medexgen_lib.model import PretrainedUnavailable
    from medexgen_lib.tokenizer import load_tokenizer

    cfg = tiny_cfg(model__decoder_pretrained=True, model__decoder_source=str(tiny_gpt2_dir))
    trained = load_tokenizer(cfg.paths.processed / "tokenizer")  # trained on the phantom reports
    with pytest.raises(PretrainedUnavailable, match=r"tokenizer .*tokenizer.* is not the tokenizer of "
                                                     r"the pretrained GPT-2 '.*tiny_gpt2"):
        ReportGenerator.build(cfg.model, trained, 32, 48)


def test_new_token_rows_step_at_the_new_learning_rate():
    embedding = torch.nn.Embedding(6, 3)
    model = type("M", (), {})()
    model.config = type("C", (), {"pretrained_vocab_size": 4})()
    model.decoder = type("D", (), {"get_input_embeddings": lambda self: embedding})()
    tcfg = load_config("demo", {"train.lr_decoder": 1e-3, "train.lr_new": 1e-2}).train
    rows = NewTokenRows(model, tcfg)
    optimizer = torch.optim.AdamW(embedding.parameters(), lr=1e-3, weight_decay=0.0)
    before = embedding.weight.detach().clone()
    embedding(torch.arange(6)).sum().backward()
    rows.before_step()
    optimizer.step()
    rows.after_step()
    change = (embedding.weight.detach() - before).abs()
    assert torch.allclose(change[:4], torch.full((4, 3), 1e-3), rtol=1e-3)  # Adam's first step: lr
    assert torch.allclose(change[4:], torch.full((2, 3), 1e-2), rtol=1e-3)


def test_fingerprint_changes_with_validation_settings(tiny_cfg):
    cfg = tiny_cfg()
    base, _ = evaluation_fingerprint(cfg, ["CXR1", "CXR2"])
    assert base == evaluation_fingerprint(cfg, ["CXR2", "CXR1"])[0]
    assert base != evaluation_fingerprint(cfg, ["CXR1"])[0]
    assert base != evaluation_fingerprint(tiny_cfg(eval__max_new_tokens=9), ["CXR1", "CXR2"])[0]
    assert base != evaluation_fingerprint(tiny_cfg(eval__num_beams=2), ["CXR1", "CXR2"])[0]


def test_train_writes_history_checkpoints_and_final_model(tiny_cfg):
    cfg = tiny_cfg()
    result = train(cfg, progress=False)
    history = [json.loads(l) for l in result.history.read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    first = history[0]
    for key in ("train_loss", "val_loss", "val", "learning_rates", "seconds", "samples_per_s", "fingerprint"):
        assert key in first
    assert "clinical macro_F1" in first["val"] and first["fingerprint_ok"]
    # every metrics record counts the predictions that state nothing (and got no clinical credit)
    assert isinstance(first["val"]["degenerate_predictions"], int)
    assert "clinical macro_F1 (observations in references)" in first["val"]
    assert (cfg.paths.checkpoints / "last" / "training_state.pt").exists()
    assert json.loads((cfg.paths.checkpoints / "best" / "trainer.json").read_text())["epoch"] == result.best_epoch
    model = ReportGenerator.from_pretrained(result.final_model)
    assert cfg.train.export == "last"  # the demo's
    assert _weights_digest(result.final_model) == _weights_digest(cfg.paths.checkpoints / "last")
    assert model.tokenizer is not None


def test_interrupted_then_resumed_run_ends_bit_identical(tiny_cfg, tmp_path):
    full = tiny_cfg(paths__output_dir=str(tmp_path / "full"))
    train(full, progress=False)
    parted = tiny_cfg(paths__output_dir=str(tmp_path / "parted"))
    first = train(parted, stop_after_epoch=1, progress=False)
    assert first.stopped == "interrupted" and not (parted.paths.models / "final").exists()
    train(parted, resume=True, progress=False)
    for sub in ("checkpoints/last", "models/final"):
        assert _weights_digest(tmp_path / "full" / sub) == _weights_digest(tmp_path / "parted" / sub)
    fields = ("train_loss", "val_loss", "selection_value", "val")
    lines = lambda c: [[json.loads(l)[k] for k in fields] for l in (c.paths.logs / "history.jsonl").read_text().splitlines()]
    assert lines(full) == lines(parted)


@pytest.mark.reliability
def test_resume_with_changed_validation_warns_and_flags(tiny_cfg, caplog):
    cfg = _stopped_after_epoch_1(tiny_cfg)
    changed = tiny_cfg(train__epochs=3, eval__max_new_tokens=5)
    with caplog.at_level(logging.WARNING):
        train(changed, resume=True, progress=False)
    assert "CHANGED VALIDATION SETUP" in caplog.text
    history = [json.loads(l) for l in (cfg.paths.logs / "history.jsonl").read_text().splitlines()]
    assert [h["fingerprint_ok"] for h in history] == [True, False, False]
    assert not any(h["best"] for h in history[1:])
    assert json.loads((cfg.paths.checkpoints / "best" / "trainer.json").read_text())["best_epoch"] == 1
    # the demo exports the last epoch, but not one validated with other settings: the best
    assert changed.train.export == "last" and "exporting the best epoch on val (1)" in caplog.text
    assert _weights_digest(cfg.paths.models / "final") == _weights_digest(cfg.paths.checkpoints / "best")


@pytest.mark.reliability
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_cfg, monkeypatch):
    cfg = _stopped_after_epoch_1(tiny_cfg)
    good = _weights_digest(cfg.paths.checkpoints / "last")
    original = ReportGenerator.forward

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training:
            out.logits = out.logits * float("nan")
        return out
    monkeypatch.setattr(ReportGenerator, "forward", poisoned)
    with pytest.raises(NonFiniteLoss, match="nan at epoch 2"):
        train(cfg, resume=True, progress=False)
    assert _weights_digest(cfg.paths.checkpoints / "last") == good
    assert json.loads((cfg.paths.checkpoints / "last" / "trainer.json").read_text())["epoch"] == 1


@pytest.mark.reliability
def test_a_crash_during_checkpoint_save_leaves_the_previous_one_loadable(tiny_cfg, monkeypatch):
    cfg = _stopped_after_epoch_1(tiny_cfg)
    good = _weights_digest(cfg.paths.checkpoints / "last")

    def crash(self, directory):
        (directory / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt("killed during save")
    monkeypatch.setattr(ReportGenerator, "write_files", crash)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, resume=True, progress=False)
    assert _weights_digest(cfg.paths.checkpoints / "last") == good
    monkeypatch.undo()
    ReportGenerator.from_pretrained(cfg.paths.checkpoints / "last")
    train(cfg, resume=True, progress=False)  # and the run continues from it
    assert (cfg.paths.models / "final" / "model.safetensors").exists()


# --------------------------------------------------------------------------- real faults in a child process

WORKER = Path(__file__).with_name("fault_worker.py")


def _run_worker(settings: dict, mode: str, arg: str = "0", preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(WORKER), json.dumps(settings), mode, arg],
                          capture_output=True, text=True, timeout=600, preexec_fn=preexec_fn)


def _train_here(settings: dict) -> None:
    """What the worker's "train" mode does, in this process (no second interpreter to start)."""
    cfg = load_config("demo", settings)
    last = cfg.paths.checkpoints / "last"
    train(cfg, resume=last.exists() or (last.parent / ".last.old").exists(), progress=False)


@pytest.fixture
def tiny_settings(prepared_data, tmp_path):
    return lambda out: {**TINY, "paths.data_dir": str(prepared_data), "paths.output_dir": str(tmp_path / out)}


@pytest.mark.reliability
def test_killed_mid_epoch_then_resumed_ends_like_an_uninterrupted_run(tiny_settings, tmp_path):
    _train_here(tiny_settings("full"))
    killed = _run_worker(tiny_settings("parted"), "kill-at-step", "5")  # 3 steps per epoch: epoch 2
    assert killed.returncode == -signal.SIGKILL
    last = tmp_path / "parted" / "checkpoints" / "last"
    assert json.loads((last / "trainer.json").read_text())["epoch"] == 1
    _train_here(tiny_settings("parted"))
    for sub in ("checkpoints/last", "models/final"):
        assert _weights_digest(tmp_path / "full" / sub) == _weights_digest(tmp_path / "parted" / sub)


@pytest.mark.reliability
@pytest.mark.parametrize("mode", ["kill-in-save", "kill-between-renames"])
def test_killed_during_checkpoint_save_keeps_the_previous_one_loadable(mode, tiny_settings, tmp_path):
    settings = tiny_settings("out")
    killed = _run_worker(settings, mode, "2")
    assert killed.returncode == -signal.SIGKILL
    checkpoints = tmp_path / "out" / "checkpoints"
    ReportGenerator.from_pretrained(checkpoints / "last")  # puts an interrupted swap back first
    assert json.loads((checkpoints / "last" / "trainer.json").read_text())["epoch"] == 1
    _train_here(settings)
    assert json.loads((checkpoints / "last" / "trainer.json").read_text())["epoch"] == 2
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best", "last"]  # no leftovers


@pytest.mark.reliability
def test_disk_filling_during_export_keeps_the_previous_final_model(tiny_settings, tmp_path, full_disk):
    settings = tiny_settings("out")
    _train_here(settings)
    models = tmp_path / "out" / "models"
    before = _weights_digest(models / "final")
    full = _run_worker(settings, "export", preexec_fn=full_disk(20_000))  # weights are ~300 kB
    assert full.returncode == 3, full.stderr[-2000:]
    message = full.stderr.strip().splitlines()[-1]
    assert "models/final" in message and "File too large" in message, message
    assert _weights_digest(models / "final") == before
    ReportGenerator.from_pretrained(models / "final")
    assert sorted(p.name for p in models.iterdir()) == ["final"]  # no half-written staging folder


@pytest.mark.reliability
def test_a_checkpoint_that_would_run_code_is_refused(tiny_cfg, tmp_path):
    cfg = _stopped_after_epoch_1(tiny_cfg)
    state_file = cfg.paths.checkpoints / "last" / "training_state.pt"
    marker = tmp_path / "code-ran"
    torch.save({"optimizer": _RunsCode(str(marker))}, state_file)
    with pytest.raises(ValueError, match=r"training_state\.pt"):
        train(cfg, resume=True, progress=False)
    assert not marker.exists()


class _RunsCode:
    """Unpickling this would create a file: a stand-in for a hostile checkpoint."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.reliability
def test_a_checkpoint_that_does_not_fit_the_config_is_named(tiny_cfg):
    _stopped_after_epoch_1(tiny_cfg)
    wider = tiny_cfg(train__epochs=3, model__n_embd=48)
    with pytest.raises(ValueError, match=r"checkpoints/last does not fit .*: size mismatch for"):
        train(wider, resume=True, progress=False)


@pytest.mark.reliability
def test_disk_filling_during_a_checkpoint_save_stops_training_with_one_line(tiny_cfg, tiny_settings, full_disk):
    cfg = _stopped_after_epoch_1(tiny_cfg)
    last = cfg.paths.checkpoints / "last"
    good = _weights_digest(last)
    overrides = [arg for key, value in {**tiny_settings("out"), "train.epochs": 3}.items()
                 for arg in ("-p", key, str(value))]
    run = subprocess.run([sys.executable, "-m", "medexgen_lib", "train", "--resume", *overrides],
                         capture_output=True, text=True, timeout=600, preexec_fn=full_disk(20_000))
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    error = run.stderr.strip().splitlines()[-1]
    assert error.startswith("error: could not write") and "checkpoints/" in error and "File too large" in error
    assert _weights_digest(last) == good
    assert sorted(p.name for p in cfg.paths.checkpoints.iterdir()) == ["best", "last"]


@pytest.mark.reliability
@pytest.mark.parametrize("damaged", ["trainer.json", "rng_0.json", "model.safetensors"])
def test_a_damaged_checkpoint_file_is_named_on_resume(damaged, tiny_cfg):
    cfg = _stopped_after_epoch_1(tiny_cfg)
    path = cfg.paths.checkpoints / "last" / damaged
    path.write_bytes(path.read_bytes()[:40])  # cut short, as a failing disk might
    with pytest.raises(ValueError, match=rf"last/{damaged}.*(not valid JSON|truncated or corrupt)"):
        train(cfg, resume=True, progress=False)


@pytest.mark.reliability
def test_a_history_line_torn_by_a_kill_is_skipped_on_resume(tiny_cfg, caplog):
    cfg = tiny_cfg()
    train(cfg, stop_after_epoch=1, progress=False)
    history = cfg.paths.logs / "history.jsonl"
    with history.open("a") as handle:
        handle.write('{"epoch": 2, "step": 6, "train_lo')  # the process died mid-line
    with caplog.at_level(logging.WARNING):
        train(cfg, resume=True, progress=False)
    assert "history.jsonl line 2 is damaged" in caplog.text
    assert [json.loads(l)["epoch"] for l in history.read_text().splitlines()] == [1, 2]


# --------------------------------------------------------------------------- blank views


def test_a_blank_view_does_not_enter_batchnorm_statistics_in_training():
    from medexgen_lib.model import ReportGeneratorConfig

    torch.manual_seed(0)
    model = ReportGenerator(ReportGeneratorConfig(vocab_size=20, bos_token_id=0, eos_token_id=1,
                                                  pad_token_id=2, encoder="resnet18", image_size=32,
                                                  n_layer=1, n_head=2, n_embd=16)).train()
    reference = ReportGenerator(model.config).train()
    reference.load_state_dict(model.state_dict())
    images = torch.rand(3, 2, 3, 32, 32) + 0.5
    view_mask = torch.tensor([[True, False], [True, True], [False, True]])
    images[~view_mask] = 0.0  # missing_view=blank: a zero image stands in for the absent view
    tokens, mask = model.encode(images, view_mask)
    reference.encoder(images[view_mask])  # what BatchNorm should see: the present views only
    stats = lambda m: {k: v for k, v in m.encoder.state_dict().items() if "running" in k}
    expected = stats(reference)
    for name, value in stats(model).items():
        assert torch.allclose(value, expected[name], atol=1e-6), name
    assert tokens.shape == (3, 2 * 1, 16) and mask.tolist() == view_mask.long().tolist()


# --------------------------------------------------------------------------- resume after early stopping


@pytest.mark.parametrize("export, epoch", [("best", 1), ("last", 2)])
def test_a_resumed_run_that_stopped_early_trains_no_further_epoch_and_exports_as_set(
        tiny_cfg, monkeypatch, export, epoch):
    import medexgen_lib.train as train_module
    from medexgen_lib.model_card import ModelCard

    flat = {"clinical macro_F1": 0.5, "BLEU-4": 0.2, "distinct_predictions": 1}  # epoch 1 best, then none better
    monkeypatch.setattr(train_module, "validate", lambda *args, **kwargs: (dict(flat), 1.0, []))
    cfg = tiny_cfg(train__epochs=4, train__patience=1, train__export=export)
    first = train(cfg, progress=False)
    assert (first.best_epoch, first.exported_epoch) == (1, epoch)
    assert _weights_digest(first.final_model) == _weights_digest(cfg.paths.checkpoints / ("best", "last")[epoch - 1])
    card = ModelCard.load(first.final_model / "README.md").data.to_dict()
    assert card["medexgen"]["validation"]["epoch"] == epoch
    text = (first.final_model / "README.md").read_text()
    assert (f"Epoch {epoch}, chosen by" in text) == (export == "best")
    assert (f"Epoch {epoch}, the last trained" in text) == (export == "last")
    assert first.stopped.startswith("early stopping") and first.epochs_run == 2
    last = _weights_digest(cfg.paths.checkpoints / "last")
    shutil.rmtree(cfg.paths.models / "final")
    resumed = train(cfg, resume=True, progress=False)
    assert resumed.stopped.startswith("early stopping") and resumed.epochs_run == 2
    assert [json.loads(l)["epoch"] for l in (cfg.paths.logs / "history.jsonl").read_text().splitlines()] == [1, 2]
    assert _weights_digest(cfg.paths.checkpoints / "last") == last
    assert _weights_digest(resumed.final_model) == _weights_digest(first.final_model)


# --------------------------------------------------------------------------- accumulation and learning rates


def _weights(directory: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(directory / "model.safetensors"))


def test_gradient_accumulation_matches_one_batch_of_the_combined_size(tiny_cfg, tmp_path):
    # Without batch statistics (frozen BatchNorm), dropout and augmentation, 2 x 4 must be 8:
    # the LM loss per token and the observation head's loss per study of the whole window.
    same = {"train__epochs": 1, "train__freeze_batchnorm": True, "model__dropout": 0.0,
            "images__augment": False, "guidance__loss_weight": 1.0}
    big = tiny_cfg(paths__output_dir=str(tmp_path / "big"), train__batch_size=8, **same)
    accumulated = tiny_cfg(paths__output_dir=str(tmp_path / "acc"), train__batch_size=4,
                           train__grad_accum=2, **same)
    from medexgen_lib.preprocess import load_split
    assert len(load_split(big, "train")) % 8 == 5  # the last window is 4 + 1: unequal token counts
    results = [train(c, progress=False) for c in (big, accumulated)]
    assert [json.loads(l)["step"] for r in results for l in r.history.read_text().splitlines()] == [3, 3]
    expected, got = (_weights(c.paths.checkpoints / "last") for c in (big, accumulated))
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        assert torch.allclose(got[name], value, rtol=1e-4, atol=1e-5), name  # float summation order


@pytest.fixture(scope="module")
def gpt2_prepared_data(tmp_path_factory, tiny_gpt2_dir):
    """The tiny phantom set prepared with the stand-in pretrained GPT-2's tokenizer."""
    data_dir = tmp_path_factory.mktemp("gpt2data")
    cfg = load_config("demo", {**TINY, "paths.data_dir": str(data_dir), "tokenizer.kind": "gpt2",
                               "tokenizer.gpt2_source": str(tiny_gpt2_dir),
                               "paths.output_dir": str(tmp_path_factory.mktemp("unused"))})
    build_studies_table(cfg, acquire(cfg))
    run_preprocessing(cfg)
    return data_dir


def test_new_token_rows_train_at_lr_new_end_to_end_with_decay_and_tied_weights(
        gpt2_prepared_data, tiny_gpt2_dir, tmp_path):
    def one_step(name, lr_decoder, lr_new):
        cfg = load_config("demo", {**TINY, "paths.data_dir": str(gpt2_prepared_data),
                                   "paths.output_dir": str(tmp_path / name), "tokenizer.kind": "gpt2",
                                   "tokenizer.gpt2_source": str(tiny_gpt2_dir),
                                   "model.decoder_pretrained": True,
                                   "model.decoder_source": str(tiny_gpt2_dir), "train.epochs": 1,
                                   "train.batch_size": 64, "train.weight_decay": 0.1,
                                   "train.lr_decoder": lr_decoder, "train.lr_new": lr_new})
        final = train(cfg, progress=False).final_model
        assert [json.loads(l)["step"] for l in (cfg.paths.logs / "history.jsonl").read_text().splitlines()] == [1]
        return ReportGenerator.from_pretrained(final)

    unequal, all_new, all_decoder = one_step("unequal", 1e-3, 1e-2), one_step("new", 1e-2, 1e-2), \
        one_step("decoder", 1e-3, 1e-3)
    first_new = unequal.config.pretrained_vocab_size
    assert 0 < first_new < unequal.config.vocab_size
    rows = lambda m: m.decoder.get_input_embeddings().weight.detach()
    assert torch.allclose(rows(unequal)[first_new:], rows(all_new)[first_new:], rtol=1e-5, atol=1e-7)
    assert torch.allclose(rows(unequal)[:first_new], rows(all_decoder)[:first_new], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(rows(unequal)[first_new:], rows(all_decoder)[first_new:], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(rows(unequal)[:first_new], rows(all_new)[:first_new], rtol=1e-5, atol=1e-7)
    # After save/load the output layer is still the embedding matrix itself, not a copy.
    assert unequal.decoder.get_output_embeddings().weight is unequal.decoder.get_input_embeddings().weight


@pytest.mark.parametrize("freeze_head", [False, True])
def test_after_encoder_epochs_the_encoder_freezes_and_the_head_only_with_freeze_head(tiny_cfg, tmp_path, freeze_head):
    settings = {"train__epochs": 3, "train__encoder_epochs": 1, "images__augment": False,
                "train__freeze_head": freeze_head}
    cfg = tiny_cfg(**settings)
    train(cfg, stop_after_epoch=1, progress=False)
    after_one = _weights(cfg.paths.checkpoints / "last")
    shutil.copytree(cfg.paths.checkpoints / "last", tmp_path / "after_one")
    train(cfg, resume=True, progress=False)
    after_three = _weights(cfg.paths.checkpoints / "last")
    head = [n for n in after_one if n.startswith("guidance.head.")]
    frozen = [n for n in after_one if n.startswith("encoder.")] + (head if freeze_head else [])
    trained = [n for n in after_one if n.startswith(("decoder.", "projection.", "guidance.states"))]
    assert frozen and trained and head
    assert all(torch.equal(after_one[n], after_three[n]) for n in frozen)  # BatchNorm buffers too
    moved = {n for n in trained + head if not torch.equal(after_one[n], after_three[n])}
    assert {"projection.weight", "guidance.states", "decoder.transformer.h.0.mlp.c_fc.weight"} <= moved
    # the head goes on learning from the cached features unless train.freeze_head: its BCE on
    # the training studies falls (weight decay alone would move its weights, not this)
    before, after = (_head_training_loss(cfg, d) for d in (tmp_path / "after_one", cfg.paths.checkpoints / "last"))
    assert (after < before - 0.01) if not freeze_head else (after == before), (before, after)
    if freeze_head:
        return
    # the cached features are the frozen encoder's: an uninterrupted run ends the same
    whole = tiny_cfg(**settings, paths__output_dir=str(tmp_path / "whole"))
    train(whole, progress=False)
    assert _weights_digest(whole.paths.checkpoints / "last") == _weights_digest(cfg.paths.checkpoints / "last")


def _head_training_loss(cfg, checkpoint) -> float:
    """The observation head's BCE over the training studies, for the model saved in ``checkpoint``."""
    from functools import partial

    from medexgen_lib.dataset import collate
    from medexgen_lib.guidance import observation_loss, report_targets
    from medexgen_lib.preprocess import load_split

    model = ReportGenerator.from_pretrained(checkpoint).eval()
    data = load_split(cfg, "train")
    batch = partial(collate, pad_token_id=0)([data[i] for i in range(len(data))])
    targets = torch.tensor([report_targets(e.text, model.config.guidance_labels) for e in data.examples])
    with torch.no_grad():
        logits = model.encoder_states(batch["images"], batch["view_mask"])[2]
    return float(observation_loss(logits, targets))


def test_frozen_features_are_what_the_encoder_computes(tiny_cfg):
    from functools import partial

    from medexgen_lib.dataset import collate
    from medexgen_lib.preprocess import load_split
    from medexgen_lib.tokenizer import load_tokenizer
    from medexgen_lib.features import FrozenFeatures

    cfg = tiny_cfg()
    model = ReportGenerator.build(cfg.model, load_tokenizer(cfg.paths.processed / "tokenizer"), 32, 48).eval()
    data = load_split(cfg, "train")
    collate_fn = partial(collate, pad_token_id=0)
    cache = FrozenFeatures(model, data, collate_fn, "cpu", batch_size=3)
    batch = collate_fn([data[i] for i in (4, 0, 2)])
    with torch.no_grad():
        expected = model.image_features(batch["images"], batch["view_mask"])
        assert torch.allclose(cache(batch["uids"]), expected, atol=1e-6)
        images, ids = batch["images"], batch["input_ids"]
        live = model(images, ids, view_mask=batch["view_mask"]).logits
        cached = model(images, ids, view_mask=batch["view_mask"], features=cache(batch["uids"])).logits
    assert torch.allclose(live, cached, atol=1e-5)


def test_the_selection_metric_may_sum_validation_metrics():
    from medexgen_lib.validation import selection_value

    metrics = {"clinical macro_F1": 0.75, "BLEU-4": 0.25, "distinct_predictions": 0.5}
    assert selection_value(metrics, "clinical macro_F1 + BLEU-4") == 1.0
    assert selection_value(metrics, "BLEU-4") == 0.25
    with pytest.raises(KeyError, match="BLEU-5"):
        selection_value(metrics, "clinical macro_F1 + BLEU-5")


def test_the_exported_model_carries_thresholds_chosen_on_val(tiny_cfg, monkeypatch):
    from medexgen_lib import guidance, report_edits
    from medexgen_lib.dataset import collate
    from medexgen_lib.preprocess import load_split

    cfg = tiny_cfg()
    assert cfg.guidance.decoder_input == "true"  # the demo's hard guidance
    banked = []  # the texts the sentence bank and the normal sentences are made of
    for name in ("sentence_bank", "normal_sentences"):
        monkeypatch.setattr(report_edits, name, lambda texts, *rest, f=getattr(report_edits, name): (
            banked.append(list(texts)), f(texts, *rest))[1])
    train(cfg, progress=False)
    config = json.loads((cfg.paths.models / "final" / "config.json").read_text())
    labels, thresholds = config["guidance_labels"], config["guidance_thresholds"]
    assert labels and len(thresholds) == len(labels)
    assert all(t in guidance.THRESHOLD_GRID for t in thresholds)
    assert all(t == 0.5 for label, t in zip(labels, thresholds) if ", " in label)  # sides: given the finding
    # chosen on val: the exported head's val probabilities give the same choice
    model = ReportGenerator.from_pretrained(cfg.paths.models / "final").eval()
    val = load_split(cfg, "val")
    batch = collate([val[i] for i in range(len(val))], pad_token_id=model.config.pad_token_id)
    with torch.no_grad():
        features = model.image_features(batch["images"], batch["view_mask"])
        probabilities = model.guidance.logits(features, len(val), batch["view_mask"]).sigmoid()
    truth = torch.tensor([guidance.report_targets(e.text, labels) for e in val.examples])
    assert guidance.choose_thresholds(probabilities, truth, labels) == thresholds
    assert thresholds != [0.5] * len(labels)  # this run's val moves some of them
    # the demo's sentence bank and normal sentences come from the training reports alone
    train_texts = [e.text for e in load_split(cfg, "train").examples]
    assert banked == [train_texts, train_texts]
    assert config["guidance_sentences"] and config["guidance_sentences"] == report_edits.sentence_bank(train_texts, labels)
    assert config["guidance_normal_sentences"] == report_edits.normal_sentences(train_texts)
    # the val score recorded for the exported epoch is the exported model's, thresholds included:
    # they were chosen at that validation and saved with the checkpoint
    exported_config = json.loads((cfg.paths.checkpoints / cfg.train.export / "config.json").read_text())
    assert exported_config["guidance_thresholds"] == thresholds
    from medexgen_lib.reporting import generate_reports
    from medexgen_lib.metrics import score
    from medexgen_lib.history import load_history
    from medexgen_lib.validation import selection_value

    exported = load_history(cfg.paths.logs / "history.jsonl")[-1]  # train.export "last"
    rows = generate_reports(ReportGenerator.from_pretrained(cfg.paths.models / "final"),
                            load_split(cfg, "val"), cfg.eval, progress=False)
    metrics = score([r["reference"] for r in rows], [r["prediction"] for r in rows], meteor=False,
                    decoder_texts=[r["decoder_text"] for r in rows])  # validation's rule for degenerate output
    assert selection_value(metrics, cfg.train.selection_metric) == exported["selection_value"]  # same reports


def test_a_planning_run_exports_its_normal_report_and_switches_off_what_val_cannot_tell(tiny_cfg):
    from medexgen_lib import guidance, report_edits
    from medexgen_lib.dataset import collate
    from medexgen_lib.planning import normal_report
    from medexgen_lib.preprocess import load_split

    cfg = tiny_cfg(guidance__state_findings=False, guidance__plan_reports=True, guidance__min_auroc=0.9)
    train(cfg, progress=False)
    config = json.loads((cfg.paths.models / "final" / "config.json").read_text())
    train_texts = [e.text for e in load_split(cfg, "train").examples]
    val = load_split(cfg, "val")
    assert config["guidance_normal_report"] == normal_report(train_texts, [e.text for e in val.examples])
    assert config["guidance_sentences"] == report_edits.sentence_bank(train_texts, config["guidance_labels"])
    model = ReportGenerator.from_pretrained(cfg.paths.models / "final").eval()
    batch = collate([val[i] for i in range(len(val))], pad_token_id=model.config.pad_token_id)
    with torch.no_grad():
        features = model.image_features(batch["images"], batch["view_mask"])
        probabilities = model.guidance.logits(features, len(val), batch["view_mask"]).sigmoid()
    labels = config["guidance_labels"]
    truth = torch.tensor([guidance.report_targets(e.text, labels) for e in val.examples])
    assert guidance.choose_thresholds(probabilities, truth, labels, 0.9) == config["guidance_thresholds"]
    assert guidance.LABEL_OFF in config["guidance_thresholds"]  # this tiny head tells some findings apart from none


# --------------------------------------------------------------------------- a fresh run replaces a previous one


def _run_files(cfg) -> dict:
    """Bytes of every file of a training run's output folder (history, config, checkpoints, model)."""
    out = Path(cfg.paths.output_dir)
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.relative_to(out).parts[0] in ("logs", "checkpoints", "models")}


@pytest.mark.reliability
@pytest.mark.parametrize("metric", ["BLEU4", "clinical macro_F1 + bleu-4", ""])
def test_a_selection_metric_that_validation_does_not_compute_is_refused_by_load_config(metric):
    from medexgen_lib.config import ConfigError

    with pytest.raises(ConfigError, match=r"train\.selection_metric .*not a validation metric.*BLEU-4"):
        load_config("demo", {"train.selection_metric": metric})


def test_every_validation_metric_is_known_to_the_config_check():
    from medexgen_lib.metrics import VALIDATION_METRICS, score

    computed = score(["Heart size is normal."], ["Small left pleural effusion."], meteor=False)
    numeric = {k for k, v in computed.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert set(VALIDATION_METRICS) == numeric | {"distinct_predictions"}  # what _validate returns


@pytest.mark.reliability
def test_a_train_refused_for_its_settings_leaves_the_previous_run_as_it_was(tiny_cfg, tiny_settings, capsys):
    from medexgen_lib.__main__ import main

    previous = train(tiny_cfg(train__epochs=1), progress=False)
    before = _run_files(tiny_cfg())
    overrides = [arg for key, value in {**tiny_settings("out"), "train.selection_metric": "BLEU4"}.items()
                 for arg in ("-p", key, str(value))]
    assert main(["train", *overrides]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "train.selection_metric" in error[0] and "BLEU4" in error[0], error
    assert _run_files(tiny_cfg()) == before and previous.history.stat().st_size > 0


@pytest.mark.reliability
@pytest.mark.parametrize("where", ["training", "validation"])
def test_ctrl_c_in_a_fresh_runs_first_epoch_leaves_the_previous_run_as_it_was(where, tiny_cfg, monkeypatch):
    import medexgen_lib.train as train_module

    train(tiny_cfg(train__epochs=1), progress=False)
    before = _run_files(tiny_cfg())

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(train_module, "_train_epoch" if where == "training" else "validate", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(train__lr_new=2e-3), progress=False)
    after = _run_files(tiny_cfg())  # (the new run's TensorBoard folder may be there too)
    assert {name: after.get(name) for name in before} == before


@pytest.mark.reliability
def test_after_its_first_epoch_a_fresh_run_owns_the_folder_with_no_file_of_the_previous_run(tiny_cfg):
    train(tiny_cfg(train__epochs=1, train__export="best"), progress=False)
    assert (Path(tiny_cfg().paths.models) / "final").exists()
    cfg = tiny_cfg(train__epochs=3, train__lr_new=2e-3)
    train(cfg, stop_after_epoch=1, progress=False)  # stopped after epoch 1 as an interruption would
    history = [json.loads(l) for l in (cfg.paths.logs / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1]
    saved = json.loads((cfg.paths.logs / "config_04_training.json").read_text())
    assert saved["train"]["lr_new"] == 2e-3 and saved["train"]["epochs"] == 3
    assert not (cfg.paths.models / "final").exists()  # the previous run's model is not this run's
    kept = {p.name for p in cfg.paths.checkpoints.iterdir()}
    for name in kept:  # every checkpoint left is this run's epoch 1
        assert json.loads((cfg.paths.checkpoints / name / "trainer.json").read_text())["config"]["train"]["lr_new"] == 2e-3
    assert "last" in kept
    train(cfg, resume=True, progress=False)  # and the run goes on from there
    assert [json.loads(l)["epoch"] for l in (cfg.paths.logs / "history.jsonl").read_text().splitlines()] == [1, 2, 3]


@pytest.mark.reliability
@pytest.mark.parametrize("interrupted_at", ["discard_dir", "write_text_atomic"])
def test_a_fresh_run_taking_over_never_leaves_one_runs_history_beside_anothers_checkpoints(
        interrupted_at, tmp_config, monkeypatch):
    """Ctrl-C inside ``history.take_over_folder``: the previous run's checkpoints or model are either gone, or
    still beside that run's own history and config."""
    import medexgen_lib.history as history_module

    cfg = tmp_config()
    paths = cfg.paths
    for folder in (paths.models / "final", paths.checkpoints / "best", paths.checkpoints / "last"):
        folder.mkdir(parents=True)
        (folder / "weights").write_text("the previous run's")
    paths.logs.mkdir(parents=True, exist_ok=True)
    (paths.logs / "history.jsonl").write_text('{"epoch": 1, "run": "previous"}\n')
    (paths.logs / "config_04_training.json").write_text('{"run": "previous"}')
    before = {name: (paths.logs / name).read_text() for name in ("history.jsonl", "config_04_training.json")}

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(history_module, interrupted_at, interrupt)
    with pytest.raises(KeyboardInterrupt):
        history_module.take_over_folder(cfg, {"epoch": 1, "run": "new"})
    if any((folder / "weights").exists() for folder in (paths.models / "final", paths.checkpoints / "best",
                                                         paths.checkpoints / "last")):
        assert {name: (paths.logs / name).read_text() for name in before} == before


def test_the_epoch_that_freezes_the_encoder_counts_its_feature_cache_in_its_seconds(tiny_cfg, monkeypatch):
    """The first frozen epoch's history line times the frozen encoder's feature caches (train and
    val) as part of the epoch (``seconds``, ``samples_per_s``), as before ``_train`` was split into
    steps; it had left them out."""
    import types

    import medexgen_lib.train as train_module
    import medexgen_lib.validation as validation_module
    from medexgen_lib.features import FrozenFeatures
    from medexgen_lib.history import load_history

    clock = [0.0]  # seconds the fake feature caches took, added to the real clock
    monkeypatch.setattr(train_module, "time", types.SimpleNamespace(
        perf_counter=lambda: __import__("time").perf_counter() + clock[0]))

    class SlowFeatures(FrozenFeatures):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            clock[0] += 500.0

    for module in (train_module, validation_module):
        monkeypatch.setattr(module, "FrozenFeatures", SlowFeatures)
    cfg = tiny_cfg(train__epochs=2, train__encoder_epochs=1, images__augment=False)
    train(cfg, progress=False)
    first, second = load_history(cfg.paths.logs / "history.jsonl")
    assert second["seconds"] >= 2 * 500  # the caches of train and val, made as the encoder froze
    # they are part of the epoch's training time: samples per second fall with them
    assert second["samples_per_s"] < first["samples_per_s"]
