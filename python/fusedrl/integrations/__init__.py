"""Explicit, reversible integrations of fusedrl into trainers and models.

Each submodule imports its framework only when it is imported itself (``import fusedrl`` imports
none of them):

- :mod:`fusedrl.integrations.transformers`: per-token log-probs (and entropy) of any Hugging Face
  causal LM straight from its last hidden state and LM head (:func:`~fusedrl.integrations.
  transformers.token_logprobs`), and :func:`~fusedrl.integrations.transformers.add_fused_head`,
  which gives one model instance a ``fused_lm_head=True`` forward (removable with the handle it
  returns; nothing global is patched).
- :mod:`fusedrl.integrations.trl`: ``GRPOTrainer`` and ``DPOTrainer``, subclasses of TRL's, so that
  ``from fusedrl.integrations.trl import GRPOTrainer`` (or ``DPOTrainer``) is the whole change for
  a TRL user.
- :mod:`fusedrl.integrations.verl`: ``register()`` adds ``fusedrl_*`` policy losses to verl's
  own registry (``unregister()`` removes them).
- :mod:`fusedrl.integrations.toy`: the toy tokenizer, model and task of the demo and the tests.
"""
