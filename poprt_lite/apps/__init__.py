"""Applications on top of the runtime: embed (sentence embeddings); the HTTP server and the Ray job join here."""
