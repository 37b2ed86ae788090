"""Structural graph matching for the passes: attention blocks, and which ops act per token. Matching only: no pass metadata, no rewriting policy."""
