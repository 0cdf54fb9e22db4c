"""Tests of the MQAR benchmark (CPU only, tiny sizes): the generator's properties, the three
attentions (swa is exactly DMA with a = 0), a --quick sweep and its resume, and the exporter's
model bundle (files, shapes, dtypes, and that its stored selection and outputs are what the
inputs give), also on the shipped assets/mqar.

    PYTHONPATH=<dma_torch build> python3 -m pytest bench/mqar/test_mqar.py -q
"""
import importlib.util
import json
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import generator as gen  # noqa: E402
import train  # noqa: E402
from models import MQARModel  # noqa: E402

ASSET = os.path.join(os.path.dirname(os.path.dirname(HERE)), "assets", "mqar")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
CFG = gen.TaskConfig(seq_len=96, n_pairs=6, n_queries=4, n_keys=16, n_values=10, n_filler=8)


# ---- the generator ------------------------------------------------------------------------------

def test_sequences_have_the_mqar_layout():
    b = gen.batch(CFG, "train", 3, 0, 50)
    P, Q, L = CFG.n_pairs, CFG.n_queries, CFG.seq_len
    assert b.tokens.shape == b.targets.shape == b.roles.shape == (50, L)
    for t, y, r, d in zip(b.tokens, b.targets, b.roles, b.distance):
        keys, values = t[0:2 * P:2], t[1:2 * P:2]
        assert len(set(keys)) == P                                          # keys distinct
        assert all(CFG.first_key <= k < CFG.first_value for k in keys)
        assert all(CFG.first_value <= v < CFG.vocab_size for v in values)
        assert list(r[:2 * P]) == [gen.KEY, gen.VALUE] * P
        where = np.flatnonzero(r == gen.QUERY)
        assert len(where) == Q and where.min() >= 2 * P                     # after the pairs
        assert np.array_equal(np.flatnonzero(y != gen.IGNORE), where)
        asked = [int(np.flatnonzero(keys == t[p])[0]) for p in where]      # each query is a key
        assert len(set(asked)) == Q                                         # of distinct pairs
        for p, i in zip(where, asked):
            assert y[p] == values[i]                                        # its target: the value
            assert d[p] == p - (2 * i + 1)                                  # its distance to it
        filler = r == gen.FILLER
        assert np.all(t[filler] < CFG.n_filler)                             # filler: its own vocabulary
        assert filler.sum() == L - 2 * P - Q


def test_query_places_are_drawn_as_zoology_draws_them():
    """Place g after the pairs with probability ~ (g + 1)^(POWER - 1), without replacement: the
    same distribution as numpy's choice(replace=False, p=...), so over half the queries are early."""
    t = gen.TaskConfig(seq_len=256, n_pairs=8, n_queries=8)
    rest = t.seq_len - 2 * t.n_pairs
    g = np.concatenate([np.flatnonzero(r == gen.QUERY) - 2 * t.n_pairs
                        for i in range(40) for r in gen.batch(t, "train", 0, i, 64).roles])
    p = np.arange(1, rest + 1) ** (gen.POWER - 1.0)
    rng = np.random.default_rng(0)
    ref = np.concatenate([rng.choice(rest, t.n_queries, replace=False, p=p / p.sum())
                          for _ in range(2560)])
    for share in (lambda x: np.mean(x == 0), lambda x: np.mean(x < 32), lambda x: np.mean(x >= 128)):
        assert abs(share(g) - share(ref)) < 0.015
    assert 0.5 < np.mean(g < 32) < 0.7


def test_seeds_reproduce_and_a_smaller_batch_is_a_prefix():
    a = gen.batch(CFG, "train", 5, 7, 20)
    b = gen.batch(CFG, "train", 5, 7, 20)
    c = gen.batch(CFG, "train", 5, 8, 20)
    d = gen.batch(CFG, "train", 6, 7, 20)
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.targets, b.targets)
    assert not np.array_equal(a.tokens, c.tokens) and not np.array_equal(a.tokens, d.tokens)
    assert np.array_equal(gen.batch(CFG, "test", 5, 2, 3).tokens, gen.batch(CFG, "test", 5, 2, 9).tokens[:3])


def pair_sets(b):
    P = CFG.n_pairs
    return [frozenset(zip(t[0:2 * P:2].tolist(), t[1:2 * P:2].tolist())) for t in b.tokens]


def test_train_and_test_are_disjoint():
    train_b = [gen.batch(CFG, "train", 0, i, 64) for i in range(8)]
    test_b = [gen.batch(CFG, "test", 0, i, 64) for i in range(4)]
    P = CFG.n_pairs

    def split(b):
        keys = b.tokens[:, 0:2 * P:2] - CFG.first_key
        values = b.tokens[:, 1:2 * P:2] - CFG.first_value
        return gen.split_of(keys, values, CFG)

    assert not any(split(b).any() for b in train_b)
    assert all(split(b).all() for b in test_b)
    # The split is a function of the set of pairs: their order does not change it.
    b = test_b[0]
    keys, values = b.tokens[:, 0:2 * P:2] - CFG.first_key, b.tokens[:, 1:2 * P:2] - CFG.first_value
    perm = np.random.default_rng(1).permutation(P)
    assert gen.split_of(keys[:, perm], values[:, perm], CFG).all()
    seen = set().union(*(pair_sets(b) for b in train_b))
    assert not seen & set().union(*(pair_sets(b) for b in test_b))
    # Neither split is degenerate: about 1 in TEST_SHARE assignments is a test one.
    rng = np.random.default_rng(2)
    k = rng.random((4000, CFG.n_keys)).argsort(axis=1)[:, :P]
    share = gen.split_of(k, rng.integers(0, CFG.n_values, (4000, P)), CFG).mean()
    assert abs(share - 1 / gen.TEST_SHARE) < 0.03


def test_describe_names_tokens_and_roles():
    b = gen.batch(CFG, "test", 0, 0, 1)
    names, roles = gen.describe(CFG, b, 0)
    assert len(names) == len(roles) == CFG.seq_len
    assert names[0].startswith("k") and names[1].startswith("v") and roles[:2] == ["key", "value"]
    assert {r for r in roles} == {"key", "value", "query", "filler"}


def test_bad_task_configs_are_refused():
    for bad in (dict(n_queries=7), dict(n_pairs=20), dict(seq_len=14)):
        with pytest.raises(ValueError):
            gen.TaskConfig(**{**CFG.__dict__, **bad}).check()


# ---- the attentions -----------------------------------------------------------------------------

def test_dma_with_a_zero_is_the_sliding_window_and_a_wide_window_is_dense():
    pytest.importorskip("dma_torch")
    torch.manual_seed(0)
    V, L, w = CFG.vocab_size, 40, 7
    dma = MQARModel(V, "dma", d_model=32, n_layers=2, n_heads=2, window=w).double()
    swa = MQARModel(V, "swa", d_model=32, n_layers=2, n_heads=2, window=w).double()
    missing, unexpected = swa.load_state_dict(dma.state_dict(), strict=False)
    assert not missing and all(k.endswith(("w_dt.weight", ".a")) for k in unexpected)
    x = torch.randint(0, V, (2, L))
    assert (dma(x) - swa(x)).abs().max() > 1e-3                    # a > 0: not a sliding window
    with torch.no_grad():
        for blk in dma.blocks:
            blk.attn.a.zero_()                                      # delta = 0 everywhere
    torch.testing.assert_close(dma(x), swa(x), rtol=1e-10, atol=1e-10)
    dense = MQARModel(V, "dense", d_model=32, n_layers=2, n_heads=2, window=w).double()
    wide = MQARModel(V, "swa", d_model=32, n_layers=2, n_heads=2, window=L).double()
    wide.load_state_dict(dense.state_dict())
    torch.testing.assert_close(dense(x), wide(x), rtol=1e-10, atol=1e-10)


# ---- the sweep: a quick run, its results, resume ------------------------------------------------

QUICK = ["--quick", "--device", "cpu", "--lengths", "32", "--steps", "4", "--log-every", "2"]


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    pytest.importorskip("dma_torch")
    results = str(tmp_path_factory.mktemp("mqar_quick"))
    assert train.main(QUICK + ["--results", results]) == 0
    return results


def test_quick_sweep_writes_results(quick_results):
    runs = sorted(os.listdir(os.path.join(quick_results, "runs")))
    assert runs == ["L0032_dense.json", "L0032_dma.json", "L0032_swa.json"]
    for name in runs:
        with open(os.path.join(quick_results, "runs", name)) as f:
            rec = json.load(f)
        assert rec["status"] == "done" and rec["steps_done"] == 4
        assert rec["ms_per_step"] > 0 and len(rec["curve"]) == 2
        for key in ("test", "test_2x"):
            assert 0 <= rec[key]["all"] <= 1 and rec[key]["queries"] > 0
        for key in ("date", "device_name", "torch", "commit"):
            assert rec["env"][key]
        assert os.path.exists(os.path.join(quick_results, "models", name[:-5] + ".pt"))
    with open(os.path.join(quick_results, "summary.md")) as f:
        summary = f.read()
    assert summary.count("| 32 | 16 |") == 3 and "ms / step" in summary
    # the plot needs matplotlib; without it the report writes the table and says so
    if importlib.util.find_spec("matplotlib") is not None:
        assert os.path.getsize(os.path.join(quick_results, "accuracy.png")) > 1000
    else:
        assert not os.path.exists(os.path.join(quick_results, "accuracy.png"))


def test_a_rerun_skips_finished_runs(quick_results, capsys):
    path = os.path.join(quick_results, "runs", "L0032_dma.json")
    before = os.path.getmtime(path)
    assert train.main(QUICK + ["--results", quick_results]) == 0
    out = capsys.readouterr().out
    assert out.count("done earlier, skipped") == 3 and "training" not in out
    assert os.path.getmtime(path) == before


def test_a_run_cut_by_the_budget_resumes_where_it_stopped(tmp_path, capsys):
    pytest.importorskip("dma_torch")
    args = QUICK + ["--attentions", "dma", "--steps", "6"]
    whole = str(tmp_path / "whole")
    cut = str(tmp_path / "cut")
    assert train.main(args + ["--results", whole]) == 0
    # --stop-after-steps stands in for a budget that runs out after 3 steps of this command.
    assert train.main(args + ["--results", cut, "--stop-after-steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "stopped at step 3" in out and "Run the same command again to resume" in out
    with open(os.path.join(cut, "runs", "L0032_dma.json")) as f:
        assert json.load(f)["status"] == "partial"
    assert os.path.exists(os.path.join(cut, "checkpoints", "L0032_dma.pt"))
    assert train.main(args + ["--results", cut]) == 0
    assert "resuming at step 3 of 6" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(cut, "checkpoints", "L0032_dma.pt"))
    # The resumed run is the uninterrupted one: same batches, same optimizer state.
    a = torch.load(os.path.join(whole, "models", "L0032_dma.pt"))["model"]
    b = torch.load(os.path.join(cut, "models", "L0032_dma.pt"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_non_finite_step_is_replayed_skipped_and_recorded(tmp_path, monkeypatch, capsys):
    """A batch that makes the loss non-finite (here: the model's output turns to NaN on the batch
    of step index 3) is found by the replay from the last log point and skipped; the run goes on."""
    cfg_args = QUICK + ["--attentions", "dense", "--steps", "6"]
    a = train.parse_args(cfg_args)
    cfg = train.run_config(a, 32, "dense", 6)
    bad = torch.from_numpy(gen.batch(train.task(cfg), "train", cfg["seed"], 3, cfg["batch"]).tokens)
    build = train.build_model

    def poisoned(cfg, device):
        model = build(cfg, device)
        model.register_forward_hook(
            lambda m, inp, out: out * float("nan") if torch.equal(inp[0], bad) else out)
        return model

    monkeypatch.setattr(train, "build_model", poisoned)
    results = str(tmp_path / "nan")
    assert train.main(cfg_args + ["--results", results]) == 0
    assert "replaying them one at a time" in capsys.readouterr().out
    with open(os.path.join(results, "runs", "L0032_dense.json")) as f:
        rec = json.load(f)
    assert rec["status"] == "done" and rec["steps_done"] == 6
    assert rec["skipped_steps"] == [[4, "non-finite loss"]]
    assert all(np.isfinite(loss) for _, loss in rec["curve"])
    with open(os.path.join(results, "summary.md")) as f:
        assert "done (1 non-finite step skipped)" in f.read()


# ---- the exported model bundle ------------------------------------------------------------------

def check_model_bundle(folder, max_bytes=None):
    """The checks a model folder for the inspector must pass (docs/design.md §4)."""
    with open(os.path.join(folder, "model.json")) as f:
        meta = json.load(f)
    w, n_layers = meta["window"], meta["layers"]
    layers = sorted(d for d in os.listdir(folder) if d.startswith("layer_"))
    assert layers == [f"layer_{n:02d}" for n in range(n_layers)]
    assert sorted(os.listdir(folder)) == ["README.md"] + layers + ["model.json"]
    total = 0
    for name in layers:
        d = os.path.join(folder, name)
        files = set(os.listdir(d))
        want = {f + ".npy" for f in ("q", "k", "v", "w_dt", "a", "delta", "evict", "o", "lse")}
        assert want <= files and files - want <= {"mask.npy", "tokens.txt", "roles.txt"}
        assert {"tokens.txt", "roles.txt"} <= files
        t = {f[:-4]: np.load(os.path.join(d, f)) for f in files if f.endswith(".npy")}
        total += sum(os.path.getsize(os.path.join(d, f)) for f in files)
        B, H, L, D = t["q"].shape
        Hkv, Hd = t["k"].shape[1], t["w_dt"].shape[0]
        assert B == 1 and t["k"].shape == t["v"].shape == (1, Hkv, L, D) and H % Hkv == 0
        assert t["w_dt"].shape == (Hd, Hkv * D) and t["a"].shape == (Hd,) and Hd in (Hkv, H)
        assert t["delta"].shape == t["evict"].shape == (1, Hd, L)
        assert t["o"].shape == (1, H, L, D) and t["lse"].shape == (1, H, L)
        assert t["evict"].dtype == np.int64
        assert all(t[n].dtype == np.float32 for n in t if n != "evict" and n != "mask")
        for fname in ("tokens.txt", "roles.txt"):
            with open(os.path.join(d, fname), encoding="utf-8") as f:
                lines = f.read().split("\n")
            assert lines[-1] == "" and len(lines) - 1 == L
        with open(os.path.join(d, "roles.txt")) as f:
            assert set(f.read().split()) <= set(gen.ROLE_NAMES)
        # delta is what the inspector recomputes from v, w_dt and a (in the layer's form).
        v = t["v"][0].astype(np.float64)                                    # (Hkv, L, D)
        z = v.transpose(1, 0, 2).reshape(L, Hkv * D) @ t["w_dt"].astype(np.float64).T  # (L, Hd)
        delta = (t["a"] * np.logaddexp(0, z)).T                             # (Hd, L)
        if meta.get("form", "exp") == "exp":
            delta = np.exp(delta)
        np.testing.assert_allclose(t["delta"][0], delta, rtol=1e-5)
        # The last query keeps w keys: the inspector reads the window off evict this way.
        assert (t["evict"][0] >= L - 1).sum(axis=1).tolist() == [min(w, L)] * Hd
        for h in range(Hd):
            # evict against the plain top-w selection of every query (ties: the later key).
            dh, e = t["delta"][0, h], t["evict"][0, h]
            kept = np.zeros((L, L), dtype=bool)
            for p in range(L):
                order = sorted(range(p + 1), key=lambda j: (dh[j], j), reverse=True)[:w]
                kept[p, order] = True
            j = np.arange(L)
            assert np.array_equal(kept, (j[None, :] <= j[:, None]) & (j[:, None] <= e[None, :]))
            if "mask" in t:
                assert np.array_equal(t["mask"][0, h].astype(bool), kept)
            # o and lse: softmax(scale q.k + delta) over the kept keys, in float64.
            for hq in range(h * H // Hd, (h + 1) * H // Hd):
                q = t["q"][0, hq].astype(np.float64)
                k = t["k"][0, hq // (H // Hkv)].astype(np.float64)
                s = np.where(kept, q @ k.T / np.sqrt(D) + dh[None, :], -np.inf)
                lse = np.logaddexp.reduce(s, axis=1)
                o = np.exp(s - lse[:, None]) @ t["v"][0, hq // (H // Hkv)].astype(np.float64)
                np.testing.assert_allclose(t["lse"][0, hq], lse, rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(t["o"][0, hq], o, rtol=1e-4, atol=1e-5)
    if max_bytes:
        assert total <= max_bytes
    return meta


def test_export_writes_a_model_bundle_the_inspector_reads(quick_results, tmp_path):
    from export_bundle import export_run
    out = str(tmp_path / "bundle")
    os.makedirs(out)  # an existing folder is replaced
    open(os.path.join(out, "stale.txt"), "w").close()
    export_run(os.path.join(quick_results, "models", "L0032_dma.pt"), out, seq_len=64, with_mask=True)
    assert not os.path.exists(os.path.join(out, "stale.txt"))
    meta = check_model_bundle(out)
    assert meta["sequence"]["seq_len"] == 64 and meta["run"]["status"] == "done"
    # tokens and roles are the generator's test sequence
    b = gen.batch(gen.TaskConfig(seq_len=64, n_pairs=4, n_queries=3), "test", 0, 0, 1)
    names, roles = gen.describe(gen.TaskConfig(seq_len=64, n_pairs=4, n_queries=3), b, 0)
    with open(os.path.join(out, "layer_01", "tokens.txt")) as f:
        assert f.read().split("\n")[:-1] == names
    with open(os.path.join(out, "layer_00", "roles.txt")) as f:
        assert f.read().split("\n")[:-1] == roles


def test_export_refuses_a_model_that_is_not_dma(quick_results, tmp_path):
    from export_bundle import export_run
    with pytest.raises(SystemExit, match="dense model"):
        export_run(os.path.join(quick_results, "models", "L0032_dense.pt"), str(tmp_path / "x"))


@pytest.mark.skipif(not os.path.isdir(ASSET), reason="no assets/mqar")
def test_the_shipped_assets_mqar_is_a_valid_model_bundle():
    meta = check_model_bundle(ASSET, max_bytes=3 * 2 ** 20)
    assert meta["layers"] == 2 and meta["sequence"]["split"] == "test"
