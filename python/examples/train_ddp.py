#!/usr/bin/env python3
"""Trains a tiny language model with DynamicMaskAttention under DistributedDataParallel.

    # one process (no process group)
    python3 python/examples/train_ddp.py --device cpu --steps 200
    # N processes on CPUs (gloo)
    python3 -m torch.distributed.run --nproc_per_node 2 python/examples/train_ddp.py --device cpu
    # one GPU per process (NCCL; LOCAL_RANK picks the GPU)
    NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node 2 python/examples/train_ddp.py --device cuda

The model: an embedding, --layers blocks of (LayerNorm, DynamicMaskAttention with rotary
embeddings, LayerNorm, MLP), a LayerNorm and a linear head. The task, associative recall: each
sequence first lists key/value pairs (key k, then the value the sequence maps k to), then asks
for keys listed earlier again, each followed by its value; the loss is the cross entropy of those
recalled values, the only predictable tokens (guessing scores log(vocab/2), 3.47 for the default
vocab of 64). Every sequence has the same number of them.

Data: the global batch of step s is drawn from a generator seeded by (--seed, s) alone, and rank
r of W trains on sequences [r*G/W, (r+1)*G/W) of it (G = --global-batch, divisible by W), so any
world size sees the same global batch. Each rank's loss is the mean over its local batch, and
DDP averages the gradients over the ranks: with equal shares, that average is the gradient of
the mean over the global batch, the one-process gradient. The weights are drawn from --seed on
every rank (checked; DDP also broadcasts rank 0's).

Rank 0 prints the loss per step and the throughput, writes --log-json (the config and, per step,
the global mean loss, the gradient's L2 norm and element sum, the step time) and --dump-grads
(the last step's gradients by parameter name, torch.save). tokens/s = G * --seq-len / step time,
the median over the steps after the first.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import dma_torch
from dma_torch import DynamicMaskAttention

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


class Block(nn.Module):
    def __init__(self, d_model, n_heads, n_kv_heads, window):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = DynamicMaskAttention(d_model, n_heads, n_kv_heads, window=window, rope=True)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model))

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        return x + self.mlp(self.n2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab, d_model, n_heads, n_kv_heads, window, layers):
        super().__init__()
        self.emb = nn.Embedding(vocab, d_model)
        self.blocks = nn.Sequential(*(Block(d_model, n_heads, n_kv_heads, window)
                                      for _ in range(layers)))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens):
        return self.head(self.norm(self.blocks(self.emb(tokens))))


def recall_batch(seed, step, batch, seq_len, vocab):
    """The global batch of a step: inputs x and targets y (batch, seq_len), and the positions of
    y that are scored (the recalled values; the same for every sequence). Keys are tokens
    [0, vocab/2), values [vocab/2, vocab); pairs occupy two positions (key, value)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    n_keys = vocab // 2
    n_pairs = (seq_len + 2) // 2
    stored = max(1, n_pairs // 2)
    value_of = torch.randint(n_keys, vocab, (batch, n_keys), generator=g)
    keys = torch.randint(0, n_keys, (batch, stored), generator=g)
    asked = torch.gather(keys, 1, torch.randint(0, stored, (batch, n_pairs - stored), generator=g))
    keys = torch.cat((keys, asked), 1)
    seq = torch.stack((keys, torch.gather(value_of, 1, keys)), 2).reshape(batch, 2 * n_pairs)
    seq = seq[:, :seq_len + 1]
    pos = torch.arange(2 * stored + 1, seq_len + 1, 2) - 1  # targets y[:, p] = seq[:, p + 1]
    return seq[:, :-1], seq[:, 1:], pos


def setup(args):
    """(rank, world, device): from torchrun's environment, else one process without a group."""
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.global_batch % world != 0:
        sys.exit(f"--global-batch {args.global_batch} is not divisible by the world size {world}")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device")
        if local_rank >= torch.cuda.device_count():
            sys.exit(f"LOCAL_RANK {local_rank}: only {torch.cuda.device_count()} CUDA devices")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device, distributed


def check_same_weights(model, device):
    """Every rank drew the same weights from --seed (before DDP's broadcast hides a difference)."""
    s = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().to(device)
    ref = s.clone()
    dist.broadcast(ref, 0)
    if not torch.equal(s, ref):
        raise RuntimeError(f"rank {dist.get_rank()}: initial weights differ from rank 0's")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--n-heads", type=int, default=2)
    ap.add_argument("--n-kv-heads", type=int, default=1)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--device", choices=("cpu", "cuda"),
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                    help="weights and activations (default float32 on cpu, bfloat16 on cuda; "
                         "float32 on cuda runs the attention in bfloat16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads per process")
    ap.add_argument("--log-json", default=None)
    ap.add_argument("--dump-grads", default=None)
    ap.add_argument("--log-every", type=int, default=0, help="print every n steps (0: ~10 lines)")
    ap.add_argument("--no-cuda-checks", action="store_true",
                    help="dma_torch.set_cuda_checks(False): no synchronisation per attention call")
    args = ap.parse_args()
    if args.steps < 1 or args.global_batch < 1 or args.seq_len < 4 or args.vocab < 4:
        sys.exit("--steps and --global-batch must be >= 1, --seq-len and --vocab >= 4")
    dtype = DTYPES[args.dtype or ("bfloat16" if args.device == "cuda" else "float32")]
    if args.device == "cpu" and dtype not in (torch.float32, torch.float64):
        sys.exit(f"--dtype {args.dtype}: the CPU runs float32 or float64")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.no_cuda_checks:
        dma_torch.set_cuda_checks(False)

    rank, world, device, distributed = setup(args)
    local = args.global_batch // world
    torch.manual_seed(args.seed)
    model = TinyLM(args.vocab, args.d_model, args.n_heads, args.n_kv_heads, args.window,
                   args.layers).to(device=device, dtype=dtype)
    net = model
    if distributed:
        check_same_weights(model, device)
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)

    every = args.log_every or max(1, args.steps // 10)
    log, times = [], []
    for step in range(args.steps):
        t0 = time.perf_counter()
        x, y, pos = recall_batch(args.seed, step, args.global_batch, args.seq_len, args.vocab)
        x, y = (t[rank * local:(rank + 1) * local].to(device) for t in (x, y))
        pos = pos.to(device)
        logits = net(x)[:, pos]
        if logits.dtype == torch.bfloat16:
            logits = logits.float()
        # the mean over the local batch (every sequence has len(pos) scored tokens)
        loss = F.cross_entropy(logits.reshape(-1, args.vocab), y[:, pos].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()  # under DDP the gradients are now the mean over the ranks
        grads = [p.grad.detach().double() for p in model.parameters()]
        mean_loss = loss.detach().double()
        if distributed:
            dist.all_reduce(mean_loss)
            mean_loss /= world
        stats = torch.stack([mean_loss, sum(g.square().sum() for g in grads),
                             sum(g.sum() for g in grads)]).tolist()  # synchronises
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        loss_v, norm, gsum = stats[0], stats[1] ** 0.5, stats[2]
        log.append({"step": step, "loss": loss_v, "grad_norm": norm, "grad_sum": gsum,
                    "step_s": times[-1]})
        if rank == 0 and (step % every == 0 or step == args.steps - 1):
            print(f"step {step:5d}  loss {loss_v:.6f}  grad norm {norm:.4e}  "
                  f"{times[-1] * 1e3:.1f} ms", flush=True)

    step_s = statistics.median(times[1:] if len(times) > 1 else times)
    tps = args.global_batch * args.seq_len / step_s
    if rank == 0:
        print(f"world {world} ({device.type}, {str(dtype).replace('torch.', '')}), global batch "
              f"{args.global_batch} x {args.seq_len} tokens: {tps:.0f} tokens/s "
              f"({tps / world:.0f} per rank), median step {step_s * 1e3:.2f} ms", flush=True)
        if args.log_json:
            cfg = dict(vars(args), dtype=str(dtype).replace("torch.", ""), world_size=world,
                       local_batch=local)
            with open(args.log_json, "w") as f:
                json.dump({"config": cfg, "tokens_per_s": tps, "steps": log}, f, indent=1)
        if args.dump_grads:
            torch.save({n: p.grad.detach().cpu() for n, p in model.named_parameters()},
                       args.dump_grads)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
