"""What a packed artifact's manifest tells a runner, read and checked once: the pack spec and batch
geometry, how each input is filled for a request, how each output is split per request, and the
embedding-table bounds of the id inputs. Everything here is frozen; runners never re-read strings
from the manifest.

Batch geometry: the static modes' per-token inputs are `[batch_size, seq_len]` (their static shape);
with `--dynamic_rows` their row dim is dynamic and the manifest's `rows` bounds it (`batch_size`);
token_stream's are `[1, tokens]` with a dynamic token dim, and a batch holds at most `max_tokens`
tokens, so its geometry is `batch_size=1, seq_len=max_tokens` (a bound, not a shape); its
`unpack_info`, unpacked and per-request outputs have a dynamic request dim.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from poprt_lite import vocab
from poprt_lite.ir.artifact import Artifact
from poprt_lite.errors import PoprtError, option
from poprt_lite.runtime import modes
from poprt_lite.runtime.layouts import BatchLayout
from poprt_lite.runtime.modes import ModeDescriptor
from poprt_lite.vocab import ID_ROLES, TOKEN_ROLES, Layout, MetaKey, PackSpec, Role

# Inputs a request may leave out: the runner fills them.
OPTIONAL_ROLES = (Role.token_type_ids, Role.position_ids, Role.attention_mask, Role.unpack_info)
SPLITTABLE_LAYOUTS = (Layout.unpacked, Layout.packed, Layout.per_request, Layout.stream)
DYNAMIC = None  # in an expected shape: any size (a dynamic dim)


@dataclass(frozen=True)
class TokenInput:
    """A per-token input (`[batch, seq, *trailing]`): token ids, types, positions or data."""

    name: str
    role: Role
    dtype: np.dtype
    trailing: tuple[int, ...]


@dataclass(frozen=True)
class Output:
    """An output and the shape of one request's share of it (`[n, *trailing]` per token, else `trailing`)."""

    name: str
    layout: Layout
    dtype: np.dtype
    trailing: tuple[int, ...]


@dataclass(frozen=True)
class PackedInterface:
    path: Path
    pack: PackSpec
    batch_size: int
    seq_len: int
    position_offset: int
    vocab_size: int | None
    dynamic_input: str
    mask: tuple[str, np.dtype] | None  # the attention-mask input, built by the runner
    unpack_info: tuple[str, np.dtype] | None  # unpack_repack's lengths input, built by the runner
    token_inputs: dict[str, TokenInput]
    outputs: dict[str, Output]
    id_rows: dict[str, int]  # rows of the table each non-token id input indexes
    input_roles: dict[str, Role]
    dynamic_rows: bool = False  # a batch runs on the rows it uses (at most batch_size)

    @property
    def mode(self) -> str:
        return self.pack.mode

    @property
    def descriptor(self) -> ModeDescriptor:
        return modes.get(self.pack.mode)

    @property
    def max_valid_num(self) -> int:
        return self.pack.max_valid_num

    @property
    def segment_max_size(self) -> int:
        return self.pack.segment_max_size

    @property
    def max_length(self) -> int:
        """The longest request a batch takes (a row bounds it where a request lies inside one row)."""
        if self.descriptor.one_row:
            return min(self.segment_max_size, self.seq_len)
        return self.segment_max_size

    @property
    def layout(self) -> BatchLayout:
        return self.descriptor.layout_for(self.batch_size, self.seq_len, self.max_valid_num, self.dynamic_rows)

    def is_optional(self, name: str) -> bool:
        return self.input_roles[name] in OPTIONAL_ROLES


def read_packed_interface(artifact: Artifact) -> PackedInterface:
    """Read `artifact`'s manifest; a manifest no packed runner can serve raises PoprtError."""
    manifest, path = artifact.manifest, artifact.path
    pack = _read_pack_spec(manifest, path)
    roles = {spec["name"]: vocab.spec_role(spec) for spec in manifest["inputs"]}
    by_role = collections.defaultdict(list)
    for name, role in roles.items():
        by_role[role].append(name)
    dynamic = by_role[Role.dynamic_input]
    if len(dynamic) != 1:
        raise PoprtError(f"artifact '{path}' has {len(dynamic)} dynamic inputs; a packed model has exactly one")
    specs = {spec["name"]: spec for spec in manifest["inputs"]}
    rows = vocab.int_of(manifest, MetaKey.rows) or None
    batch_size, seq_len, tokens = _geometry(pack, dynamic[0], specs[dynamic[0]]["shape"], path, rows)
    static = modes.get(pack.mode).static
    dynamic_rows = static and tokens[0] is DYNAMIC
    slots = [pack.max_valid_num if static else DYNAMIC]
    masks = by_role[Role.attention_mask]
    if len(masks) > 1:
        raise PoprtError(f"artifact '{path}' has several attention-mask inputs; a packed model has one")
    token_inputs, mask, unpack_info = {}, None, None
    for name, spec in specs.items():
        role, dtype, dims = roles[name], np.dtype(spec["dtype"]), spec["shape"]
        if role in TOKEN_ROLES:
            if len(dims) < 2 or not _matches(dims[:2], tokens) or not _static(dims[2:]):
                raise PoprtError(
                    f"input '{name}' has shape {dims}; a packed model's per-token inputs are "
                    f"[{_fmt(tokens)}, ...] with static trailing dims"
                )
            if role in ID_ROLES and (len(dims) != 2 or not np.issubdtype(dtype, np.integer)):
                raise PoprtError(f"input '{name}' ({role}) must be an integer [{_fmt(tokens)}] tensor; it is {dtype.name} {dims}")
            token_inputs[name] = TokenInput(name, role, dtype, tuple(dims[2:]))
        elif role is Role.attention_mask:
            if len(dims) != 2 or not _matches(dims, tokens):
                raise PoprtError(f"input '{name}' has shape {dims}; expected [{_fmt(tokens)}]")
            mask = (name, dtype)
        elif role is Role.unpack_info:
            if len(dims) != 1 or not _matches(dims, slots) or not np.issubdtype(dtype, np.integer):
                raise PoprtError(f"input '{name}' has shape {dims}; unpack_info is an integer [{_fmt(slots)}]")
            unpack_info = (name, dtype)
        else:
            raise PoprtError(f"input '{name}' has role '{role}', which a PackRunner cannot fill")
    outputs = _read_outputs(manifest, pack, tokens, slots)
    interface = PackedInterface(
        path=path,
        pack=pack,
        batch_size=batch_size,
        seq_len=seq_len,
        position_offset=vocab.int_of(manifest, MetaKey.position_offset),
        vocab_size=vocab.int_of(manifest, MetaKey.vocab_size) or None,
        dynamic_input=dynamic[0],
        mask=mask,
        unpack_info=unpack_info,
        token_inputs=token_inputs,
        outputs=outputs,
        id_rows={},
        input_roles=roles,
        dynamic_rows=dynamic_rows,
    )
    return _with_table_bounds(interface, specs)


def _read_pack_spec(manifest: dict[str, Any], path: Path) -> PackSpec:
    pack = manifest.get(MetaKey.pack.value)
    if not pack:
        raise PoprtError(
            f"artifact '{path}' is not packed (compiled without {option('pack_args')}); run it with "
            "runtime.Runner(path) and no PackRunnerConfig"
        )
    if not isinstance(pack.get("mode"), str) or pack["mode"] not in modes.names():
        raise PoprtError(f"artifact '{path}' has unknown pack mode '{pack.get('mode')}'; re-export it")
    spec = PackSpec.from_mapping(pack)
    if "max_tokens" in modes.get(spec.mode).needed and not (spec.max_tokens or 0) >= spec.segment_max_size:
        raise PoprtError(
            f"artifact '{path}': a {spec.mode} batch must hold max_tokens >= segment_max_size "
            f"{spec.segment_max_size} tokens, the manifest says {spec.max_tokens}; recompile"
        )
    return spec


def _geometry(pack: PackSpec, name: str, shape: list, path: Path, rows: int | None) -> tuple[int, int, list]:
    """(batch_size, seq_len) bounding a batch, and the `[batch, seq]` dims of its per-token inputs;
    `rows`: the manifest's bound of a dynamic row dim (--dynamic_rows)."""
    descriptor = modes.get(pack.mode)
    if not descriptor.static:
        if len(shape) != 2 or shape[0] != 1 or _static(shape[1:]):
            raise PoprtError(
                f"input '{name}' has shape {shape}; a {pack.mode} artifact takes one [1, tokens] stream "
                f"with a dynamic token dim (compile with {option('pack_args')} mode={pack.mode}, without {option('input_shape')})"
            )
        return 1, int(pack.max_tokens), [1, DYNAMIC]
    dynamic_rows = bool(rows) and len(shape) == 2 and not _static(shape[:1]) and _static(shape[1:])
    if dynamic_rows:
        shape = [rows, shape[1]]  # --dynamic_rows: up to `rows` rows
    elif len(shape) != 2 or not _static(shape):
        raise PoprtError(
            f"input '{name}' has shape {shape}; a packed artifact has a static "
            f"[batch, seq_len] shape (compile with {option('input_shape')})"
        )
    batch_size, seq_len = shape
    if descriptor.layout.across_rows and pack.segment_max_size > batch_size * seq_len:
        raise PoprtError(
            f"artifact '{path}': segment_max_size {pack.segment_max_size} exceeds the batch of "
            f"{batch_size}x{seq_len} tokens; recompile"
        )
    return batch_size, seq_len, [DYNAMIC if dynamic_rows else batch_size, seq_len]


def _read_outputs(manifest: dict[str, Any], pack: PackSpec, tokens: list, slots: list) -> dict[str, Output]:
    rows = [*slots, DYNAMIC if slots == [DYNAMIC] else pack.segment_max_size]
    lead = {Layout.unpacked: rows, Layout.packed: tokens, Layout.stream: tokens, Layout.per_request: slots}
    outputs = {}
    for spec in manifest["outputs"]:
        name, layout, dims = spec["name"], vocab.spec_layout(spec), spec["shape"]
        if layout not in SPLITTABLE_LAYOUTS:
            raise PoprtError(
                f"output '{name}' has layout '{layout}', which a PackRunner cannot split per request; "
                f"recompile with {option('pack_args')}"
            )
        head = lead[layout]
        if len(dims) < len(head) or not _matches(dims[: len(head)], head, strict=False):
            raise PoprtError(f"output '{name}' ({layout}) has shape {dims}; expected [{_fmt(head)}, ...]")
        outputs[name] = Output(name, layout, np.dtype(spec["dtype"]), tuple(dims[len(head) :]))
    return outputs


def _with_table_bounds(interface: PackedInterface, specs: dict[str, dict[str, Any]]) -> PackedInterface:
    """Bound the id inputs by the embedding tables they index, so that a request with an
    out-of-table id is refused on its call instead of failing the batch it would share."""
    rows = {
        name: specs[name]["table_rows"]
        for name, token_input in interface.token_inputs.items()
        if token_input.role in ID_ROLES and specs[name].get("table_rows")
    }
    vocab_size = interface.vocab_size
    if not vocab_size and interface.dynamic_input in rows:
        vocab_size = rows[interface.dynamic_input]
    id_rows = {name: n for name, n in rows.items() if name != interface.dynamic_input}
    for name, token_input in interface.token_inputs.items():
        last = interface.position_offset + interface.max_length - 1
        if token_input.role is Role.position_ids and name in id_rows and last >= id_rows[name]:
            raise PoprtError(
                f"artifact '{interface.path}': requests of up to {interface.max_length} tokens need position "
                f"ids up to {last}, but '{name}' indexes a table of {id_rows[name]} rows; recompile "
                "with a smaller segment_max_size"
            )
    fields = dict(vars(interface), vocab_size=vocab_size, id_rows=id_rows)
    return PackedInterface(**fields)


def _static(dims: list) -> bool:
    return all(isinstance(d, int) and d > 0 for d in dims)


def _matches(dims: list, expected: list, strict: bool = True) -> bool:
    """Do manifest `dims` (ints, or symbol names for dynamic dims) have the `expected` sizes? An
    expected DYNAMIC dim must be dynamic. Not `strict` (outputs, which shape inference may have left
    symbolic): any dim passes where a DYNAMIC or a symbolic one is."""
    if len(dims) != len(expected):
        return False
    for d, e in zip(dims, expected):
        if not isinstance(d, int):
            if e is not DYNAMIC and strict:
                return False
        elif e is DYNAMIC and strict or e is not DYNAMIC and d != e:
            return False
    return True


def _fmt(dims: list) -> str:
    return ", ".join("?" if d is DYNAMIC else str(d) for d in dims)
