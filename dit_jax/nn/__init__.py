"""Blocks shared by every model: attention, embeddings, modulation, MLP, block stacks."""
