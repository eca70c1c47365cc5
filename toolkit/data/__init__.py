"""Data: sources (files, hub ids, assets), splits, samplers, packing, and one data module per kind of data."""
