"""Nemotron-H checkpoints on disk, one module per job: `read` (the lazy `Checkpoint` reader, safetensors headers,
weight and expert names), `resolve` (a MODEL argument to a folder or a layout), `write` (atomic folders, shards,
config and tokenizer), `build` (native modules on the meta device, filled from a checkpoint) and `dtypes` (every
number format in one table). Import from the module that does the job: importing one loads none of the others."""
