"""PopRT's pass names for the poprt-lite passes that do the same job.

`--passes`, `--skip_passes`, `--pipeline`, `get_pass` and PopRT-style code accept either name
(importing this module adds them to the pass registry as aliases); `--list_all_passes` shows both.
A PopRT pass missing here has no counterpart: it either serves the IPU only or does something
poprt-lite does not do.
"""

from __future__ import annotations

from poprt_lite.passes import registry

# PopRT 1.5 name -> poprt-lite pass name (PopRT's user guide, "Built-in passes").
POPRT_NAMES: dict[str, str] = {
    "insert_attention_mask": "attention_mask_packing",  # AttentionMask packing (PopRT: no --pack_args needed)
    "packed_transformer": "pack_unpack_repack",  # unpack/repack packing (PopRT's --pack_args)
    "constant_folding": "fold_constants",
    "eliminate_deadend": "eliminate_dead_code",
    "eliminate_unused_initializer": "eliminate_dead_code",  # dead-code elimination drops unused initializers too
    "const_input_shape": "static_shape",
    "eliminate_identity": "eliminate_identity",
    "float_to_half": "float_to_half",
    "remove_outputs": "remove_outputs",
    "add_checkpoints": "add_checkpoints",
}


def poprt_names_of(name: str) -> list[str]:
    """The PopRT names of poprt-lite pass `name` (empty when PopRT has none)."""
    return [poprt for poprt, ours in POPRT_NAMES.items() if ours == name]


for _poprt, _ours in POPRT_NAMES.items():
    registry.add_alias(_poprt, _ours)
