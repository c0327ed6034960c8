"""Classic non-neural baselines as pure computations on scipy CSR user x item matrices."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def popularity_scores(train_csr) -> np.ndarray:
    """Number of train interactions of every item, shape (J,)."""
    return np.asarray((train_csr != 0).sum(axis=0), dtype=np.float64).ravel()


class EASE:
    """EASE (Steck, WWW 2019): item-item weights B in closed form with a zero diagonal.

    G = X^T X + lam * I;  P = G^-1;  B = -P / diag(P) (column j divided by P_jj);  diag(B) = 0.
    """

    def __init__(self, lam: float = 100.0):
        self.lam = float(lam)
        self.B: np.ndarray | None = None

    def fit(self, train_csr) -> "EASE":
        X = sp.csr_matrix(train_csr, dtype=np.float64)
        G = (X.T @ X).toarray()
        G[np.diag_indices_from(G)] += self.lam
        P = np.linalg.inv(G)
        B = P / (-np.diag(P))
        B[np.diag_indices_from(B)] = 0.0
        self.B = B
        return self

    def score(self, user_rows_csr) -> np.ndarray:
        """Scores (n_users, J) for the given rows of the user x item history matrix."""
        if self.B is None:
            raise RuntimeError("call fit() first")
        X = sp.csr_matrix(user_rows_csr, dtype=np.float64)
        return np.asarray(X @ self.B)
