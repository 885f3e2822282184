"""Cleaning and the tokenizer (trained offline, or GPT-2's from a local folder)."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
from transformers import GPT2TokenizerFast

from medexgen_lib.reports import read_reports
from medexgen_lib.text import clean_report, target_texts
from medexgen_lib.tokenizer import (MEDICAL_TOKENS, TokenizerUnavailable, build_tokenizer,
                                    encode_for_training, load_tokenizer)


@pytest.mark.parametrize("raw, cleaned", [
    ("1. Cardiomegaly.  2. No   pleural effusion.", "Cardiomegaly. No pleural effusion."),
    ("Heart size normal . Lungs clear..", "Heart size normal. Lungs clear."),
    ("There is a 1.5 cm nodule in T12.", "There is a 1.5 cm nodule in T12."),
    ("xxxx are intact. XXXX XXXX.", "XXXX are intact. XXXX XXXX."),
    ("Impression: 1) Low volumes; 2) no effusion", "Impression: Low volumes; no effusion"),
    ("", ""),
])
def test_clean_report(raw, cleaned):
    assert clean_report(raw) == cleaned


def test_lowercase_keeps_anonymisation_token():
    assert clean_report("No Effusion. XXXX normal.", lowercase=True) == "no effusion. XXXX normal."


def test_target_modes(iuxray_sample):
    table = read_reports(iuxray_sample / "reports").head(20)
    both = target_texts(table)
    findings = target_texts(table, "findings")
    impression = target_texts(table, "impression")
    row = table.index[0]
    assert both[row] == f"{findings[row]} {impression[row]}".strip()
    with pytest.raises(ValueError):
        target_texts(table, "everything")


@pytest.fixture(scope="module")
def sample_texts(iuxray_sample):
    return target_texts(read_reports(iuxray_sample / "reports")).tolist()


def _check_tokenizer(tokenizer, texts):
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    for term in MEDICAL_TOKENS:
        assert len(tokenizer.encode(term, add_special_tokens=False)) == 1, term
        assert len(tokenizer.encode(" " + term, add_special_tokens=False)) == 1, term
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3


def test_trained_tokenizer_round_trips_and_keeps_medical_words(sample_texts, tmp_path):
    tok = build_tokenizer("auto", sample_texts[:300], tmp_path / "tok",
                          gpt2_source=str(tmp_path / "no-gpt2-here"), vocab_size=1500)
    _check_tokenizer(tok, sample_texts + ["No effusion, pneumothorax or consolidation.  Two  spaces."])
    source = (tmp_path / "tok" / "source.json").read_text()
    assert '"used": "trained"' in source and '"training_texts": 300' in source
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.encode(sample_texts[0]) == tok.encode(sample_texts[0])


def test_gpt2_tokenizer_from_a_local_folder(sample_texts, tmp_path):
    # A small GPT-2-format tokenizer (vocab.json + merges.txt) standing in for GPT-2's files.
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(sample_texts, trainers.BpeTrainer(
        vocab_size=800, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    bpe.model.save(str(tmp_path))
    GPT2TokenizerFast(vocab=str(tmp_path / "vocab.json"), merges=str(tmp_path / "merges.txt")
                      ).save_pretrained(tmp_path / "gpt2-local")
    tok = build_tokenizer("gpt2", [], tmp_path / "tok", gpt2_source=str(tmp_path / "gpt2-local"))
    assert len(tok) > 800 + len(MEDICAL_TOKENS)  # GPT-2's vocabulary plus the added tokens
    _check_tokenizer(tok, sample_texts[:100])
    assert '"used": "gpt2"' in (tmp_path / "tok" / "source.json").read_text()


@pytest.mark.reliability
def test_gpt2_asked_for_and_missing_says_how_to_provide_it(tmp_path):
    with pytest.raises(TokenizerUnavailable, match="tokenizer.gpt2_source"):
        build_tokenizer("gpt2", ["x"], tmp_path / "tok", gpt2_source=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="03_preprocessing"):
        load_tokenizer(tmp_path / "nothing")


def test_encode_for_training_truncates_but_keeps_eos(sample_texts, tmp_path):
    tok = build_tokenizer("trained", sample_texts, tmp_path / "tok", vocab_size=1000)
    ids = encode_for_training(tok, sample_texts[0] * 5, max_length=16)
    assert len(ids) == 16 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id


def test_token_counts_are_encoded_in_bounded_batches():
    """``count_tokens`` encoded all texts in one call: a fast tokenizer's encodings of every text
    (~7 kB each with tokens and offsets) were in memory at once, so stage 03's peak memory grew
    with the data set (+140 MB at 20,000 studies)."""
    from medexgen_lib.preprocess import count_tokens
    from medexgen_lib.tokenizer import train_tokenizer

    texts = [f"Study {k}: " + "no pleural effusion. " * (k % 7) + "Heart size normal." for k in range(2_500)]
    tokenizer = train_tokenizer(texts[:200], 300)
    batches = []

    def recording(batch, **kwargs):
        batches.append(len(batch))
        return tokenizer(batch, **kwargs)

    lengths = count_tokens(recording, texts)
    assert batches == [1_000, 1_000, 500]
    assert lengths.tolist() == [len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 2 for t in texts]
