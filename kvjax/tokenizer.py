"""A byte-level tokenizer that needs no download: 256 byte tokens plus <pad>, <s>, </s>.

Saved with `save_pretrained`, it is an ordinary transformers tokenizer (tokenizer.json), so
checkpoints that kvjax writes load in transformers and in the kvjax CLI alike.
"""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 256, 257, 258
VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    byte_chars = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    byte_to_char = {b: c for b, c in zip(range(256), sorted(byte_chars, key=_byte_of))}
    vocab = {byte_to_char[b]: b for b in range(256)}
    vocab |= {tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def _byte_of(char: str) -> int:
    """The byte a ByteLevel stand-in character encodes (GPT-2's bytes_to_unicode mapping)."""
    code = ord(char)
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    if code in printable:
        return code
    missing = [b for b in range(256) if b not in printable]
    return missing[code - 256]
