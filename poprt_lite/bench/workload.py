"""The benchmark's requests, kept in flat numpy arrays, and the two workloads it knows.

Request lengths are `clip(int32(Normal(mean, std)), min, max)` and token ids uniform in
`[0, vocab)`, drawn as PopRT's `packed_bert_example.py` draws them after `np.random.seed(seed)`.
`seed` (the default) is PopRT's SQuAD-like workload: Normal(128, 128) clipped to 1..256, so padding
every request to 256 slots costs 2.0x the real tokens. `queries` is short search-style requests:
Normal(12, 6) clipped to 3..128.

Requests are stored once, concatenated: `tokens[role]` holds every request's tokens one after another
(token ids, token types, position ids) and request i occupies `offsets[i]:offsets[i] + lengths[i]`.
Host-side batching then moves whole batches with one fancy-indexing assignment per input (no
per-request Python loop). `Request` views exist for `packing_utils.pack_data`; `request_feeds` gives
the online clients their unpadded feeds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from poprt_lite.vocab import Role


@dataclass(frozen=True)
class LengthSpec:
    """`clip(int32(Normal(mean, std)), low, high)` (std defaults to the mean, as PopRT draws them)."""

    mean: int
    high: int
    std: int | None = None
    low: int = 1

    @property
    def sigma(self) -> int:
        return self.mean if self.std is None else self.std

    def __str__(self) -> str:
        return f"clip(int32(Normal({self.mean}, {self.sigma})), {self.low}, {self.high})"


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
    tokens: dict[Role, np.ndarray]  # role -> [sum(lengths)] concatenated per-token values
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
            input_ids=view[Role.dynamic_input],
            attention_mask=np.ones(n, self.dtype),
            token_type_ids=view.get(Role.token_type_ids),
            position_ids=view[Role.position_ids],
            input_len=n,
        )

    def request_feeds(self, i: int, roles: Mapping[str, Role]) -> dict[str, np.ndarray]:
        """Request i as feeds of an online server, `roles` mapping the model's input names to roles:
        its own tokens (views), unpadded, and an all-ones attention mask."""
        lo, n = int(self.offsets[i]), int(self.lengths[i])
        out = {}
        for name, role in roles.items():
            if role is Role.attention_mask:
                out[name] = np.ones(n, self.dtype)
            elif role in self.tokens:
                out[name] = self.tokens[role][lo : lo + n]
        return out

    def gather_index(self, indices: np.ndarray) -> np.ndarray:
        """Positions in the concatenated arrays of the tokens of `indices`, request after request."""
        lengths = self.lengths[indices]
        first = np.cumsum(lengths) - lengths
        return np.repeat(self.offsets[indices] - first, lengths) + np.arange(int(lengths.sum()))

    def describe(self, spec: LengthSpec, seed: int) -> str:
        return f"{self.size} requests, lengths {spec}, numpy seed {seed}"


def synthetic_lengths(
    n: int, avg_seq_len: int, max_seq_len: int, seed: int = 2023, *, std: int | None = None, min_seq_len: int = 1
) -> tuple[np.ndarray, np.random.RandomState]:
    """`n` lengths `clip(int32(Normal(avg, std or avg)), min, max)` and the generator, for the ids after them."""
    rng = np.random.RandomState(seed)
    sigma = avg_seq_len if std is None else std
    lengths = np.clip(rng.normal(avg_seq_len, sigma, size=n).astype(np.int32), min_seq_len, max_seq_len)
    return lengths.astype(np.int64), rng


def make_workload(
    n: int,
    spec: LengthSpec,
    vocab_size: int = 30522,
    *,
    with_token_types: bool = True,
    position_offset: int = 0,
    seed: int = 2023,
    dtype=np.int64,
) -> Workload:
    """`n` requests; lengths and ids as PopRT's example draws them (same seed, same order)."""
    lengths, rng = synthetic_lengths(n, spec.mean, spec.high, seed, std=spec.std, min_seq_len=spec.low)
    total = int(lengths.sum())
    offsets = np.cumsum(lengths) - lengths
    # PopRT draws ids and token types request by request from the same stream; one draw of the
    # concatenation is statistically identical and vectorised.
    tokens = {Role.dynamic_input: rng.randint(0, vocab_size, total).astype(dtype)}
    if with_token_types:
        tokens[Role.token_type_ids] = rng.randint(0, 2, total).astype(dtype)
    within = np.arange(total) - np.repeat(offsets, lengths)
    tokens[Role.position_ids] = (within + position_offset).astype(dtype)
    return Workload(lengths=lengths, offsets=offsets, tokens=tokens, dtype=np.dtype(dtype))
