"""The byte vocabulary: ByteTokenizer in code, and the standard tokenizer files the reference folder ships.

AutoTokenizer.from_pretrained(WEIGHTS_DIR) must give exactly ByteTokenizer's ids (byte b is id b,
bos 256, eos 257, pad 258), add nothing around plain text, and decode back byte for byte.
"""
import json
import os

import pytest

from kvcompile.frontend.tokenizer import TOKENIZER_FILE, ByteTokenizer, byte_level_chars
from kvcompile.reference import WEIGHTS_DIR
from kvcompile.reference import make_tokenizer

TEXTS = [
    "def f(x):\n    return x ** 2  # é → ok",
    "",
    "plain ASCII, punctuation: a . , ; ! ? -- (x) [y] {z}",
    "multi-byte: héllo wörld ß ∑ 中文 日本語 한국어",
    "emoji: 😀👍🏽 👨‍👩‍👧 🇫🇷",
    "\n\n\ttabs\tand\r\nnewlines\n  leading and trailing spaces  ",
    "control bytes \x00\x01\x1b[0m\x7f and NBSP\u00a0 and ZWJ\u200d",
    "specials typed as text: <|bos|> <|eos|> <|pad|> <s> </s> <pad>",
    "".join(chr(c) for c in range(1, 0x800)),  # every 1- and 2-byte character
]


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(WEIGHTS_DIR, local_files_only=True)


# --- ByteTokenizer (the in-code tokenizer of training and the eval generators) --------------
def test_encode_is_utf8_bytes_and_decode_inverts_it():
    tok = ByteTokenizer()
    text = "def f(x):\n    return x ** 2  # é → ok"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.encode("ab", add_bos=True) == [tok.bos_id, 97, 98]


def test_specials_have_no_text_and_sit_after_the_bytes():
    tok = ByteTokenizer()
    assert {tok.bos_id, tok.eos_id, tok.pad_id} == {256, 257, 258}
    assert tok.vocab_size == 259
    assert tok.decode([tok.bos_id, 104, 105, tok.eos_id, tok.pad_id]) == "hi"


def test_cut_multibyte_character_decodes_without_raising():
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"


def test_surrogate_escaped_bytes_encode_to_the_raw_bytes():
    raw = b"ok \xff\xfe \xc3 end"
    assert ByteTokenizer().encode(raw.decode("utf-8", "surrogateescape")) == list(raw)


def test_byte_level_chars_is_gpt2_table():
    chars = byte_level_chars()
    assert len(set(chars)) == 256
    assert chars[ord("A")] == "A" and chars[ord(" ")] == "Ġ" and chars[ord("\n")] == "Ċ" and chars[0] == "Ā"


# --- the standard files -------------------------------------------------------------------
def test_shipped_files_are_what_make_tokenizer_writes():
    assert make_tokenizer.stale_files(WEIGHTS_DIR) == []
    for name, text in make_tokenizer.expected_files().items():
        with open(os.path.join(WEIGHTS_DIR, name), encoding="utf-8", newline="") as f:
            assert f.read() == text


def test_make_tokenizer_is_deterministic_and_check_flags_stale_files(tmp_path, capsys):
    assert make_tokenizer.main(["--out", str(tmp_path)]) == 0
    first = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(first) == {"tokenizer.json", "tokenizer_config.json"}
    assert make_tokenizer.main(["--out", str(tmp_path)]) == 0
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == first
    assert make_tokenizer.main(["--out", str(tmp_path), "--check"]) == 0
    (tmp_path / "tokenizer.json").write_text("{}")
    assert make_tokenizer.main(["--out", str(tmp_path), "--check"]) == 1
    assert "tokenizer.json" in capsys.readouterr().out


def test_shipped_tokenizer_json_is_a_tokenizers_file_not_a_private_format():
    from tokenizers import Tokenizer
    with open(os.path.join(WEIGHTS_DIR, TOKENIZER_FILE), encoding="utf-8") as f:
        spec = json.load(f)
    assert "type" not in spec and spec["model"]["type"] == "BPE" and spec["model"]["merges"] == []
    backend = Tokenizer.from_file(os.path.join(WEIGHTS_DIR, TOKENIZER_FILE))
    assert backend.get_vocab_size(with_added_tokens=True) == 259
    text = "héllo\n\tworld 😀"
    assert backend.encode(text).ids == list(text.encode("utf-8"))
    assert backend.decode(backend.encode(text).ids) == text


def test_shipped_folder_describes_the_byte_tokenizer():
    assert ByteTokenizer.for_model_dir(WEIGHTS_DIR) == ByteTokenizer()


def test_save_and_from_file_round_trip(tmp_path):
    tok = ByteTokenizer()
    paths = tok.save(str(tmp_path))
    assert sorted(os.path.basename(p) for p in paths) == ["tokenizer.json", "tokenizer_config.json"]
    assert ByteTokenizer.from_file(str(tmp_path / TOKENIZER_FILE)) == tok
    assert ByteTokenizer.for_model_dir(str(tmp_path)) == tok


def test_for_model_dir_ignores_missing_foreign_and_old_private_tokenizers(tmp_path):
    assert ByteTokenizer.for_model_dir(str(tmp_path)) is None
    (tmp_path / TOKENIZER_FILE).write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    assert ByteTokenizer.for_model_dir(str(tmp_path)) is None
    with pytest.raises(ValueError):
        ByteTokenizer.from_file(str(tmp_path / TOKENIZER_FILE))
    old = {"type": "kvcompile-byte", "vocab_size": 259, "byte_offset": 0,
           "special": {"bos": 256, "eos": 257, "pad": 258}}
    (tmp_path / TOKENIZER_FILE).write_text(json.dumps(old))
    assert ByteTokenizer.for_model_dir(str(tmp_path)) is None


# --- AutoTokenizer on the bundled folder ---------------------------------------------------
@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_auto_tokenizer_gives_byte_ids_and_round_trips(hf_tokenizer, text):
    ids = hf_tokenizer(text)["input_ids"]
    assert ids == ByteTokenizer().encode(text) == list(text.encode("utf-8"))
    assert hf_tokenizer.encode(text) == ids
    assert hf_tokenizer.decode(ids) == text
    assert hf_tokenizer.decode(ids, skip_special_tokens=True) == text


def test_auto_tokenizer_maps_every_byte_to_its_id(hf_tokenizer):
    chars = byte_level_chars()
    assert hf_tokenizer.convert_ids_to_tokens(list(range(256))) == list(chars)
    assert hf_tokenizer.convert_tokens_to_ids(list(chars)) == list(range(256))


def test_auto_tokenizer_specials(hf_tokenizer):
    tok = ByteTokenizer()
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == (256, 257, 258)
    assert len(hf_tokenizer) == tok.vocab_size == 259
    with open(os.path.join(WEIGHTS_DIR, "config.json")) as f:
        config = json.load(f)
    assert config["vocab_size"] == len(hf_tokenizer)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (256, 257, 258)
    assert set(hf_tokenizer.all_special_ids) == {256, 257, 258}
    # No special token around plain text (ByteTokenizer.encode's default), none from typed text.
    assert hf_tokenizer("hi")["input_ids"] == [104, 105]
    assert hf_tokenizer("<|eos|>")["input_ids"] == list(b"<|eos|>")
    assert hf_tokenizer.decode([256, 104, 105, 257, 258], skip_special_tokens=True) == "hi"


def test_auto_tokenizer_decodes_a_cut_character_without_raising(hf_tokenizer):
    assert hf_tokenizer.decode(list("é".encode("utf-8"))[:1]) == "\ufffd"


def test_auto_tokenizer_pads_with_the_pad_id(hf_tokenizer):
    batch = hf_tokenizer(["a", "abc"], padding=True)["input_ids"]
    assert batch == [[97, 258, 258], [97, 98, 99]] or batch == [[258, 258, 97], [97, 98, 99]]
