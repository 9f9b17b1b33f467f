r"""The Gemma tokenizer: SentencePiece BPE, plus the special-token handling transformers adds around it.

Gemma 1, 2 and 3 all ship a SentencePiece BPE model (`tokenizer.model`). A GGUF file carries the same
vocabulary as three parallel arrays (pieces, scores, types) instead, so `from_gguf` rebuilds the SentencePiece
model proto from them in memory. Either way, encoding is two steps:

    "<start_of_turn>user\nhi  there<end_of_turn>"
      1. cut out special pieces (longest match):  [<start_of_turn>] "user" [\n] "hi  there" [<end_of_turn>]
      2. SentencePiece-encode the text between:   user -> 2364,   hi ▁▁ there -> 2202 138 13534
      -> [2, 105, 2364, 107, 2202, 138, 13534, 106]   (2 = <bos>, added in front by default)

Step 2 runs in one of two encoders, switched like the kernels (`Tokenizer.encoder`): the `sentencepiece`
library (C++, the default, ~4 M characters/s) or `PythonBPE` below (pure Python, ~0.4 M characters/s, the
reference a reader can step through: normalise, split into characters, merge the best-scoring pair until none
is left, byte fallback). The tests hold their ids equal.

Step 1 is needed because SentencePiece never produces control pieces (`<start_of_turn>`, `<pad>`, `<unusedN>`)
from text, while transformers, our test oracle, does: it registers every control piece as a special
`AddedToken` and every user-defined piece (`\n` runs, tab runs, `<table>`, `[multimodal]`) as a plain one, both
`normalized=False`, `lstrip=rstrip=False`, and cuts them out of the raw text before its BPE runs
(transformers `integrations/gguf/gguf_tokenizer_mapping.py` `add_gguf_special_tokens`; the same for a
`tokenizer.model` in `convert_slow_tokenizer.py` `SpmConverter`). No spaces around a special piece are
stripped or added: "a <pad> b" -> a, ▁, <pad>, ▁b.

SentencePiece settings (those of Gemma's published tokenizer.model, and of transformers' Gemma tokenizer, whose
normalizer only replaces " " by "▁" and which adds no prefix space, `models/gemma/tokenization_gemma.py`):
BPE, byte fallback, identity normalizer, no dummy prefix, no whitespace clean-up, spaces escaped as "▁".

Two adjustments make SentencePiece's BPE agree with transformers' exactly (see `_as_transformers_sees_it`):
pieces are ranked by their position in the vocabulary, and the whitespace-only "▁▁".."▁"*31 pieces are
ordinary BPE pieces rather than user-defined ones. They only matter for runs of more than 31 spaces.

Decoding renders every id as its piece text, as transformers' `decode(ids)` does by default ("<end_of_turn>"
comes out as "<end_of_turn>"), except that a leading <bos> (the one `encode` adds) is dropped, so
`decode(encode(text)) == text` (caveat: a literal "▁" in the text comes back as a space).
"""

from __future__ import annotations

import heapq
import re
from pathlib import Path
from typing import Callable

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb

from .errors import InvalidArgument, ModelFileError, TokenIdOutOfRange, UnknownToken

# Piece types. SentencePiece's `ModelProto.SentencePiece.Type` and llama.cpp's `tokenizer.ggml.token_type`
# (gguf `constants.py` `TokenType`) use the same numbers, so GGUF types copy straight across.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SPACE = "\u2581"  # "▁", SentencePiece's spelling of a space inside pieces

ENCODERS = ("sentencepiece", "python")  # Tokenizer.encoder: the C++ library, or PythonBPE below


class Tokenizer:
    """SentencePiece tokenizer for Gemma, matching transformers' ids (and its decoding, minus a leading <bos>).

    Build it with `from_file` (a `tokenizer.model`), `from_gguf` (a file opened by `gguf_file.open_gguf`) or directly from a
    SentencePiece `ModelProto`.

    `encoder` picks who merges the text between special pieces, like the kernels' backend: "sentencepiece"
    (the C++ library, the default: fast) or "python" (`PythonBPE`, the readable reference; same ids, tested).
    It is a plain attribute: `tok.encoder = "python"` switches an existing tokenizer.
    """

    def __init__(self, model: sp_pb.ModelProto, encoder: str = "sentencepiece"):
        proto = sp_pb.ModelProto()
        proto.CopyFrom(model)
        _as_transformers_sees_it(proto)
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        except RuntimeError as e:  # e.g. "there are not 256 byte pieces although byte_fallback is true"
            raise ModelFileError(f"not a usable SentencePiece vocabulary ({e})") from None
        self._proto = proto  # kept for PythonBPE, built the first time it is asked for (0.5 s on 262k pieces)
        self._python: PythonBPE | None = None
        self.encoder = encoder

        self._pieces: list[str] = [p.piece for p in proto.pieces]  # id -> piece, SentencePiece spelling
        self._ids: dict[str, int] = {piece: i for i, piece in enumerate(self._pieces)}
        self.vocab_size = len(self._pieces)
        spec = proto.trainer_spec
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = spec.bos_id, spec.eos_id, spec.pad_id, spec.unk_id

        # Byte-fallback pieces "<0x00>".."<0xFF>": decoding collects runs of them into bytes.
        self._byte_value = {i: int(p.piece[3:5], 16) for i, p in enumerate(proto.pieces) if p.type == BYTE}

        # Pieces that transformers matches whole in the raw text before BPE (see the module docstring). The
        # whitespace-only pieces ("▁▁"...) are left to BPE; transformers doesn't match them on spaces either.
        self._special_ids = {
            p.piece: i
            for i, p in enumerate(proto.pieces)
            if p.type in (CONTROL, UNKNOWN, USER_DEFINED) and SPACE not in p.piece
        }
        # Leftmost-longest matching, like the Aho-Corasick matcher in `tokenizers`: "\n\n\n" is one piece.
        self._special_re = _trie_regex(self._special_ids)

    # ------------------------------------------------------------------------------------------------ loading

    @property
    def encoder(self) -> str:
        """Who runs the BPE merges: "sentencepiece" or "python" (see the class docstring)."""
        return self._encoder

    @encoder.setter
    def encoder(self, name: str) -> None:
        if name not in ENCODERS:
            raise InvalidArgument(f"encoder must be one of {', '.join(ENCODERS)}, got {name!r}")
        self._encoder = name
        self._bpe = self._sp.encode if name == "sentencepiece" else self.python_bpe.encode

    @property
    def python_bpe(self) -> "PythonBPE":
        """The pure-Python encoder of this vocabulary (built on first use), e.g. to watch its merges:
        `tok.python_bpe.encode("▁word", trace=print)`."""
        if self._python is None:
            self._python = PythonBPE(self._proto)
        return self._python

    @classmethod
    def from_file(cls, path, encoder: str = "sentencepiece") -> "Tokenizer":
        """Load an HF-style `tokenizer.model` (a serialized SentencePiece `ModelProto`)."""
        proto = sp_pb.ModelProto()
        try:
            proto.ParseFromString(Path(path).read_bytes())
        except Exception as e:  # protobuf's DecodeError
            raise ModelFileError(f"not a SentencePiece model file ({type(e).__name__})") from None
        return cls(proto, encoder)

    @classmethod
    def from_gguf(cls, reader, encoder: str = "sentencepiece") -> "Tokenizer":
        """Build the tokenizer from a GGUF file's `tokenizer.ggml.*` metadata (no files written): the file as
        `gguf_file.open_gguf` reads it, or a `gguf.GGUFReader` (both give `fields[key].contents()`)."""
        try:
            return cls(model_proto_from_gguf(reader), encoder)
        except (TypeError, AttributeError, OverflowError) as e:  # arrays of the wrong kind in a broken file
            raise ModelFileError(f"tokenizer metadata tokenizer.ggml.* is malformed ({type(e).__name__}: {e})") \
                from None

    # ------------------------------------------------------------------------------------------------ encode

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Text -> token ids. Special pieces written in the text become single ids; <bos> first if add_bos."""
        if not isinstance(text, str):
            raise InvalidArgument(f"encode needs a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate, e.g. from os.fsdecode of bytes that aren't UTF-8
            raise InvalidArgument(f"the text has a character that is not valid Unicode ({text[e.start]!r} at "
                                  f"index {e.start})") from None
        ids = [self.bos_id] if add_bos else []
        start = 0
        for m in self._special_re.finditer(text):
            if m.start() > start:
                ids += self._bpe(text[start : m.start()])
            ids.append(self._special_ids[m.group()])
            start = m.end()
        if start < len(text):
            ids += self._bpe(text[start:])
        return ids

    # ------------------------------------------------------------------------------------------------ decode

    def decode(self, ids) -> str:
        """Token ids -> text, rendering special pieces as their text ("<end_of_turn>"), like transformers'
        `decode(ids)` with its defaults, except that one leading <bos> is dropped.

        Pieces: "▁" -> " ". Byte pieces: each run of consecutive ones is joined into bytes and decoded as
        UTF-8; if the run is not valid UTF-8 every byte of it becomes U+FFFD, like the `ByteFallback` decoder
        of `tokenizers` that transformers uses (so a character cut off mid-way, as in streaming, shows up as
        U+FFFD until its last byte arrives).
        """
        ids = [int(i) for i in ids]
        if ids and ids[0] == self.bos_id:
            ids = ids[1:]
        out: list[str] = []
        run = bytearray()  # pending byte-fallback bytes
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise TokenIdOutOfRange(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
            if i in self._byte_value:
                run.append(self._byte_value[i])
                continue
            if run:
                out.append(_bytes_to_text(run))
                run = bytearray()
            out.append(self._pieces[i].replace(SPACE, " "))
        if run:
            out.append(_bytes_to_text(run))
        return "".join(out)

    # ------------------------------------------------------------------------------------------------ lookups

    def token_id(self, piece: str) -> int:
        """Id of a piece, spelled the SentencePiece way ("<end_of_turn>", "▁the", "▁▁" for two spaces)."""
        try:
            return self._ids[piece]
        except KeyError:
            raise UnknownToken(f"{piece!r} is not a piece of this {self.vocab_size}-piece vocabulary") from None

    def is_byte(self, i: int) -> bool:
        """Whether id i is a byte-fallback piece (<0x00>..<0xFF>), one byte of a character's UTF-8."""
        return i in self._byte_value

    def id_to_piece(self, i: int) -> str:
        if not 0 <= i < self.vocab_size:
            raise TokenIdOutOfRange(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self._pieces[i]


class PythonBPE:
    """SentencePiece's BPE encoder in pure Python: the readable reference, as the NumPy kernels are for Numba.

    A line-by-line port of what `SentencePieceProcessor.encode` does with a BPE model (google/sentencepiece
    `src/normalizer.cc` `Normalize`, `src/bpe_model.cc` `Model::SampleEncode` without dropout,
    `src/sentencepiece_processor.cc` `PopulateSentencePieceText`), tested to give the library's ids:

      1. normalize: only the identity normalizer (Gemma's): " " -> "▁", and a "▁" in front if the model
         asks for a dummy prefix (Gemma's doesn't);
      2. split into symbols: a user-defined piece matched at a position (the longest) is one symbol that never
         merges ("frozen"); anything else is one character;
      3. merge: of all adjacent pairs whose concatenation is a piece (normal, user-defined or unused), merge
         the one with the highest score, the leftmost on a tie; repeat until no pair is a piece;
      4. look each symbol up; an unused piece (type 5) was only a stepping stone and is split back into the
         two symbols it was merged from; a symbol that is no piece at all is <unk>, which with byte fallback
         becomes one <0xNN> piece per UTF-8 byte (without it, a run of <unk>s is one <unk>).

    What the encoder does *not* do is as telling. There is no pre-split on spaces, digits or punctuation
    (GPT-2's regex): `split_digits`, `split_by_whitespace` and `allow_whitespace_only_pieces` are training
    options, they decide which pieces exist, and encoding follows from the vocabulary alone (Gemma's has
    no multi-digit piece, so digits come out one by one). Control pieces (<bos>, <start_of_turn>, <unusedN>)
    are never produced from text, since they are not in the merge table; `Tokenizer.encode` cuts them out first.

    Speed: a dict lookup per candidate pair and a heap, in pure Python: 0.33-0.49 M characters/s against the
    library's 3.1-4.3 M, ten times slower (the first 200,000 characters of `perplexity.reference_text`, Gemma's
    262,144 pieces, two runs on a shared 2-core machine; notebook 01 measures it again). Fine for prompts,
    tests and reading; `sentencepiece` stays the default.
    """

    def __init__(self, proto: sp_pb.ModelProto):
        norm = proto.normalizer_spec
        if norm.precompiled_charsmap or norm.remove_extra_whitespaces or norm.name not in ("identity", ""):
            raise ModelFileError(f"the Python encoder knows only the identity normalizer without whitespace "
                                 f"clean-up (Gemma's); this model's is {norm.name!r}")
        if proto.trainer_spec.model_type != sp_pb.TrainerSpec.BPE:
            raise ModelFileError("the Python encoder knows only BPE models")
        self.add_dummy_prefix = norm.add_dummy_prefix
        self.escape_whitespaces = norm.escape_whitespaces
        self.byte_fallback = proto.trainer_spec.byte_fallback

        # What may result from a merge: piece -> (id, score). Control, unknown and byte pieces are not in it
        # (model_interface.cc `InitializePieces`), so no merge ever produces one.
        self.pieces: dict[str, tuple[int, float]] = {}
        self.reserved: dict[str, int] = {}  # control, unknown and byte pieces: found by lookup only
        self.unused: set[int] = set()
        user_defined = []
        for i, p in enumerate(proto.pieces):
            if p.type in (NORMAL, USER_DEFINED, UNUSED):
                self.pieces[p.piece] = (i, p.score)
            else:
                self.reserved[p.piece] = i
            if p.type == USER_DEFINED:
                user_defined.append(p.piece)
            if p.type == UNUSED:
                self.unused.add(i)
            if p.type == UNKNOWN:
                self.unk_id = i
        self.byte_ids = [self.reserved.get(f"<0x{b:02X}>", self.unk_id) for b in range(256)]
        self._user_defined = _trie_regex(user_defined)  # longest match, like sentencepiece's PrefixMatcher

    def normalize(self, text: str) -> str:
        """normalizer.cc `Normalize`, for the identity normalizer: "a b" -> "a▁b"."""
        if not text:
            return ""
        if self.add_dummy_prefix:
            text = " " + text
        return text.replace(" ", SPACE) if self.escape_whitespaces else text

    def symbols(self, normalized: str) -> list[tuple[str, bool]]:
        """The starting symbols and whether each is frozen (a user-defined piece, never merged)."""
        out, i = [], 0
        while i < len(normalized):
            m = self._user_defined.match(normalized, i)
            if m and m.end() > i:
                out.append((m.group(), True))
                i = m.end()
            else:
                out.append((normalized[i], False))
                i += 1
        return out

    def encode(self, text: str, trace: Callable[[list[str]], None] | None = None) -> list[int]:
        """Text (no special pieces in it) -> ids, as SentencePiece's BPE gives them.

        `trace`, if given, is called with the list of symbols at the start and after every merge.
        """
        start = self.symbols(self.normalize(text))
        piece = [s for s, _ in start]  # piece[i]: symbol i, "" once merged into its left neighbour
        frozen = [f for _, f in start]
        prev = list(range(-1, len(piece) - 1))  # a doubly linked list over the symbols still alive
        next_ = list(range(1, len(piece) + 1))
        next_[-1:] = [-1]
        agenda: list[tuple[float, int, int, str]] = []  # (-score, left, right, merged): heapq is a min-heap
        rev_merge: dict[str, tuple[str, str]] = {}  # unused piece -> the two symbols it was made of

        def maybe_add_pair(left: int, right: int) -> None:
            if left == -1 or right == -1 or frozen[left] or frozen[right]:
                return
            merged = piece[left] + piece[right]
            found = self.pieces.get(merged)
            if found is None:
                return
            heapq.heappush(agenda, (-found[1], left, right, merged))  # best score first, then leftmost
            if found[0] in self.unused:
                rev_merge[merged] = (piece[left], piece[right])

        for i in range(1, len(piece)):
            maybe_add_pair(i - 1, i)
        if trace:
            trace([p for p in piece if p])
        while agenda:
            _, left, right, merged = heapq.heappop(agenda)
            # Stale: one of the two was merged into a neighbour since (it is "", or longer). bpe_model.cc checks
            # the lengths, as here; both sides can only grow, so equal lengths mean the same two symbols.
            if not piece[left] or not piece[right] or len(piece[left]) + len(piece[right]) != len(merged):
                continue
            piece[left], piece[right] = merged, ""
            next_[left] = next_[right]
            if next_[right] != -1:
                prev[next_[right]] = left
            maybe_add_pair(prev[left], left)
            maybe_add_pair(left, next_[left])
            if trace:
                trace([p for p in piece if p])

        ids: list[int] = []
        previous_unknown = False
        for p in self._resegment([p for p in piece if p], rev_merge):
            i = self._piece_to_id(p)
            if i == self.unk_id and self.byte_fallback:
                ids += [self.byte_ids[b] for b in p.encode("utf-8")]
            elif not (i == self.unk_id and previous_unknown):  # without byte fallback a run of <unk> is one
                ids.append(i)
            previous_unknown = i == self.unk_id
        return ids

    def _piece_to_id(self, piece: str) -> int:
        """model_interface.cc `PieceToId`: reserved pieces first, then the rest; anything else is <unk>."""
        if piece in self.reserved:
            return self.reserved[piece]
        found = self.pieces.get(piece)
        return self.unk_id if found is None else found[0]

    def _resegment(self, symbols: list[str], rev_merge: dict[str, tuple[str, str]]) -> list[str]:
        """Split every unused piece back into the symbols it was merged from (recursively)."""
        out: list[str] = []
        todo = symbols[::-1]
        while todo:
            s = todo.pop()
            if self._piece_to_id(s) in self.unused and s in rev_merge:
                todo += rev_merge[s][::-1]
            else:
                out.append(s)
        return out


def model_proto_from_gguf(reader) -> sp_pb.ModelProto:
    """The SentencePiece `ModelProto` that a GGUF's `tokenizer.ggml.*` arrays describe.

    This is the `tokenizer.model` the GGUF was converted from, as far as the GGUF keeps it: pieces, scores and
    types copy across; the trainer and normalizer settings, which the GGUF doesn't store, are Gemma's (as in
    transformers `convert_slow_tokenizer.py` `GemmaConverter` and `models/gemma/tokenization_gemma.py`).
    """
    meta = {name: field.contents() for name, field in reader.fields.items() if name.startswith("tokenizer.ggml.")}
    kind = meta.get("tokenizer.ggml.model")
    if kind != "llama":  # llama.cpp's name for a SentencePiece vocabulary
        raise ModelFileError(f"not a SentencePiece vocabulary: tokenizer.ggml.model = {kind!r}")
    if meta.get("tokenizer.ggml.add_space_prefix", False):
        raise ModelFileError("tokenizer.ggml.add_space_prefix is true, but Gemma's tokenizer never adds a space "
                         "prefix (llama.cpp's Gemma converter writes false)")

    def need(key):
        if f"tokenizer.ggml.{key}" not in meta:
            raise ModelFileError(f"tokenizer metadata tokenizer.ggml.{key} is missing")
        return meta[f"tokenizer.ggml.{key}"]

    pieces, scores, types = need("tokens"), need("scores"), need("token_type")
    unk_id = need("unknown_token_id")

    proto = sp_pb.ModelProto()
    for i, (piece, score, kind) in enumerate(zip(pieces, scores, types)):
        # The GGUF spells multi-space pieces with real spaces ("  " is id 138); SentencePiece spells them "▁▁"
        # (transformers `gguf_tokenizer_mapping.py` `gemma_tokenizer`, fix 1). No real SentencePiece piece
        # holds a space, since spaces are escaped before lookup, so every space here is such a respelling.
        # The GGUF marks <unk> as control (type 3); SentencePiece insists on exactly one UNKNOWN piece.
        proto.pieces.add(piece=piece.replace(" ", SPACE), score=score, type=UNKNOWN if i == unk_id else kind)

    spec = proto.trainer_spec  # Gemma's training settings (transformers `GemmaConverter`)
    spec.model_type = sp_pb.TrainerSpec.BPE
    spec.vocab_size = len(pieces)
    spec.byte_fallback = True  # unknown characters become their UTF-8 bytes, <0x00>..<0xFF>
    spec.split_digits = True  # every digit is its own piece
    spec.allow_whitespace_only_pieces = True  # "▁▁", "▁▁▁"... exist
    spec.unk_id = unk_id
    spec.bos_id = need("bos_token_id")
    spec.eos_id = need("eos_token_id")
    spec.pad_id = meta.get("tokenizer.ggml.padding_token_id", -1)

    norm = proto.normalizer_spec  # text goes in untouched except " " -> "▁"
    norm.name = "identity"
    norm.add_dummy_prefix = False  # GGUF: add_space_prefix = false
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto


def _as_transformers_sees_it(proto: sp_pb.ModelProto) -> None:
    """Adjust a Gemma SentencePiece model in place so that its BPE gives transformers' ids.

    1. Rank merges by piece position: transformers builds its BPE merges ordered by the position of the merged
       piece in the vocabulary, not by score (`gguf_tokenizer_mapping.py` `gemma_tokenizer`, fix 2, and
       `GemmaSentencePieceExtractor` for a `tokenizer.model`). For normal pieces the two orders agree (the
       scores fall with position), but the whitespace runs "▁▁".."▁"*31 (ids 138-167) score -1000 and sit
       near the top of the vocabulary; by position they merge before everything else.
    2. Make those whitespace runs normal pieces. SentencePiece matches user-defined pieces greedily, so 32
       spaces would become ▁*31 + ▁, but transformers does not match them as added tokens on spaces and lets
       BPE build them: 32 spaces -> ▁*16 + ▁*16.
    Nothing else changes: control and other user-defined pieces are cut out before SentencePiece sees the text.
    """
    for i, p in enumerate(proto.pieces):
        p.score = -i
        if p.type == USER_DEFINED and p.piece.strip(SPACE) == "":
            p.type = NORMAL


def _trie_regex(words) -> re.Pattern:
    """One regex matching any of `words`, the longest one where several match at a position.

    The words are laid out as a prefix tree, so ["<a>", "<ab>", "<b>"] gives `<(?:a(?:>|b>)|b>)`. A flat
    "<ab>|<a>|<b>" (longest first) matches the same, but with 6,384 special pieces, most starting with "<",
    it takes up to a second to compile and tries every alternative at each "<" and "\\n"; the tree takes 0.1 s
    and follows one branch. A word that is a prefix of another ends in an optional group; `?` is greedy,
    so the longer word wins.
    """
    tree: dict = {}
    for word in words:
        node = tree
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}  # a word ends here
    if not tree:
        return re.compile(r"(?!)")  # no special pieces: a pattern that never matches

    def pattern(node: dict) -> str:
        branches = [re.escape(ch) + pattern(child) for ch, child in sorted(node.items()) if ch]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 and "" not in node else "(?:" + "|".join(branches) + ")"
        return body + ("?" if "" in node else "")

    return re.compile(pattern(tree))


def _bytes_to_text(run: bytearray) -> str:
    try:
        return run.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(run)  # one replacement per byte, as `tokenizers`' ByteFallback decoder does
