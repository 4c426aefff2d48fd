"""Glue to the Hugging Face libraries. Only this layer touches transformers internals."""
