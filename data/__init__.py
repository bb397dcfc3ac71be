"""Datasets, LightningDataModules and transforms."""
from .resolvers import register as _register_resolvers

_register_resolvers()
