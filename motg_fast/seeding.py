"""Seeds derived from a run's seed and a position in the run: resumable, layout-free draws."""

from __future__ import annotations

import hashlib


def derived_seed(*parts: object) -> int:
    """A 63-bit seed that depends only on `parts` (e.g. `(seed, step, rank, "rollout")`).

    The parts are joined with "/" and hashed (SHA-256), so a draw at a given place of a run
    is the same however the run was interrupted, resumed or split across processes.
    """
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
