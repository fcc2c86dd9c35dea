"""Data: sources, -BG construction, WebDataset shards, the streaming loader."""
