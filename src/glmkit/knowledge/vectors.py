"""Dense search from an in-memory copy of a knowledge base's vectors.

sqlite-vec's KNN reads every vector of a knowledge base from the file for each query (22-57 ms at
10,000 passages under load); a copy in memory, as unit rows, answers the same exact cosine search
with one matrix-vector product (about 1 ms).  The copy is current while the knowledge base's
`generation` (knowledge/schema.py, migration 3; bumped by every change, in the same transaction)
is the one it was read at, whichever process made the change.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from .schema import vector_table

# the vectors of recently searched knowledge bases, kept in memory, at most this many bytes in all;
# a knowledge base larger than that is searched by sqlite-vec from the file
MATRIX_CACHE_BYTES = 512 * 2**20


class VectorCache:
    """Recently searched knowledge bases' (chunk ids, unit rows), least recently used out first."""

    def __init__(self, limit: int = MATRIX_CACHE_BYTES):
        self.limit = limit
        self._matrices: OrderedDict[int, tuple[int, object, object]] = OrderedDict()  # kb id: (generation, ids, unit rows)
        self._lock = threading.Lock()

    def matrix(self, db, kb_id: int):
        """(chunk ids, their vectors as unit rows) of knowledge base `kb_id`, read through `db`
        when the copy is missing or stale; None when it would not fit in the limit."""
        row = db.execute("SELECT generation, dim FROM kbs WHERE id = ?", (kb_id,)).fetchone()
        if row is None:
            return None
        generation = row["generation"]
        with self._lock:
            hit = self._matrices.get(kb_id)
            if hit is not None and hit[0] == generation:
                self._matrices.move_to_end(kb_id)
                return hit[1], hit[2]
        # read before the vectors: a write in between leaves an older generation on newer rows,
        # which the next query reloads; never the other way round
        import numpy as np
        n = db.execute(f"SELECT COUNT(*) FROM {vector_table(kb_id)}").fetchone()[0]
        if n * row["dim"] * 4 > self.limit:
            return None
        rows = db.execute(f"SELECT rowid, embedding FROM {vector_table(kb_id)}").fetchall()
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        unit = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), row["dim"]).copy()
        norms = np.linalg.norm(unit, axis=1, keepdims=True)
        unit /= np.where(norms == 0.0, 1.0, norms)
        with self._lock:
            self._matrices[kb_id] = (generation, ids, unit)
            self._matrices.move_to_end(kb_id)
            while sum(u.nbytes for _, _, u in self._matrices.values()) > self.limit:
                self._matrices.popitem(last=False)
        return ids, unit


    def forget(self, kb_id: int) -> None:
        """Drop a deleted knowledge base's copy now (its generation row is gone with it)."""
        with self._lock:
            self._matrices.pop(kb_id, None)


def nearest(ids, unit, vector: bytes, k: int) -> list[tuple[int, float]]:
    """(chunk id, cosine similarity) of the `k` rows of `unit` nearest `vector` (float32 bytes), best first."""
    import numpy as np
    q = np.frombuffer(vector, dtype=np.float32)
    norm = float(np.linalg.norm(q))
    if not len(ids) or norm == 0.0 or k <= 0:
        return []
    # einsum: numpy's own loop on this thread.  `unit @ q` goes to OpenBLAS, whose threads then
    # spin on both cores after the product and starve the SQLite queries around it (on 2
    # cores under load: the matrix-vector product 12 ms instead of 0.7, the query twice as slow)
    sims = np.einsum("ij,j->i", unit, q / norm)
    top = np.argpartition(-sims, k - 1)[:k] if k < len(ids) else np.arange(len(ids))
    top = top[np.argsort(-sims[top], kind="stable")]
    return [(int(ids[i]), float(sims[i])) for i in top]
