"""The one exception type a user can cause (bad path, bad video, bad config, wrong checkpoint).

The CLI catches it and prints its message without a traceback; the message says what to do.
"""

from __future__ import annotations


class VidretError(Exception):
    """An error caused by the user's input, with a message that says how to fix it."""
