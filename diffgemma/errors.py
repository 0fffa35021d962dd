"""The one exception type diffgemma raises for bad input (files, keys, values, options)."""


class DiffGemmaError(ValueError):
    """Bad input: the message names the file, the key and what was expected."""
