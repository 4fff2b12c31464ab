"""The library version (one literal, read statically by setup.cfg and recorded in every manifest)."""

__version__ = "0.1.0.dev0"
