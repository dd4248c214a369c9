"""Integrations of moefast with other libraries.

Each integration is a submodule that imports its library only when it is itself imported, so
``import moefast`` never pulls in an optional dependency:

- :mod:`moefast.integrations.transformers`: Hugging Face transformers. ``register()`` adds the
  ``"moefast"`` experts implementation (``experts_implementation="moefast"``), and
  ``moe_from_hf(block)`` converts a sparse-MoE block into a :class:`moefast.nn.MoE`.
"""
