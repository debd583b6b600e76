"""Drop-in adapters for libraries hotops users already work in.

Each adapter is a submodule that imports its library when *it* is imported; importing
``hotops`` or ``hotops.integrations`` imports none of them, and hotops never requires them:

* ``hotops.integrations.sentence_transformers`` -- ``MultipleNegativesRankingLoss`` and
  ``CachedMultipleNegativesRankingLoss`` computed by ``hotops.info_nce``.
* ``hotops.integrations.transformers`` -- registers ``attn_implementation="hotops_ssa"``
  (subsampled attention in training, full attention in eval).
* ``hotops.integrations.unpadded`` -- a BERT-style encoder (transformers' ``BertModel``, MiniLM)
  run on its real tokens only: the same states, about half the work on padded batches of short
  texts; ``enable(bert)`` makes the model's own call (and sentence-transformers') run so. Needs
  torch only (it calls the model's own modules).
"""
