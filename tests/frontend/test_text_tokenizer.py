"""load_text_tokenizer: every checkpoint's tokenizer through AutoTokenizer; bytes only without tokenizer files.

Also: prompts holding invalid UTF-8 (a str with surrogateescape'd bytes, as argv gives) encode to
those bytes on byte-level tokenizers and are a one-line ValueError on others.
"""
import json

import pytest

from kvcompile.errors import LoadError
from kvcompile.frontend.text_tokenizer import (TOKENIZER_FILES, PromptEncodingError, TextTokenizer,
                                               copy_tokenizer_files, load_text_tokenizer)
from kvcompile.frontend.tokenizer import ByteTokenizer
from kvcompile.reference import WEIGHTS_DIR

INVALID = b"def f(x):\n    return '\xff\xfe' + \xc3 # caf\xc3\xa9 \xe2\x82"  # stray, cut and valid multi-byte


def escaped(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


@pytest.fixture(scope="module")
def reference():
    return load_text_tokenizer(WEIGHTS_DIR)


def _save_hf(tokenizer_object, folder, **specials):
    from transformers import PreTrainedTokenizerFast
    PreTrainedTokenizerFast(tokenizer_object=tokenizer_object, **specials).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def word_level_folder(tmp_path_factory):
    """A tokenizer that is not byte-level: whole words, unknown ones map to [UNK]."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "def": 1, "f": 2, "(": 3, "x": 4, ")": 5, ":": 6},
                                         unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return _save_hf(backend, tmp_path_factory.mktemp("wordlevel"), unk_token="[UNK]")


@pytest.fixture(scope="module")
def gpt2_style_folder(tmp_path_factory):
    """A byte-level BPE with merges that puts a bos before every text (Llama-3 style)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(["def f(x):\n    return x + 1\n" * 20, "hello world " * 20], trainer=trainer)
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return _save_hf(backend, tmp_path_factory.mktemp("gpt2style"), bos_token="<s>")


# --- which tokenizer ------------------------------------------------------------------------
def test_reference_folder_loads_through_auto_tokenizer(reference):
    from transformers import PreTrainedTokenizerBase
    assert reference.kind == "hf"
    assert isinstance(reference.tokenizer, PreTrainedTokenizerBase)
    text = "def f(x):\n\treturn x  # é 😀"
    assert reference.encode(text) == ByteTokenizer().encode(text)
    assert reference.decode(reference.encode(text)) == text
    assert reference.decode([256, 104, 105, 257]) == "hi"
    assert reference.encode("") == []


def test_folders_without_tokenizer_files_fall_back_to_bytes(tmp_path):
    for folder in (None, tmp_path):
        tok = load_text_tokenizer(folder)
        assert tok.kind == "byte"
        assert tok.encode("hé") == [104, 195, 169] and tok.decode([104, 195, 169]) == "hé"


def test_exported_tokenizer_folder_loads_without_config_json(tmp_path, reference):
    destination = tmp_path / "tokenizer"
    assert copy_tokenizer_files(WEIGHTS_DIR, destination)
    assert sorted(p.name for p in destination.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert set(p.name for p in destination.iterdir()) <= set(TOKENIZER_FILES)
    tok = load_text_tokenizer(destination)
    assert tok.kind == "hf"
    text = "class A:\n    pass  # ünïcode"
    assert tok.encode(text) == reference.encode(text) == list(text.encode("utf-8"))


def test_old_private_tokenizer_json_is_a_load_error_not_a_silent_fallback(tmp_path):
    old = {"type": "kvcompile-byte", "vocab_size": 259, "byte_offset": 0,
           "special": {"bos": 256, "eos": 257, "pad": 258}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(old))
    with pytest.raises(LoadError, match="old private byte format") as info:
        load_text_tokenizer(tmp_path)
    assert "\n" not in str(info.value)


def test_broken_tokenizer_files_are_a_load_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LoadError, match="cannot load the tokenizer"):
        load_text_tokenizer(tmp_path)


# --- invalid UTF-8 prompts -------------------------------------------------------------------
def test_invalid_utf8_prompt_encodes_to_its_bytes_on_the_reference_tokenizer(reference):
    assert reference.encode(escaped(INVALID)) == list(INVALID)
    assert reference.encode(escaped(b"\x80")) == [0x80]
    assert reference.encode(escaped(b"\xff" * 3 + b"ok")) == [255, 255, 255, 111, 107]


def test_invalid_utf8_prompt_encodes_to_its_bytes_on_the_byte_fallback():
    tok = TextTokenizer(ByteTokenizer(), "byte")
    assert tok.encode(escaped(INVALID)) == list(INVALID)


def test_invalid_utf8_on_a_byte_level_bpe_keeps_its_specials_and_byte_tokens(gpt2_style_folder):
    tok = load_text_tokenizer(gpt2_style_folder)
    assert tok.kind == "hf" and tok.byte_ids is not None
    hf = tok.tokenizer
    bos = hf.convert_tokens_to_ids("<s>")
    assert tok.encode("return x") == [bos, *hf("return x", add_special_tokens=False)["input_ids"]]
    ids = tok.encode(escaped(b"return \xff x"))
    plain = lambda s: hf(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert ids == [bos, *plain("return "), tok.byte_ids[0xFF], *plain(" x")]
    assert hf.decode(ids[1:]).encode("utf-8", "replace") == "return \ufffd x".encode("utf-8")


def test_invalid_utf8_on_a_word_level_tokenizer_is_a_one_line_value_error(word_level_folder):
    tok = load_text_tokenizer(word_level_folder)
    assert tok.kind == "hf" and tok.byte_ids is None
    assert tok.encode("def f(x") == [1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"^the prompt is not valid UTF-8 at byte 4\b") as info:
        tok.encode(escaped(b"def \xff(x):"))
    assert isinstance(info.value, PromptEncodingError) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="at byte 6"):
        tok.encode(escaped("é é ".encode("utf-8") + b"\xe2\x82"))  # a cut character at the end


def test_a_lone_surrogate_that_is_no_escaped_byte_is_a_value_error(reference):
    # "\ud800" cannot come from surrogateescape (which only makes U+DC80..U+DCFF): no bytes to give.
    with pytest.raises(ValueError, match=r"^the prompt is not valid UTF-8 at byte 2 "):
        reference.encode("ab\ud800cd")
    with pytest.raises(ValueError, match="at byte 0"):
        TextTokenizer(ByteTokenizer(), "byte").encode("\udfff")
    # An escaped byte before it does not hide it: the error names the lone surrogate's place.
    with pytest.raises(ValueError, match=r"at byte 3 \(it holds the lone surrogate U\+D800\)"):
        reference.encode(escaped(b"a\xffb") + "\ud800")
