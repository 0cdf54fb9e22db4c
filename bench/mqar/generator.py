"""Multi-query associative recall (MQAR) in the Zoology style, with fixed seeds.

A sequence of L tokens:

    k0 v0 k1 v1 ... k(P-1) v(P-1)   ka f kb f f f kc f f f f f f f f f ... kd f f f ...
    |------ 2P tokens: pairs ----|  |-- the rest: filler and Q queries, most of them early --|

- P key-value pairs first: P distinct keys drawn from the key vocabulary, each followed by a value
  drawn (with repetition) from the value vocabulary. The mapping is new in every sequence, so it can
  only be recalled from the context, never memorised.
- Q queries: Q of the P keys (distinct; by default Q = P, every key is asked once), in random
  order, at Q distinct places of the rest. As in Zoology's MQAR, place g = 0, 1, ... after the
  pairs is drawn with probability proportional to (g + 1)^(POWER - 1), POWER = 0.01 (about
  1/(g + 1)), without replacement: about half the queries come soon after the pairs, within a
  short sliding window's reach of their value, the others anywhere up to the end of the sequence,
  out of it. The target at a query's position is the value that followed that key in the pairs
  (the model reads the key and predicts the value, next-token style); the value is not written
  after the query, so later queries cannot copy it.
- Every other position is a filler token from a vocabulary of its own, uniformly at random.

Vocabulary (token ids): [0, n_filler) filler, then n_keys keys, then n_values values.

Splits: a sequence belongs to the test split when a hash of its set of (key, value) pairs is 0
modulo `TEST_SHARE`, and to train otherwise; each split's generator rejects the other's sequences.
So no test sequence's key-value assignment ever occurs in training (disjoint by construction,
whatever the seeds), and the split of a sequence does not depend on where its pairs or queries sit.

Seeds: the batch of training step s is drawn from numpy's PCG64 seeded by (seed, 0, L, s) and test
batch i from (seed, 1, L, i), so every run of the sweep sees the same data for the same step,
whatever the attention, and a resumed run continues with exactly the batches it would have seen.

Needs numpy only.
"""
from dataclasses import dataclass

import numpy as np

IGNORE = -100  # target of a position that is not scored (torch's cross_entropy ignore_index)
TEST_SHARE = 8  # about 1 in 8 key-value assignments belongs to the test split
POWER = 0.01    # query places: P(g) ~ (g + 1)^(POWER - 1), Zoology's power_a

# Roles, as tools/make_model_bundle.py and the inspector's roles.txt name them.
FILLER, KEY, VALUE, QUERY = 0, 1, 2, 3
ROLE_NAMES = ("filler", "key", "value", "query")

_SPLIT_ID = {"train": 0, "test": 1}


@dataclass(frozen=True)
class TaskConfig:
    seq_len: int = 512     # L
    n_pairs: int = 8       # P key-value pairs at the start (2P tokens)
    n_queries: int = 8     # Q <= P queries in the rest (Q = P: every key is asked once)
    n_keys: int = 64       # key vocabulary (P <= n_keys)
    n_values: int = 64     # value vocabulary
    n_filler: int = 32     # filler vocabulary

    @property
    def vocab_size(self):
        return self.n_filler + self.n_keys + self.n_values

    @property
    def first_key(self):
        return self.n_filler

    @property
    def first_value(self):
        return self.n_filler + self.n_keys

    def check(self):
        if not 1 <= self.n_queries <= self.n_pairs <= self.n_keys:
            raise ValueError(f"need 1 <= n_queries <= n_pairs <= n_keys, got {self}")
        if min(self.n_values, self.n_filler) < 1:
            raise ValueError(f"need n_values and n_filler >= 1, got {self}")
        if self.seq_len - 2 * self.n_pairs < self.n_queries:
            raise ValueError(f"seq_len {self.seq_len} leaves no room for {self.n_queries} queries "
                             f"after {self.n_pairs} pairs")
        return self


@dataclass
class Batch:
    tokens: np.ndarray     # (B, L) int64 token ids
    targets: np.ndarray    # (B, L) int64: the value at query positions, IGNORE elsewhere
    roles: np.ndarray      # (B, L) int8: FILLER, KEY, VALUE or QUERY
    distance: np.ndarray   # (B, L) int64: at query positions, query position - its value's position; 0 elsewhere


def _pair_table(cfg):
    """(n_keys, n_values) random 62-bit integers, fixed: the split hash of a pair set is the sum
    of its pairs' entries (order-free, so the split depends on the assignment only)."""
    rng = np.random.default_rng(20250802)
    return rng.integers(0, 2 ** 62, size=(cfg.n_keys, cfg.n_values), dtype=np.int64)


def split_of(keys, values, cfg):
    """keys, values (B, P) indices into their vocabularies -> (B,) bool, True for the test split."""
    h = _pair_table(cfg)[keys, values].astype(np.uint64).sum(axis=1, dtype=np.uint64)
    return h % np.uint64(TEST_SHARE) == 0


def _complete(rng, cfg, keys, values):
    """The rest of n sequences whose pairs are drawn: which pairs are queried, where, and the filler."""
    n, P = keys.shape
    Q, L = cfg.n_queries, cfg.seq_len
    asked = rng.random((n, P)).argsort(axis=1)[:, :Q]                # (n, Q) which pairs, in order
    # Q distinct places g of the rest, drawn one after the other with probability ~ (g+1)^(POWER-1)
    # among the places not yet taken (numpy's choice(replace=False, p=...), as Zoology draws
    # them): a draw that hits a taken place is drawn again.
    rest = L - 2 * P
    cdf = np.cumsum(np.arange(1, rest + 1) ** (POWER - 1.0))
    cdf /= cdf[-1]
    g = np.empty((n, Q), dtype=np.int64)
    for q in range(Q):
        todo = np.arange(n)
        while todo.size:
            pick = np.minimum(np.searchsorted(cdf, rng.random(todo.size), side="right"), rest - 1)
            taken = (g[todo, :q] == pick[:, None]).any(axis=1)
            g[todo[~taken], q] = pick[~taken]
            todo = todo[taken]
    g.sort(axis=1)                                                      # (n, Q) ascending
    where = 2 * P + g                                                   # (n, Q) query positions
    filler = rng.integers(0, cfg.n_filler, size=(n, L), dtype=np.int32)  # (n, L)
    return keys, values, asked, where, filler


def _assemble(cfg, keys, values, asked, where, filler):
    n, P = keys.shape
    rows = np.arange(n)[:, None]
    tokens = filler.astype(np.int64)
    roles = np.full(tokens.shape, FILLER, dtype=np.int8)
    targets = np.full(tokens.shape, IGNORE, dtype=np.int64)
    distance = np.zeros(tokens.shape, dtype=np.int64)
    tokens[:, 0:2 * P:2] = cfg.first_key + keys
    tokens[:, 1:2 * P:2] = cfg.first_value + values
    roles[:, 0:2 * P:2] = KEY
    roles[:, 1:2 * P:2] = VALUE
    tokens[rows, where] = cfg.first_key + keys[rows, asked]
    roles[rows, where] = QUERY
    targets[rows, where] = cfg.first_value + values[rows, asked]
    distance[rows, where] = where - (2 * asked + 1)
    return Batch(tokens, targets, roles, distance)


def batch(cfg, split, seed, index, size):
    """Batch `index` (the training step, or the test batch number) of `size` sequences of split
    'train' or 'test'; the same arguments always give the same batch, and a smaller size gives
    its first rows."""
    cfg.check()
    rng = np.random.default_rng([seed, _SPLIT_ID[split], cfg.seq_len, index])
    want_test = split == "test"
    # Rejection: draw the pairs of a round of candidates, keep those of this split (about 7/8 or
    # 1/8 of them) and complete only those. Rounds of a fixed size, so row r of a batch is the
    # same sequence whatever the batch size.
    per_round = 80 * (TEST_SHARE if want_test else 1)
    parts, have = [], 0
    while have < size:
        keys = rng.random((per_round, cfg.n_keys)).argsort(axis=1)[:, :cfg.n_pairs]  # distinct keys
        values = rng.integers(0, cfg.n_values, size=(per_round, cfg.n_pairs))
        keep = split_of(keys, values, cfg) == want_test
        parts.append(_complete(rng, cfg, keys[keep], values[keep]))
        have += int(keep.sum())
    keys, values, asked, where, filler = (np.concatenate(p)[:size] for p in zip(*parts))
    return _assemble(cfg, keys, values, asked, where, filler)


def describe(cfg, b, row):
    """Token strings and role names of one sequence of a batch (for tokens.txt / roles.txt):
    keys k0..k63, values v0..v63, filler f0..f31; a query reads as its key."""
    names = []
    for t in b.tokens[row]:
        t = int(t)
        if t < cfg.first_key:
            names.append(f"f{t}")
        elif t < cfg.first_value:
            names.append(f"k{t - cfg.first_key}")
        else:
            names.append(f"v{t - cfg.first_value}")
    return names, [ROLE_NAMES[r] for r in b.roles[row]]
