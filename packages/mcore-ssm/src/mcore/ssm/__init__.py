"""Mamba-2 (``M``) and gated-delta-net (``G``) layers for mcore's hybrid layer patterns."""
