"""Datasets, LightningDataModules and transforms."""
