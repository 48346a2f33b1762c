"""Tokenizers built offline, for tiny test models and the testbed model.

Real checkpoints ship their tokenizers; tiny models built in code need ones
that behave the same way (BOS/EOS, padding to a fixed length, multi-token
words) without a download.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (GPT-2/CLIP)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _apply_merges(pieces: list[str], merges: list[tuple[str, str]]) -> list[str]:
    """Byte-pair encoding of one word: repeatedly join the adjacent pair with the earliest merge."""
    rank = {pair: i for i, pair in enumerate(merges)}
    while len(pieces) > 1:
        pairs = [
            (rank.get((a, b), len(rank)), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:], strict=False))
        ]
        best, i = min(pairs)
        if best == len(rank):
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2 :]
    return pieces


def build_clip_tokenizer(words: Iterable[str], model_max_length: int = 77):
    """A CLIP BPE tokenizer whose vocabulary holds single characters plus `words`.

    Each listed word becomes one token (merges join its characters left to
    right); any other word falls back to several character tokens, which is
    how the tests get multi-token class names.
    """
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for ch in _byte_alphabet():
        vocab.setdefault(ch, len(vocab))
    for ch in _byte_alphabet():
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(w.lower() for w in words):
        if not word or not word.isascii() or " " in word or len(word) < 2:
            continue
        # BPE with the merges so far may already join some of the word's characters (and
        # differently from a left-to-right join): continue from those pieces, so every listed
        # word ends as exactly one token whatever came before it.
        pieces = _apply_merges(list(word[:-1]) + [word[-1] + "</w>"], merges)
        left = pieces[0]
        for right in pieces[1:]:
            if (left, right) not in merges:
                merges.append((left, right))
            left = left + right
            vocab.setdefault(left, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    # through files, as a checkpoint ships it: the one constructor transformers 4.x (slow tokenizer,
    # vocab_file/merges_file) and 5.x (vocab/merges) share
    with tempfile.TemporaryDirectory() as folder:
        _write_bpe_files(Path(folder), vocab, merges)
        return CLIPTokenizer.from_pretrained(folder, model_max_length=model_max_length)


def _write_bpe_files(folder: Path, vocab: dict[str, int], merges: Iterable[Iterable[str]]) -> None:
    """vocab.json and merges.txt, the files of a CLIP/GPT-2 BPE tokenizer."""
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(" ".join(pair) for pair in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def add_bpe_files(folder: Path) -> None:
    """Write vocab.json and merges.txt beside a saved tokenizer.json (transformers 5 saves only the
    latter), so that transformers 4.x, whose CLIPTokenizer reads the two files, loads the folder too."""
    spec = Path(folder) / "tokenizer.json"
    if spec.is_file() and not (Path(folder) / "merges.txt").is_file():
        model = json.loads(spec.read_text(encoding="utf-8"))["model"]
        merges = [pair.split(" ") if isinstance(pair, str) else pair for pair in model["merges"]]
        _write_bpe_files(Path(folder), model["vocab"], merges)


def build_word_tokenizer(words: Iterable[str], model_max_length: int = 32):
    """A T5-like word-level tokenizer (pad=0, eos=1, unk=2, no BOS) for tiny T5 encoders."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in dict.fromkeys(w.lower() for w in words):
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    from tokenizers import normalizers

    core.normalizer = normalizers.Lowercase()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )


def build_bert_tokenizer(words: Iterable[str], model_max_length: int = 64):
    """A BERT-like WordPiece tokenizer ([CLS] text [SEP], lower case) whose vocabulary holds the
    specials BLIP's text decoder uses ([PAD]=0, [UNK], [CLS], [SEP], [MASK], [DEC]) plus `words`;
    for tiny BLIP captioners built in code."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for word in dict.fromkeys(w.lower() for w in words):
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    core.decoder = decoders.WordPiece()
    return BertTokenizerFast(
        tokenizer_object=core,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        bos_token="[DEC]",
        model_max_length=model_max_length,
    )


def build_lm_tokenizer(
    words: Iterable[str], prefix: Iterable[str] = ("<bos>",), model_max_length: int = 4096
):
    """A language-model-like word tokenizer (Gemma, GLM, Qwen stand-in): a word after a space is a
    different token ("▁cat") from the same word at the start of the text ("cat"), as in byte-level
    and SentencePiece BPE without a dummy prefix; punctuation is split off; `prefix` tokens (Gemma's
    <bos>, GLM's [gMASK] <sop>) open every text encoded with special tokens. pad=0, eos=1, unk=2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    prefix = list(prefix)
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for token in [*prefix, ",", ".", ":", "-", "'"]:
        vocab.setdefault(token, len(vocab))
    for word in dict.fromkeys(w.lower() for w in words):
        vocab.setdefault(word, len(vocab))
        vocab.setdefault("▁" + word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never"), pre_tokenizers.Punctuation()]
    )
    core.post_processor = processors.TemplateProcessing(
        single=" ".join([*prefix, "$A"]), special_tokens=[(t, vocab[t]) for t in prefix]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        bos_token=prefix[0] if prefix else None,
        additional_special_tokens=prefix[1:],
        model_max_length=model_max_length,
    )


# The chat template of Qwen2.5/Qwen3 tokenizers reduced to what the diffusers pipelines use: one turn
# per message, the generation prompt, and Qwen3's `enable_thinking=False` empty thinking block.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")


def build_qwen_tokenizer(words: Iterable[str], model_max_length: int = 131072):
    """A byte-level BPE tokenizer like Qwen2.5's and Qwen3's (no BOS, "Ġ" marks a leading space,
    `<|im_start|>`/`<|im_end|>` chat specials, pad `<|endoftext|>`, their chat template), whose
    vocabulary holds every word of `words` as one token both alone and after a space; any other word
    falls back to byte tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = _byte_alphabet()
    space = alphabet[ord(" ")]  # "Ġ"
    vocab: dict[str, int] = {}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(words):
        if not word or not word.isascii() or " " in word:
            continue
        for form in (word, space + word):
            pieces = _apply_merges(list(form), merges)
            left = pieces[0]
            for right in pieces[1:]:
                if (left, right) not in merges:
                    merges.append((left, right))
                left = left + right
                vocab.setdefault(left, len(vocab))
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIALS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=model_max_length,
    )
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer
