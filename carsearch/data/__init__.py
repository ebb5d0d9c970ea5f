"""The bottom layer: reading sources, decoding images, planning crops, writing files atomically.

``sources`` (folders, CSVs, Stanford Cars layouts → ``SourceItem``), ``images`` (safe decoding),
``decode`` (parallel decoding for batch jobs), ``selection`` (pure box policy: which detection, which
region), ``cropping`` (``plan_image`` / ``apply_plan``), ``atomic`` (temp file, fsync, rename) and ``digest``
(the digest of cache names and keys).
The detector, the embedder and its training, the index, the pipeline and the experiments build on it;
it imports none of them (``tests/unit/test_layering.py``).
"""
