"""Our custom ops' source in torch.compile's cache keys.

The compile caches (inductor's FX graph cache, the AOTAutograd cache) key a graph by its traced code, not by the
fake implementations and autograd formulas of the custom ops it calls: after an int8flow upgrade that changes
them (an op's outputs, say), a warm cache hands back the old compiled backward, which then fails an inductor
size assertion or, worse, computes with stale shapes. Seen in session 7 when `norm_linear_bwd` started returning
one stacked weight gradient. Importing `int8flow.ops` therefore appends ``int8flow-ops-<hash of this package's
sources>`` to ``torch.compiler.config.cache_key_tag`` (which torch includes in every compile cache key): a changed
op misses the cache once; an unchanged install keeps hitting it.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

import torch

PREFIX = "int8flow-ops-"


def source_tag(sources: Iterable[bytes]) -> str:
    """``int8flow-ops-<16 hex>``: a SHA-256 over the given file contents, in order."""
    h = hashlib.sha256()
    for blob in sources:
        h.update(len(blob).to_bytes(8, "little"))
        h.update(blob)
    return PREFIX + h.hexdigest()[:16]


def tag_compile_caches() -> str:
    """Add this package's tag to ``torch.compiler.config.cache_key_tag`` (once; a user's own tag is kept,
    an older int8flow tag replaced). Returns the tag."""
    tag = source_tag(p.read_bytes() for p in sorted(Path(__file__).parent.glob("*.py")))
    parts = [t for t in torch.compiler.config.cache_key_tag.split(",") if t and not t.startswith(PREFIX)]
    torch.compiler.config.cache_key_tag = ",".join(parts + [tag])
    return tag
