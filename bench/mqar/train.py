#!/usr/bin/env python3
"""MQAR sweep: the same small model trained with dense attention, a sliding window and DMA, on
the same data, steps and hyper-parameters, for each sequence length; tested on held-out sequences
at the training length and at twice it (extrapolation).

    PYTHONPATH=<dma_torch build> python3 bench/mqar/train.py [--results DIR] [--budget-seconds S]
    PYTHONPATH=<dma_torch build> python3 bench/mqar/train.py --quick --device cpu --results /tmp/q

Writes into --results (default bench/mqar/results):
    runs/L0256_dma.json    one per run: its configuration, status, test accuracies, ms per training
                           step, the loss curve, and the environment (date, GPU, torch, commit)
    summary.md             the accuracy table and the step times, from every finished run
    accuracy.png           test accuracy against the training length, at L and at 2L
    models/L0256_dma.pt    the trained weights of each finished run (what export_bundle.py reads)
    checkpoints/*.pt       the state of a run cut short by --budget-seconds (removed when it ends)
    plan.json              the steps per length (--steps auto) and the step times they came from

Steps: --steps auto (the default) first times a few steps of every run, then gives each length an
equal share of the budget as a number of steps, the same for all attentions of that length (the
"same budget"); --steps N gives every run N.

Resuming: run the same command again. A run whose JSON says "done" with the same configuration is
skipped; a run cut short continues from its checkpoint at the step it reached (the batches are a
function of the step, so it sees the data it would have seen); pending runs start. The summary and
the plot are rewritten from all finished runs each time. --budget-seconds bounds the whole command:
when the time is up the current run is checkpointed, the summary is written, and the command exits
0 saying what is left.

Non-finite steps: the loss is read at every log point (no synchronisation per step). When it is not
finite, the run goes back to the state of the previous log point and replays those steps one at a
time, checking each (with dma_torch's finiteness checks on); a step whose loss or gradient is not
finite, or whose forward raises, is skipped (no update) and recorded with its reason in the run's
JSON ("skipped_steps") and the summary. More than MAX_SKIPPED such steps fail the run. The same
rule holds for every attention.
"""
import argparse
import contextlib
import copy
import json
import math
import os
import queue
import sys
import threading
import time

_STARTED = time.monotonic()  # the budget counts from here: importing torch is part of the command

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import generator as gen  # noqa: E402
import report  # noqa: E402
from environment import environment  # noqa: E402
from models import ATTENTIONS, MQARModel  # noqa: E402

REPORT_RESERVE_S = 10.0  # kept back from the budget for the summary and the plot
EXPORT_RESERVE_S = 10.0  # and for --export (the CPU forward of one sequence, and writing it)
MAX_SKIPPED = 10         # non-finite steps a run may skip before it counts as failed

# The default sweep (sized for one command of about 7 minutes on one H200: README.md, "The task"
# says why these settings) and the --quick one (seconds on a CPU, for the tests).
FULL = dict(lengths=[256, 1024], window=32, pairs=8, queries=8, d_model=64, heads=1,
            layers=2, form="exp", steps="auto", batch=64, lr=3e-3, warmup=200, weight_decay=0.1,
            eval_sequences=512, eval_batch=64, log_every=50, budget_seconds=400.0)
QUICK = dict(lengths=[64], window=16, pairs=4, queries=3, d_model=64, heads=1, layers=2,
             form="exp", steps=6, batch=4, lr=2e-3, warmup=2, weight_decay=0.1, eval_sequences=8,
             eval_batch=4, log_every=2, budget_seconds=120.0)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cuda (default when available) or cpu")
    ap.add_argument("--quick", action="store_true", help="a tiny sweep for tests (seconds on a CPU)")
    ap.add_argument("--results", help="results folder (default bench/mqar/results; --quick: a temp folder)")
    ap.add_argument("--budget-seconds", type=float, help="stop cleanly after this long (default 400)")
    ap.add_argument("--lengths", help="training lengths, comma separated (default 256,1024)")
    ap.add_argument("--attentions", default=",".join(ATTENTIONS), help="default dense,swa,dma")
    for name, kind in (("window", int), ("pairs", int), ("queries", int), ("d_model", int),
                       ("heads", int), ("layers", int), ("form", str), ("steps", str),
                       ("batch", int), ("lr", float), ("warmup", int), ("weight_decay", float),
                       ("eval_sequences", int), ("eval_batch", int), ("log_every", int)):
        ap.add_argument("--" + name.replace("_", "-"), dest=name, type=kind,
                        help=f"default {FULL[name]} (--quick: {QUICK[name]})")
    ap.add_argument("--seed", type=int, default=0, help="data and weights (default 0)")
    ap.add_argument("--cuda-checks", action="store_true",
                    help="keep dma_torch's per-call finiteness checks on CUDA (a sync per call)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: leave)")
    ap.add_argument("--stop-after-steps", type=int, default=None, help=argparse.SUPPRESS)
    # (for the tests: behave as if the budget ran out after this many training steps)
    ap.add_argument("--export", metavar="DIR",
                    help="at the end, export the DMA model of --export-length as a model bundle")
    ap.add_argument("--export-length", type=int, default=None,
                    help="training length of the DMA run to export, and the test sequence's length "
                         "(default: the first of --lengths)")
    a = ap.parse_args(argv)
    base = QUICK if a.quick else FULL
    for k, v in base.items():
        if k == "lengths":
            a.lengths = [int(x) for x in a.lengths.split(",")] if a.lengths else list(v)
        elif getattr(a, k, None) is None:
            setattr(a, k, v)
    a.attentions = [x for x in a.attentions.split(",") if x]
    if a.export_length is None:
        a.export_length = a.lengths[0]
    if a.form not in ("exp", "linear"):
        ap.error(f"--form: expected exp or linear (the dma layer's delta), got {a.form!r}")
    if a.steps != "auto" and not str(a.steps).isdigit():
        ap.error(f"--steps: expected a number or 'auto', got {a.steps!r}")
    for x in a.attentions:
        if x not in ATTENTIONS:
            ap.error(f"--attentions: {x!r} is not one of {', '.join(ATTENTIONS)}")
    if a.results is None:
        a.results = (os.path.join("/tmp", "mqar_quick") if a.quick
                     else os.path.join(HERE, "results"))
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is usable here (use --device cpu)")
    return a


# ---- one run ------------------------------------------------------------------------------------

def run_config(a, L, attention, steps):
    """Everything that defines a run; a stored run with another configuration is run again.
    `form` (the dma layer's delta) is part of the dma runs' configuration only."""
    cfg = dict(seq_len=L, attention=attention, window=a.window, pairs=a.pairs, queries=a.queries,
               n_keys=64, n_values=64, n_filler=32, d_model=a.d_model, heads=a.heads,
               layers=a.layers, steps=steps, batch=a.batch, lr=a.lr,
               warmup=min(a.warmup, max(1, steps // 10)),
               weight_decay=a.weight_decay, eval_sequences=a.eval_sequences,
               eval_batch=a.eval_batch, log_every=a.log_every, seed=a.seed,
               device_type=torch.device(a.device).type)
    if attention == "dma":
        cfg["form"] = a.form
    return cfg


def run_id(L, attention):
    return f"L{L:04d}_{attention}"


def task(cfg, seq_len=None):
    return gen.TaskConfig(seq_len=seq_len or cfg["seq_len"], n_pairs=cfg["pairs"],
                          n_queries=cfg["queries"], n_keys=cfg["n_keys"], n_values=cfg["n_values"],
                          n_filler=cfg["n_filler"]).check()


def build_model(cfg, device):
    torch.manual_seed(cfg["seed"])
    return MQARModel(task(cfg).vocab_size, cfg["attention"], d_model=cfg["d_model"],
                     n_layers=cfg["layers"], n_heads=cfg["heads"], window=cfg["window"],
                     form=cfg.get("form", "exp")).to(device)


def lr_at(cfg, step):
    """Linear warm-up, then cosine decay to a tenth."""
    if step < cfg["warmup"]:
        return cfg["lr"] * (step + 1) / cfg["warmup"]
    t = (step - cfg["warmup"]) / max(1, cfg["steps"] - cfg["warmup"])
    return cfg["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def autocast(device):
    """bf16 autocast on CUDA (what the dma kernels take); float32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimizer(model, cfg):
    """AdamW; no weight decay on embeddings, norms and biases."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                              {"params": other, "weight_decay": 0.0}], lr=cfg["lr"], betas=(0.9, 0.98))


def train_step(model, opt, x, y, device, check=False):
    """Forward, loss on the query positions, backward, clipped AdamW step; returns the loss
    (a device tensor: reading it would synchronise). check=True reads the loss and the gradient
    norm first and skips the update when either is not finite; then it returns (loss, None) or
    (loss, the reason it skipped)."""
    with autocast(device):
        logits = model(x)                                              # (B, L, vocab)
    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=gen.IGNORE)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if check:
        bad = ("non-finite loss" if not math.isfinite(float(loss)) else
               "non-finite gradient" if not math.isfinite(float(norm)) else None)
        if bad:
            opt.zero_grad(set_to_none=True)
            return loss.detach(), bad
        opt.step()
        return loss.detach(), None
    opt.step()
    return loss.detach()


def to_device(b, device):
    x = torch.from_numpy(b.tokens).to(device, non_blocking=True)   # (B, L)
    y = torch.from_numpy(b.targets).to(device, non_blocking=True)  # (B, L)
    return x, y


class Prefetcher:
    """Draws the training batches of steps start, start+1, ... in a thread (numpy releases the
    GIL), so the GPU does not wait for the generator. An error in the thread is raised by get()."""

    def __init__(self, t, seed, start, stop, size):
        self.q = queue.Queue(maxsize=4)
        self.stopped = False
        self.thread = threading.Thread(target=self._fill, args=(t, seed, start, stop, size), daemon=True)
        self.thread.start()

    def _fill(self, t, seed, start, stop, size):
        for step in range(start, stop):
            try:
                item = gen.batch(t, "train", seed, step, size)
            except Exception as e:  # handed to the training loop
                item = e
            while not self.stopped:
                try:
                    self.q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    pass
            if self.stopped or isinstance(item, Exception):
                return

    def get(self):
        item = self.q.get()
        if isinstance(item, Exception):
            raise item
        return item

    def close(self):
        self.stopped = True


def reach(cfg):
    """How far back a stack of sliding windows sees: layer 1 at position m reads m - (w-1) .. m, so
    layer n at p reads back to p - n(w-1). A query whose value lies further back than this is out
    of reach of the swa model (of any window of w per layer)."""
    return cfg["layers"] * (cfg["window"] - 1)


@torch.no_grad()
def evaluate(model, cfg, seq_len, device):
    """Accuracy of the argmax prediction at the query positions of test sequences: all queries,
    and split by the distance d from the query to its value: near, d <= reach(cfg) (a stack of
    sliding windows can see the value: with w = 32 and 2 layers, d <= 62), and far, beyond it."""
    model.eval()
    t = task(cfg, seq_len)
    correct = {"all": 0, "near": 0, "far": 0}
    count = {"all": 0, "near": 0, "far": 0}
    n_batches = max(1, cfg["eval_sequences"] // cfg["eval_batch"])
    size = max(1, cfg["eval_sequences"] // n_batches)
    for i in range(n_batches):
        b = gen.batch(t, "test", cfg["seed"], i, size)
        x, y = to_device(b, device)
        with autocast(device):
            pred = model(x).argmax(-1)                                 # (B, L)
        hit = (pred == y).cpu().numpy()
        scored = b.targets != gen.IGNORE
        far = scored & (b.distance > reach(cfg))
        for k, sel in (("all", scored), ("near", scored & ~far), ("far", far)):
            correct[k] += int(hit[sel].sum())
            count[k] += int(sel.sum())
    model.train()
    return {k: (correct[k] / count[k] if count[k] else None) for k in correct} | \
        {"queries": count["all"], "far_queries": count["far"], "far_beyond": reach(cfg)}


def train_run(a, cfg, paths, deadline, env):
    """Trains (or resumes) one run until its steps are done or the deadline; returns its record."""
    device = torch.device(a.device)
    model = build_model(cfg, device)
    opt = make_optimizer(model, cfg)
    state = {"step": 0, "train_seconds": 0.0, "curve": [], "interval_ms": [], "skipped": []}
    if os.path.exists(paths["checkpoint"]):
        ck = torch.load(paths["checkpoint"], map_location=device)
        if ck["config"] == cfg:
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            state = ck["state"]
            state.setdefault("skipped", [])
            print(f"  resuming at step {state['step']} of {cfg['steps']}", flush=True)
    t = task(cfg)
    prefetch = Prefetcher(t, cfg["seed"], state["step"], cfg["steps"], cfg["batch"])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    loss_sum = torch.zeros((), device=device)
    since, t_mark, stopped = 0, time.monotonic(), False
    good = snapshot(model, opt, state["step"])  # the state at the last log point with a finite loss
    status = "done"
    try:
        while state["step"] < cfg["steps"]:
            if time.monotonic() > deadline or a.stop_after_steps == 0:
                stopped = True
                break
            if a.stop_after_steps is not None:
                a.stop_after_steps -= 1
            step = state["step"]
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, step)
            x, y = to_device(prefetch.get(), device)
            loss_sum += train_step(model, opt, x, y, device)
            since += 1
            state["step"] = step + 1
            if state["step"] % cfg["log_every"] == 0 or state["step"] == cfg["steps"]:
                sync()
                now = time.monotonic()
                state["train_seconds"] += now - t_mark
                state["interval_ms"].append(1e3 * (now - t_mark) / since)
                mean_loss = float(loss_sum) / since
                if not math.isfinite(mean_loss):
                    mean_loss = replay(model, opt, cfg, t, device, good, state, a.cuda_checks)
                    now = time.monotonic()  # the replay's time is not training time
                state["curve"].append([state["step"], mean_loss])
                print(f"  step {state['step']:5d}  loss {mean_loss:.4f}  "
                      f"{state['interval_ms'][-1]:.1f} ms/step", flush=True)
                loss_sum.zero_()
                since, t_mark = 0, now
                if len(state["skipped"]) > MAX_SKIPPED or not math.isfinite(mean_loss):
                    first = state["skipped"][0] if state["skipped"] else [state["step"], "?"]
                    status = (f"failed: {len(state['skipped'])} non-finite steps by step "
                              f"{state['step']} (the first: step {first[0]}, {first[1]})")
                    break
                good = snapshot(model, opt, state["step"])
    finally:
        prefetch.close()
    if since:  # steps after the last log point (a stop at the deadline)
        sync()
        state["train_seconds"] += time.monotonic() - t_mark
        if not math.isfinite(float(loss_sum)):  # checkpoint a finite state
            replay(model, opt, cfg, t, device, good, state, a.cuda_checks)

    record = {"id": run_id(cfg["seq_len"], cfg["attention"]), "config": cfg, "env": env,
              "steps_done": state["step"], "train_seconds": round(state["train_seconds"], 2),
              "curve": state["curve"], "skipped_steps": state["skipped"]}
    # ms per step: the median over log intervals, the first (warm-up) left out when there are more.
    iv = state["interval_ms"][1:] if len(state["interval_ms"]) > 1 else state["interval_ms"]
    record["ms_per_step"] = float(np.median(iv)) if iv else None
    if stopped:
        save_checkpoint(paths, cfg, model, opt, state)
        record["status"] = "partial"
        return record
    if status == "done":
        # Evaluate unless the remaining time is clearly too short (then keep the trained state).
        est = 3.0 * (record["ms_per_step"] or 0) / 1e3 * max(1, cfg["eval_sequences"] // cfg["batch"])
        if time.monotonic() + est > deadline:
            save_checkpoint(paths, cfg, model, opt, state)
            record["status"] = "partial"
            return record
        t_eval = time.monotonic()
        record["test"] = evaluate(model, cfg, cfg["seq_len"], device)
        record["test_2x"] = evaluate(model, cfg, 2 * cfg["seq_len"], device)
        record["eval_seconds"] = round(time.monotonic() - t_eval, 2)
        if cfg["attention"] == "dma":  # the learnt a per layer (delta = f(a softplus(z))): a diagnostic
            record["dma_a"] = [[round(float(x), 4) for x in blk.attn.a] for blk in model.blocks]
        os.makedirs(os.path.dirname(paths["model"]), exist_ok=True)
        torch.save({"config": cfg, "model": {k: v.cpu() for k, v in model.state_dict().items()}},
                   paths["model"])
    record["status"] = status
    if os.path.exists(paths["checkpoint"]):
        os.remove(paths["checkpoint"])
    return record


def snapshot(model, opt, step):
    """A copy of the model's and the optimizer's state at `step` (on the device: the models are
    small), for replay()."""
    return {"step": step, "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "optimizer": copy.deepcopy(opt.state_dict())}


def replay(model, opt, cfg, t, device, good, state, cuda_checks=False):
    """The mean loss of the last log interval was not finite: go back to `good` (the state at the
    interval's start) and replay its steps one at a time, each checked, with dma_torch's finiteness
    checks on (then back to `cuda_checks`); skip (no update) and record each step that is not
    finite or raises. Returns the mean loss of the steps kept (nan if none)."""
    model.load_state_dict(good["model"])
    opt.load_state_dict(copy.deepcopy(good["optimizer"]))  # load_state_dict may keep the tensors
    dma_cuda = cfg["attention"] == "dma" and device.type == "cuda"
    if dma_cuda:
        import dma_torch
        dma_torch.set_cuda_checks(True)
    print(f"  non-finite loss in steps {good['step'] + 1}..{state['step']}: replaying them "
          f"one at a time", flush=True)
    losses = []
    try:
        for step in range(good["step"], state["step"]):
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, step)
            x, y = to_device(gen.batch(t, "train", cfg["seed"], step, cfg["batch"]), device)
            try:
                loss, bad = train_step(model, opt, x, y, device, check=True)
            except (RuntimeError, ValueError) as e:  # dma_torch's checks name the tensor
                opt.zero_grad(set_to_none=True)
                loss, bad = None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            if bad:
                state["skipped"].append([step + 1, bad])
                print(f"  step {step + 1}: {bad}; skipped", flush=True)
            else:
                losses.append(float(loss))
    finally:
        if dma_cuda:
            dma_torch.set_cuda_checks(cuda_checks)
    return float(np.mean(losses)) if losses else float("nan")


def calibrate(a, L, attention, device, timed=8):
    """ms per training step of this run's model (3 warm-up steps, then `timed`), drawing each
    batch in the same thread: an overestimate where training overlaps the drawing, on purpose."""
    cfg = run_config(a, L, attention, steps=1)
    model = build_model(cfg, device)
    opt = make_optimizer(model, cfg)
    t = task(cfg)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for step in range(3 + timed):
        if step == 3:
            sync()
            start = time.monotonic()
        x, y = to_device(gen.batch(t, "train", cfg["seed"], step, cfg["batch"]), device)
        train_step(model, opt, x, y, device)
    sync()
    return 1e3 * (time.monotonic() - start) / timed


def plan_steps(a, t0):
    """Training steps per length, the same for every attention at one length. A number given
    with --steps is used for all. 'auto' (the default) times a few steps of every run first and
    gives each length an equal share of what the budget leaves, less a margin; the plan is kept
    in RESULTS/plan.json and reused by a rerun with the same settings (delete it to plan anew)."""
    if a.steps != "auto":
        return {L: int(a.steps) for L in a.lengths}
    key = {"lengths": a.lengths, "attentions": a.attentions,
           "runs": [run_config(a, a.lengths[0], att, steps=0) for att in a.attentions]}
    path = os.path.join(a.results, "plan.json")
    if os.path.exists(path):
        with open(path) as f:
            plan = json.load(f)
        if plan.get("key") == key:
            print(f"plan: steps per length from {path}: {plan['steps']}", flush=True)
            return {int(L): n for L, n in plan["steps"].items()}
    device = torch.device(a.device)
    ms = {L: {att: calibrate(a, L, att, device) for att in a.attentions} for L in a.lengths}
    n_runs = len(a.lengths) * len(a.attentions)
    # Left for training: the budget less what has gone, the report's reserve, per run about 3 s
    # (model set-up, the first step, the two evaluations, saving), then 15% kept as a margin.
    left = (a.budget_seconds - (time.monotonic() - t0) - REPORT_RESERVE_S - 3.0 * n_runs -
            (EXPORT_RESERVE_S if a.export else 0)) * 0.85
    steps = {}
    for L in a.lengths:
        per_step_s = sum(ms[L].values()) / 1e3  # one step of every attention at this length
        n = int(max(0.0, left / len(a.lengths)) / per_step_s)
        steps[L] = max(a.log_every, min(50000, n - n % a.log_every))
    write_json(path, {"key": key, "steps": steps, "calibration_ms_per_step": ms,
                      "budget_seconds": a.budget_seconds, "device": environment(a.device)["device_name"]})
    for L in a.lengths:
        print(f"plan: L={L}: " + ", ".join(f"{att} {ms[L][att]:.1f} ms" for att in a.attentions) +
              f" per step -> {steps[L]} steps each", flush=True)
    return steps


def save_checkpoint(paths, cfg, model, opt, state):
    os.makedirs(os.path.dirname(paths["checkpoint"]), exist_ok=True)
    tmp = paths["checkpoint"] + ".tmp"
    torch.save({"config": cfg, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "state": state}, tmp)
    os.replace(tmp, paths["checkpoint"])


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def run_paths(results, rid):
    return {"json": os.path.join(results, "runs", rid + ".json"),
            "checkpoint": os.path.join(results, "checkpoints", rid + ".pt"),
            "model": os.path.join(results, "models", rid + ".pt")}


def finished(path, cfg):
    """The stored record of a finished run with this configuration, else None."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        rec = json.load(f)
    if rec.get("config") != cfg or rec.get("status") == "partial":
        return None
    return rec


def main(argv=None, started=None):
    t0 = time.monotonic() if started is None else started
    a = parse_args(argv)
    deadline = t0 + a.budget_seconds - REPORT_RESERVE_S - (EXPORT_RESERVE_S if a.export else 0)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    if torch.device(a.device).type == "cuda" and "dma" in a.attentions and not a.cuda_checks:
        import dma_torch
        dma_torch.set_cuda_checks(False)  # no sync per call; the loss is checked at each log point
    os.makedirs(a.results, exist_ok=True)
    with open(os.path.join(a.results, ".gitignore"), "w") as f:
        f.write("# the weights and checkpoints stay out of git; the JSON, summary and plot are kept\n"
                "models/\ncheckpoints/\n")
    env = environment(a.device)
    print(f"mqar: {env['device_name']}, torch {env['torch']}, commit {env['commit'][:12]}"
          f"{' (dirty)' if env['dirty'] else ''}; results in {a.results}", flush=True)

    steps = plan_steps(a, t0)
    plan = [(L, att) for L in a.lengths for att in a.attentions]
    left = []
    for L, att in plan:
        cfg = run_config(a, L, att, steps[L])
        rid = run_id(L, att)
        paths = run_paths(a.results, rid)
        if finished(paths["json"], cfg):
            print(f"{rid}: done earlier, skipped", flush=True)
            continue
        if time.monotonic() > deadline or a.stop_after_steps == 0:
            left.append(rid)
            continue
        print(f"{rid}: training {cfg['steps']} steps (L={L}, w={cfg['window']}, "
              f"{cfg['pairs']} pairs, {cfg['queries']} queries)", flush=True)
        rec = train_run(a, cfg, paths, deadline, env)
        write_json(paths["json"], rec)
        if rec["status"] == "partial":
            left.append(rid)
            print(f"{rid}: stopped at step {rec['steps_done']} (budget); checkpointed", flush=True)
        elif rec["status"] == "done":
            print(f"{rid}: test accuracy {rec['test']['all']:.3f} at L, {rec['test_2x']['all']:.3f} "
                  f"at 2L; {rec['ms_per_step']:.2f} ms/step", flush=True)
        else:
            print(f"{rid}: {rec['status']}", flush=True)

    summary = report.write_report(a.results)
    print(f"wrote {summary}", flush=True)
    if a.export:
        from export_bundle import export_run
        rid = run_id(a.export_length, "dma")
        model_path = run_paths(a.results, rid)["model"]
        if os.path.exists(model_path):
            export_run(model_path, a.export, seq_len=a.export_length)
        else:
            print(f"export: {model_path} does not exist yet (run not finished); nothing exported")
    if left:
        print(f"budget reached after {time.monotonic() - t0:.0f} s; not finished: {', '.join(left)}. "
              f"Run the same command again to resume.", flush=True)
    else:
        print(f"all {len(plan)} runs finished ({time.monotonic() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(started=_STARTED))
