"""Input pipeline: tokenizers.py (SentencePiece / HF tokenizers, SP training), sources.py (grain random-access
sources for text files, JSONL, tfds, ArrayRecord; held-out split), packing.py (checkpointable packer),
pipeline.py (DataConfig, make_train_iterator, make_eval_batches), arrayrecord.py (writing ArrayRecord files).

Kept import-free so `import mosaicjax.data` stays cheap; import the submodules you need.
"""
