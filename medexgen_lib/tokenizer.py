"""One tokenizer API, two sources: GPT-2's byte-level BPE, or one trained offline.

Both are ``transformers`` fast tokenizers with the same special tokens and the
same whole-word medical tokens, saved with ``save_pretrained``; ``source.json``
next to them records which one was built and from what.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AddedToken, AutoTokenizer, PreTrainedTokenizerFast

from medexgen_lib.files import honour_umask, read_capped, recover_dir, replace_dir

log = logging.getLogger(__name__)

BOS, EOS, PAD = "<|bos|>", "<|endoftext|>", "<|pad|>"
SOURCE_FILE = "source.json"
# The JSON files transformers reads from a tokenizer folder; each is checked before loading.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
MAX_TOKENIZER_FILE_BYTES = 64 * 2**20  # GPT-2's tokenizer.json is 2 MB; large vocabularies 10-30 MB

# Whole words that should never be split: they carry the findings the labeler scores.
MEDICAL_TOKENS = (
    "cardiomegaly", "cardiomediastinal", "pneumothorax", "pneumothoraces", "atelectasis",
    "consolidation", "effusion", "effusions", "pleural", "edema", "opacity", "opacities",
    "pneumonia", "nodule", "nodules", "granuloma", "granulomas", "emphysema", "hernia",
    "fracture", "infiltrate", "infiltrates", "airspace", "interstitial", "hyperinflation",
    "costophrenic", "hilar", "perihilar", "mediastinal", "silhouette", "vasculature",
    "calcified", "degenerative", "osseous", "thoracic", "scoliosis", "catheter",
    "sternotomy", "XXXX",
)


class TokenizerUnavailable(RuntimeError):
    """GPT-2's tokenizer files were asked for and could not be found."""


def _medical_added_tokens() -> list[AddedToken]:
    """Each term as a single token, alone and with the leading space BPE attaches."""
    tokens = []
    for term in MEDICAL_TOKENS:
        for content in (term, " " + term):
            tokens.append(AddedToken(content, single_word=True, normalized=False))
    return tokens


def _finish(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    tokenizer.add_special_tokens({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD})
    tokenizer.add_tokens(_medical_added_tokens())
    tokenizer.clean_up_tokenization_spaces = False  # decode(encode(x)) must return x
    tokenizer.padding_side = "right"
    return tokenizer


def load_gpt2_tokenizer(source: str = "gpt2", allow_download: bool = True) -> PreTrainedTokenizerFast:
    """GPT-2's tokenizer from a local folder or the Hugging Face cache (hub if allowed)."""
    errors = []
    for local_only in ((True, False) if allow_download else (True,)):
        try:
            tok = AutoTokenizer.from_pretrained(source, use_fast=True, local_files_only=local_only)
        except (OSError, ValueError) as exc:
            errors.append(str(exc).splitlines()[0])
            continue
        if len(tok) < 256:  # a byte-level BPE has at least the 256 byte symbols
            raise TokenizerUnavailable(f"GPT-2 tokenizer at {source!r} has only {len(tok)} tokens; "
                                       "its vocabulary files are missing or empty")
        return _finish(tok)
    raise TokenizerUnavailable(
        f"GPT-2 tokenizer files not found for {source!r} ({'; '.join(errors)}). Put GPT-2's "
        "tokenizer files in a folder and set tokenizer.gpt2_source to it, fill the Hugging Face "
        "cache (huggingface-cli download gpt2), or set tokenizer.kind='trained'")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4000) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``texts`` (the training split only), GPT-2 style."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2,
                                  special_tokens=[EOS, BOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    return _finish(PreTrainedTokenizerFast(tokenizer_object=bpe))


def build_tokenizer(kind: str, train_texts: list[str], out_dir: str | os.PathLike,
                    gpt2_source: str = "gpt2", vocab_size: int = 4000) -> PreTrainedTokenizerFast:
    """Build per ``kind`` (auto/gpt2/trained), save to ``out_dir`` and record the source."""
    source = {"kind": kind}
    tokenizer = None
    if kind in ("gpt2", "auto"):
        try:
            # auto never waits on the network: local folder or cache only.
            tokenizer = load_gpt2_tokenizer(gpt2_source, allow_download=kind == "gpt2")
            source.update(used="gpt2", gpt2_source=gpt2_source)
        except TokenizerUnavailable as exc:
            if kind == "gpt2":
                raise
            log.warning("tokenizer.kind='auto': GPT-2's tokenizer is not available offline (%s); "
                        "training a byte-level BPE on the training reports instead", exc)
    if tokenizer is None:
        tokenizer = train_tokenizer(train_texts, vocab_size)
        source.update(used="trained", vocab_size_requested=vocab_size,
                      training_texts=len(train_texts))
    source.update(vocab_size=len(tokenizer), medical_tokens=len(MEDICAL_TOKENS))
    save_tokenizer(tokenizer, out_dir, source)
    log.info("tokenizer: %s, %d tokens -> %s", source["used"], len(tokenizer), out_dir)
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | os.PathLike, source: dict) -> Path:
    """``save_pretrained`` plus ``source.json`` into a staging folder, swapped in for ``out_dir``
    by renames: a failed save leaves the previous tokenizer folder as it was."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tokenizer.save_pretrained(staging)
        (staging / SOURCE_FILE).write_text(json.dumps(source, indent=2))
        replace_dir(honour_umask(staging), out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """The tokenizer saved by ``build_tokenizer`` (notebook 03), or with a saved model.

    Each JSON file transformers reads here is checked first, its size capped (a link to
    /dev/zero is refused unread): one that is not a JSON object, is nested too deep, or (for
    tokenizer.json) is not a tokenizer the ``tokenizers`` library reads raises ``ValueError``
    naming the file; so does a tokenizer transformers still cannot build from them."""
    path = Path(path)
    recover_dir(path)
    if not (path / "tokenizer.json").exists():
        raise FileNotFoundError(f"no tokenizer in {path}; run notebook 03_preprocessing first")
    present = [name for name in TOKENIZER_FILES if (path / name).exists() or (path / name).is_symlink()]
    for name in present:
        _check_tokenizer_file(path / name)
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    except Exception as exc:  # transformers' KeyError/TypeError/ValueError on a value it cannot use
        raise ValueError(f"tokenizer files in {path} ({', '.join(present)}) hold a value transformers "
                         f"cannot use: {type(exc).__name__}: {exc}") from None
    tokenizer.clean_up_tokenization_spaces = False
    return tokenizer


def _check_tokenizer_file(path: Path) -> None:
    """``ValueError`` naming ``path`` unless it is a JSON object (a tokenizer.json one the
    ``tokenizers`` library reads, with the ``added_tokens`` transformers needs)."""
    try:
        data = read_capped(path, MAX_TOKENIZER_FILE_BYTES)
    except ValueError as exc:  # not a regular file, or too large
        raise ValueError(f"tokenizer file {exc}") from None
    try:
        text = data.decode("utf-8")
        values = json.loads(text)
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, an integer of > 4300 digits, too deep
        raise ValueError(f"tokenizer file {path} is not valid JSON: {exc}") from None
    if not isinstance(values, dict):
        raise ValueError(f"tokenizer file {path} must hold a JSON object, got {type(values).__name__}")
    if path.name == "tokenizer.json":
        try:
            Tokenizer.from_str(text)
        except Exception as exc:  # the tokenizers library raises a bare Exception
            raise ValueError(f"tokenizer file {path} is not a tokenizer the tokenizers library "
                             f"reads: {exc}") from None
        if not isinstance(values.get("added_tokens"), list):
            raise ValueError(f"tokenizer file {path} has no 'added_tokens' list; it was not saved "
                             "by transformers")


def encode_for_training(tokenizer: PreTrainedTokenizerFast, text: str, max_length: int) -> list[int]:
    """``bos`` + text tokens + ``eos``, truncated to ``max_length`` (eos kept)."""
    ids = tokenizer.encode(text, add_special_tokens=False)[: max_length - 2]
    return [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
