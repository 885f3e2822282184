"""Atomically written files and folders get the modes the umask gives a plain open/mkdir
(mkstemp and mkdtemp create 0600 / 0700, safetensors writes its weights 0600)."""

import os
import stat

import pytest
import torch

from medexgen_lib.files import honour_umask, write_json, write_text_atomic
from medexgen_lib.model import ReportGenerator, ReportGeneratorConfig
from medexgen_lib.tokenizer import build_tokenizer

TEXTS = ["Heart size normal. No pleural effusion.", "Small left pleural effusion."] * 20


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def _modes(root):
    """{path relative to root: permission bits} of root and everything under it."""
    found = {".": stat.S_IMODE(os.stat(root).st_mode)}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, root)] = stat.S_IMODE(os.stat(path).st_mode)
    return found


def _expected(root, umask):
    """A folder made inside a setgid folder is setgid too (and must stay so); pytest's base
    temporary folder is setgid where TMPDIR is a group's setgid folder."""
    setgid = os.stat(os.path.dirname(root)).st_mode & stat.S_ISGID
    return {rel: ((0o777 & ~umask) | setgid) if os.path.isdir(os.path.join(root, rel)) else 0o666 & ~umask
            for rel in _modes(root)}


@pytest.mark.reliability
@pytest.mark.parametrize("team_folder", (False, True), ids=("plain", "setgid"))
def test_atomic_files_model_tokenizer_and_checkpoint_folders_honour_the_umask(umask, tmp_path, team_folder):
    from accelerate import Accelerator

    from medexgen_lib.checkpoints import save_checkpoint

    if team_folder:  # a group's shared folder (2775): mkdtemp's staging folders inherit setgid
        tmp_path = tmp_path / "team"
        tmp_path.mkdir()
        os.chmod(tmp_path, 0o2775)
        if not os.stat(tmp_path).st_mode & stat.S_ISGID:
            pytest.skip("this file system does not keep a folder's setgid bit")
    else:
        os.chmod(tmp_path, stat.S_IMODE(os.stat(tmp_path).st_mode) & ~stat.S_ISGID)

    write_json(tmp_path / "logs" / "metrics.json", {"a": 1})
    write_text_atomic(tmp_path / "logs" / "ablation.md", "table")
    for name in ("metrics.json", "ablation.md"):
        assert stat.S_IMODE(os.stat(tmp_path / "logs" / name).st_mode) == 0o666 & ~umask, name

    tokenizer = build_tokenizer("trained", TEXTS, tmp_path / "processed" / "tokenizer", vocab_size=300)
    torch.manual_seed(0)
    model = ReportGenerator(ReportGeneratorConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, encoder="resnet18", image_size=32, n_layer=1, n_head=2,
        n_embd=16))
    model.tokenizer = tokenizer
    model.save_pretrained(tmp_path / "models" / "final", extra_files={"README.md": "card"})
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path / "checkpoints" / "last", Accelerator(cpu=True), model, optimizer, None,
                    {"epoch": 1})
    for folder in ("processed/tokenizer", "models/final", "checkpoints/last"):
        root = tmp_path / folder
        assert "model.safetensors" in os.listdir(root) or folder == "processed/tokenizer"
        assert _modes(root) == _expected(root, umask), folder


@pytest.mark.reliability
def test_a_folder_made_in_a_setgid_group_folder_keeps_its_setgid_bit(umask, tmp_path):
    """A team's shared folder (mode 2775) makes every folder created in it setgid, so files
    written there later belong to the team's group; setting the umask's modes must keep that bit."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o2775)
    if not os.stat(shared).st_mode & stat.S_ISGID:
        pytest.skip("this file system does not keep a folder's setgid bit")
    model = shared / "model"
    write_json(model / "config.json", {"a": 1})  # a plain mkdir (parents of the atomic file)
    honour_umask(model)
    assert os.stat(model).st_mode & stat.S_ISGID
    assert stat.S_IMODE(os.stat(model).st_mode) & 0o777 == 0o777 & ~umask
