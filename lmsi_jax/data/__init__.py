"""Data: vocabularies, JSONL I/O, SeqIO tasks/mixtures and the packed input pipeline.

Submodules are imported explicitly (`from lmsi_jax.data import tasks`); this
package does not import SeqIO/TensorFlow eagerly:

- `jsonl`: validated `read_jsonl`, crash-safe `write_jsonl_atomic` (no TF).
- `vocab`: `byte_vocabulary`, `HFTokenizersVocabulary`, `prompt_prefix`, `encode_prompt`.
- `tasks`: per-round `seqio.Task` / `seqio.Mixture` factories over JSONL.
- `features`: packed decoder-only batches, `BatchIterator`, `GlobalBatches`.
"""
