"""Tokenizer with atomic user/item ID tokens on top of any Hugging Face fast tokenizer.

Token id layout (N = base vocabulary size, I users, J items):

    [0, N)            base vocabulary, encoded by the wrapped tokenizer
    [N, N + I)        user_0 ... user_{I-1}
    [N + I, N + I + J) item_0 ... item_{J-1}

`user_i` / `item_j` are never split into sub-words: text is pre-split on the regex
`(user_\\d+|item_\\d+)` and only the other pieces reach the base tokenizer. An ID token
behaves like a word: the whitespace just before it belongs to it and is not encoded, so
"item_1 item_2" is exactly two tokens (main texts of collaborative documents must be
homogeneous). Decoding puts one space back before each ID token that does not start the
text, so canonical text (one space before each ID) round-trips exactly.
"""
from __future__ import annotations

import re

ID_PATTERN = re.compile(r"(user_\d+|item_\d+)")


class IDTokenizer:
    def __init__(self, base_tokenizer, num_users: int, num_items: int, add_bos: bool = False,
                 vocab_size: int | None = None):
        if not getattr(base_tokenizer, "is_fast", False):
            raise TypeError(f"{type(base_tokenizer).__name__} is not a fast tokenizer; load one with tokenizer.json")
        self.base = base_tokenizer
        # ID tokens start after the model's vocabulary, which may be padded beyond the tokenizer's.
        self.vocab_size = vocab_size or len(base_tokenizer)
        self.num_users = num_users
        self.num_items = num_items
        self.add_bos = add_bos and base_tokenizer.bos_token_id is not None
        pad = base_tokenizer.pad_token_id
        if pad is None:
            pad = base_tokenizer.eos_token_id if base_tokenizer.eos_token_id is not None else 0
        # Padded positions are masked out of attention and loss, so any valid id will do.
        self.pad_id = int(pad)

    # ----- id arithmetic -------------------------------------------------------------
    @property
    def user_offset(self) -> int:
        return self.vocab_size

    @property
    def item_offset(self) -> int:
        return self.vocab_size + self.num_users

    @property
    def total_size(self) -> int:
        return self.vocab_size + self.num_users + self.num_items

    def user_token(self, user: int) -> int:
        return self.user_offset + user

    def item_token(self, item: int) -> int:
        return self.item_offset + item

    def _id_piece_to_token(self, piece: str) -> int:
        kind, number = piece.split("_")
        index = int(number)
        limit = self.num_users if kind == "user" else self.num_items
        if index >= limit:
            raise ValueError(f"{piece} is out of range: the tokenizer knows {limit} {kind}s")
        return self.user_token(index) if kind == "user" else self.item_token(index)

    # ----- encoding --------------------------------------------------------------------
    def _split(self, text: str) -> list[str]:
        pieces = ID_PATTERN.split(text)
        out = []
        for k, piece in enumerate(pieces):
            is_id = k % 2 == 1
            if not is_id and k + 1 < len(pieces):
                piece = piece.rstrip(" ")  # the space before an ID token belongs to it
            if piece:
                out.append(piece)
        return out

    def encode_many(self, texts: list[str], with_bos: bool | None = None) -> list[list[int]]:
        """Encode texts without padding; BOS is prepended when `with_bos` (default: add_bos)."""
        with_bos = self.add_bos if with_bos is None else with_bos
        split = [self._split(t) for t in texts]
        plain = [p for pieces in split for p in pieces if not ID_PATTERN.fullmatch(p)]
        plain_ids = iter(self.base(plain, add_special_tokens=False)["input_ids"]) if plain else iter(())
        encoded = []
        for pieces in split:
            ids = [self.base.bos_token_id] if with_bos else []
            for piece in pieces:
                if ID_PATTERN.fullmatch(piece):
                    ids.append(self._id_piece_to_token(piece))
                else:
                    ids.extend(next(plain_ids))
            encoded.append(ids)
        return encoded

    def encode(self, text: str, with_bos: bool | None = None) -> list[int]:
        return self.encode_many([text], with_bos)[0]

    # ----- decoding --------------------------------------------------------------------
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        out: list[str] = []
        vocab_run: list[int] = []

        def flush():
            if vocab_run:
                out.append(self.base.decode(vocab_run, skip_special_tokens=skip_special_tokens))
                vocab_run.clear()

        for token in ids:
            token = int(token)
            if token < self.vocab_size:
                vocab_run.append(token)
                continue
            flush()
            if token < self.item_offset:
                name = f"user_{token - self.user_offset}"
            elif token < self.total_size:
                name = f"item_{token - self.item_offset}"
            else:
                raise ValueError(f"token id {token} is beyond the ID vocabulary ({self.total_size})")
            text_so_far = "".join(out)
            out.append(name if not text_so_far or text_so_far[-1].isspace() else " " + name)
        flush()
        return "".join(out)
