"""The one vocabulary of poprt-lite: pack modes, input roles, output layouts and metadata keys.

Passes write these words into the model's `metadata_props` (through `PassContext.metadata`); the
artifact copies them into its manifest; runners, `--check`, the bench and `inspect` read them back.
Every module spells them through this one, so a word has one meaning and one default everywhere.
Enum members are `str` subclasses: they compare equal to, and serialize as, their plain values.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, MutableMapping
from dataclasses import asdict, dataclass
from typing import Any


class _Word(str, enum.Enum):
    """A vocabulary word: equal to, hashed as, formatted and serialized as its plain string value."""

    def __str__(self) -> str:
        return self.value

    def __hash__(self) -> int:
        return hash(self.value)


class PackMode(_Word):
    """The built-in ways requests share a batch (`--pack_args mode=...`); what each one is and does
    is its descriptor's (runtime/modes.py), where further modes register under their own names."""

    unpack_repack = "unpack_repack"  # one token stream over [B*S]; attention on unpacked rows (PopRT's default)
    attention_mask = "attention_mask"  # each request inside one row; block-diagonal attention mask
    token_stream = "token_stream"  # one dynamic stream of real tokens [T]; attention on unpacked rows
    token_stream_loop = "token_stream_loop"  # token_stream with attention in a Loop, at each request's own length

    @classmethod
    def named(cls, value: str) -> str:
        """A pack mode read from metadata or a manifest: the member of a built-in mode, else the name
        of a registered one as given (runtime/modes.py knows whether it is)."""
        return cls(value) if isinstance(value, str) and value in cls._value2member_map_ else str(value)


DEFAULT_PACK_MODE = PackMode.unpack_repack


class Role(_Word):
    """What a model input carries, so a runner can build it for a request."""

    dynamic_input = "dynamic_input"  # token ids: a request's length is this input's length
    attention_mask = "attention_mask"  # 1/0 padding mask, or segment ids in AttentionMask mode
    token_type_ids = "token_type_ids"
    position_ids = "position_ids"
    unpack_info = "unpack_info"  # request lengths in packing order, 0 for unused slots
    data = "data"  # any other per-token input, fed as given


# Integer inputs that index an embedding table, and the roles a runner may fill for a request.
ID_ROLES = (Role.dynamic_input, Role.token_type_ids, Role.position_ids)
TOKEN_ROLES = (*ID_ROLES, Role.data)
# The role of an input that no pass described, by its usual exporter name.
INPUT_IDS = "input_ids"
UNPACK_INFO = Role.unpack_info.value
DEFAULT_ROLES = {
    INPUT_IDS: Role.dynamic_input,
    **{role.value: role for role in (Role.attention_mask, Role.token_type_ids, Role.position_ids, Role.unpack_info)},
}


class Layout(_Word):
    """How a model output holds the answers of the requests of one batch."""

    padded = "padded"  # not packed: [batch, seq, ...] with one request per row
    packed = "packed"  # [B, S, ...] packed rows: request i at its (row, offset)
    unpacked = "unpacked"  # [N, L, ...]: row i is request i, its first `length` tokens
    per_request = "per_request"  # [N, ...]: one value per request (pooled)
    stream = "stream"  # [1, T, ...]: the batch's token stream, request i at its start offset
    global_ = "global"  # neither per token nor per request: no runner can split it

    @property
    def per_token(self) -> bool:
        return self in (Layout.padded, Layout.packed, Layout.unpacked, Layout.stream)


DEFAULT_LAYOUT = Layout.padded


class Dim(_Word):
    """Names of the dynamic dims of a token_stream model (its inputs, outputs and manifest)."""

    tokens = "tokens"  # T: the batch's real tokens, one stream [1, T]
    requests = "requests"  # k: the batch's requests (unpack_info [k], per-request outputs [k, ...])
    longest = "longest"  # the batch's longest request (unpacked outputs [k, longest, ...])


class MetaKey(_Word):
    """Keys of the model metadata (`metadata_props`, prefixed `poprt_lite.`) and of the manifest."""

    pack = "pack"  # JSON of PackSpec
    position_offset = "position_offset"  # first position id of a request (2 for RoBERTa)
    position_table_size = "position_table_size"  # rows of the position embedding table
    vocab_size = "vocab_size"  # rows of the token embedding table
    precision = "precision"  # fp32 | fp16 | int8
    rows = "rows"  # the most rows of a batch whose row dim is dynamic (--dynamic_rows: --input_shape's B)
    attention_masks = "attention_masks"  # JSON: per attention block (its Softmax), the mask terms replaced and kept


ROLE_PREFIX = "role."
LAYOUT_PREFIX = "layout."


@dataclass(frozen=True)
class PackSpec:
    """The packing configuration a model was compiled for (`--pack_args`)."""

    mode: str  # a PackMode, or the name of a registered mode
    max_valid_num: int
    segment_max_size: int
    max_tokens: int | None = None  # token_stream: the most tokens one batch holds

    def to_json(self) -> str:
        fields = asdict(self)
        fields["mode"] = str(self.mode)
        if self.max_tokens is None:
            del fields["max_tokens"]
        return json.dumps(fields)

    @classmethod
    def from_mapping(cls, value: Mapping[str, Any]) -> "PackSpec":
        return cls(
            mode=PackMode.named(value["mode"]),
            max_valid_num=int(value["max_valid_num"]),
            segment_max_size=int(value["segment_max_size"]),
            max_tokens=int(value["max_tokens"]) if value.get("max_tokens") is not None else None,
        )

    def as_dict(self) -> dict[str, Any]:
        return json.loads(self.to_json())


# ------------------------------------------------------------------ model metadata (str -> str)


def set_role(metadata: MutableMapping[str, str], input_name: str, role: Role) -> None:
    metadata[ROLE_PREFIX + input_name] = Role(role).value


def role_of(metadata: Mapping[str, str], input_name: str) -> Role:
    """The role a pass recorded for `input_name`, else the usual one for its name, else `data`."""
    recorded = metadata.get(ROLE_PREFIX + input_name)
    if recorded is not None:
        return Role(recorded)
    return DEFAULT_ROLES.get(input_name, Role.data)


def set_layout(metadata: MutableMapping[str, str], output_name: str, layout: Layout) -> None:
    metadata[LAYOUT_PREFIX + output_name] = Layout(layout).value


def layout_of(metadata: Mapping[str, str], output_name: str) -> Layout:
    return Layout(metadata.get(LAYOUT_PREFIX + output_name, DEFAULT_LAYOUT.value))


def set_pack_spec(metadata: MutableMapping[str, str], spec: PackSpec) -> None:
    metadata[MetaKey.pack.value] = spec.to_json()


def pack_spec_of(metadata: Mapping[str, str]) -> PackSpec | None:
    text = metadata.get(MetaKey.pack.value)
    return PackSpec.from_mapping(json.loads(text)) if text else None


def int_of(metadata: Mapping[str, Any], key: MetaKey, default: int = 0) -> int:
    value = metadata.get(key.value)
    return default if value in (None, "") else int(value)


def set_int(metadata: MutableMapping[str, str], key: MetaKey, value: int) -> None:
    metadata[key.value] = str(int(value))


# ----------------------------------------------------------------------- manifest (JSON object)


def manifest_pack_spec(manifest: Mapping[str, Any]) -> PackSpec | None:
    value = manifest.get(MetaKey.pack.value)
    return PackSpec.from_mapping(value) if value else None


def spec_role(input_spec: Mapping[str, Any]) -> Role:
    """The role of one manifest input entry."""
    return Role(input_spec.get("role") or role_of({}, input_spec["name"]))


def spec_layout(output_spec: Mapping[str, Any]) -> Layout:
    """The layout of one manifest output entry."""
    return Layout(output_spec.get("layout") or DEFAULT_LAYOUT.value)
