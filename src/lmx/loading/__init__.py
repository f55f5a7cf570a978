"""The loading wing, above ``io/``: find a model (a path or the bundled default), convert it, load it.

``io/`` reads file formats; this package turns them into a runnable model and tokenizer. (It is
``loading``, not ``load``: ``lmx.load`` is the engine's entry function.)
"""
