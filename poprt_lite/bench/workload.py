"""The benchmark workload: PopRT's synthetic SQuAD-like requests, kept in flat numpy arrays.

Request lengths are `clip(int32(Normal(avg, avg)), 1, max_seq_len)` and token ids are uniform in
`[0, vocab)`, drawn exactly as PopRT's `packed_bert_example.py` draws them after
`np.random.seed(2023)`: with the default avg 128 and max 256, padding every request to 256 slots
costs 2.0x the real tokens, so 2.0x is the ideal speed-up of packing.

Requests are stored once, concatenated: `tokens[name]` holds every request's tokens one after
another and request i occupies `offsets[i]:offsets[i] + lengths[i]`. Host-side packing then moves
whole batches with one fancy-indexing assignment per input (no per-request Python loop).
`Request` views exist for `packing_utils.pack_data` and the PackRunner clients.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
TOKEN_TYPE_IDS = "token_type_ids"
POSITION_IDS = "position_ids"


@dataclass
class Request:
    """One request in PopRT's `BertInputs` shape (arrays of its own length)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray | None
    position_ids: np.ndarray
    input_len: int


@dataclass
class Workload:
    lengths: np.ndarray  # int64 [n]
    offsets: np.ndarray  # int64 [n], start of each request in the concatenated token arrays
    tokens: dict[str, np.ndarray]  # input name -> [sum(lengths)] concatenated per-token values
    dtype: np.dtype = field(default_factory=lambda: np.dtype(np.int64))

    @property
    def size(self) -> int:
        return len(self.lengths)

    @property
    def total_tokens(self) -> int:
        return int(self.lengths.sum())

    def request(self, i: int) -> Request:
        lo, n = int(self.offsets[i]), int(self.lengths[i])
        view = {k: v[lo : lo + n] for k, v in self.tokens.items()}
        return Request(
            input_ids=view[INPUT_IDS],
            attention_mask=np.ones(n, self.dtype),
            token_type_ids=view.get(TOKEN_TYPE_IDS),
            position_ids=view[POSITION_IDS],
            input_len=n,
        )

    def feeds(self, i: int, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Request i as PackRunner feeds: its own tokens (views), unpadded."""
        lo, n = int(self.offsets[i]), int(self.lengths[i])
        out = {}
        for name in names:
            if name == ATTENTION_MASK:
                out[name] = np.ones(n, self.dtype)
            elif name in self.tokens:
                out[name] = self.tokens[name][lo : lo + n]
        return out

    def gather_index(self, indices: np.ndarray) -> np.ndarray:
        """Positions in the concatenated arrays of the tokens of `indices`, request after request."""
        lengths = self.lengths[indices]
        first = np.cumsum(lengths) - lengths
        return np.repeat(self.offsets[indices] - first, lengths) + np.arange(int(lengths.sum()))


def synthetic_lengths(n: int, avg_seq_len: int, max_seq_len: int, seed: int = 2023) -> tuple[np.ndarray, np.random.RandomState]:
    rng = np.random.RandomState(seed)
    lengths = np.clip(rng.normal(avg_seq_len, avg_seq_len, size=n).astype(np.int32), 1, max_seq_len)
    return lengths.astype(np.int64), rng


def make_workload(
    n: int,
    avg_seq_len: int = 128,
    max_seq_len: int = 256,
    vocab_size: int = 30522,
    *,
    with_token_types: bool = True,
    position_offset: int = 0,
    seed: int = 2023,
    dtype=np.int64,
) -> Workload:
    """`n` requests; lengths and ids as PopRT's example draws them (same seed, same order)."""
    lengths, rng = synthetic_lengths(n, avg_seq_len, max_seq_len, seed)
    total = int(lengths.sum())
    offsets = np.cumsum(lengths) - lengths
    # PopRT draws ids and token types request by request from the same stream; one draw of the
    # concatenation is statistically identical and vectorised.
    tokens = {INPUT_IDS: rng.randint(0, vocab_size, total).astype(dtype)}
    if with_token_types:
        tokens[TOKEN_TYPE_IDS] = rng.randint(0, 2, total).astype(dtype)
    within = np.arange(total) - np.repeat(offsets, lengths)
    tokens[POSITION_IDS] = (within + position_offset).astype(dtype)
    return Workload(lengths=lengths, offsets=offsets, tokens=tokens, dtype=np.dtype(dtype))
