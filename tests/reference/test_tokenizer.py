"""ByteTokenizer: bytes in, bytes out; the JSON description round-trips; foreign files are refused."""
import json

import pytest

from kvcompile.reference import WEIGHTS_DIR
from kvcompile.frontend.tokenizer import TOKENIZER_FILE, ByteTokenizer


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


def test_save_and_from_file_round_trip(tmp_path):
    tok = ByteTokenizer()
    path = tok.save(str(tmp_path))
    assert ByteTokenizer.from_file(path) == tok
    assert ByteTokenizer.for_model_dir(str(tmp_path)) == tok


def test_for_model_dir_ignores_missing_and_foreign_tokenizers(tmp_path):
    assert ByteTokenizer.for_model_dir(str(tmp_path)) is None
    (tmp_path / TOKENIZER_FILE).write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    assert ByteTokenizer.for_model_dir(str(tmp_path)) is None
    with pytest.raises(ValueError):
        ByteTokenizer.from_file(str(tmp_path / TOKENIZER_FILE))


def test_shipped_folder_describes_the_byte_tokenizer():
    assert ByteTokenizer.for_model_dir(WEIGHTS_DIR) == ByteTokenizer()
