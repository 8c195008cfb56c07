"""LightningDataModules: reading, curriculum phases, sampling, tokenisation and collation."""
