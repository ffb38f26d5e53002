"""Tokenizers and token-indexed tensors in a merge: the output vocabulary (`tokenizer_source`,
build.py), the `tokenizer:` block's per-token rows and padding (tokens.py), embedding rows
aligned to it (align.py), which tensors are token-indexed and tied (names.py), and chat
templates (chat_templates.py).

The package imports nothing itself: config.py needs only the light parsing helpers, and
align.py depends on the method classes, which import the planner's modules in turn.
"""
