"""Passes over an onnx-graphsurgeon graph, their registry and the pass manager.

Importing this package registers the built-in passes.
"""

from poprt_lite.passes.base import Pass, PassContext, PassResult
from poprt_lite.passes.manager import PassManager, PassRecord
from poprt_lite.passes.registry import get_pass, get_registered_passes, list_passes, load_plugin, register, register_pass

# Built-in passes register themselves on import.
from poprt_lite.passes import (  # noqa: E402,F401  isort: skip
    add_checkpoints,
    attention_mask_packing,
    cleanup,
    export_position_ids,
    float_to_half,
    fuse_packed_attention,
    pack_unpack_repack,
    quantize_int8,
    remove_outputs,
    static_shape,
    token_stream_loop_packing,
    token_stream_packing,
    unfuse_ort,
)

__all__ = [
    "Pass",
    "PassContext",
    "PassManager",
    "PassRecord",
    "PassResult",
    "get_pass",
    "get_registered_passes",
    "list_passes",
    "load_plugin",
    "register",
    "register_pass",
]
