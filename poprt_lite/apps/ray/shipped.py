"""An artifact as it travels through Ray's object store: its members in memory, the weights member
(an artifact over protobuf's 2 GB limit) as bytes, since the mapping of the file does not pickle."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from poprt_lite.ir.artifact import Artifact


@dataclass(frozen=True)
class ShippedArtifact:
    artifact: Artifact  # without its weights member
    weights: bytes | None

    @classmethod
    def of(cls, artifact: Artifact) -> "ShippedArtifact":
        weights = None if artifact.weights is None else bytes(artifact.weights)
        return cls(dataclasses.replace(artifact, weights=None), weights)

    def open(self) -> Artifact:
        """The artifact as it was on the driver."""
        if self.weights is None:
            return self.artifact
        return dataclasses.replace(self.artifact, weights=memoryview(self.weights))
