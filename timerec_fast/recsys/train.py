"""Training: full or sampled softmax, early stopping on validation NDCG@10, atomic checkpoints,
resume, learning curves, optional TensorBoard, and DDP through ``torch.distributed``.

Checkpoint directory (``out``)::

    config.json    model + training config, data source, cleaning report, split
    data.npz       the cleaned, indexed interactions     } so evaluation, serving and raw
    idmaps.json    raw user / item ids                   } ids work from the directory alone
    model.pt       best model so far (by validation NDCG@10)
    last.pt        full training state after the last finished epoch (for --resume)
    metrics.json   validation + test metrics, timing, peak memory (written at the end)
    curves.png     learning curves

Every file is replaced atomically (see :mod:`.checkpoint`).

Distributed: run under ``torchrun --nproc_per_node N -m timerec_fast.recsys train ...``. Each
rank takes an equal shard of every epoch's shuffled windows with ``batch_size / N`` windows per
step, so the global batch and the number of steps match a single-process run; gradients are
averaged by :class:`~torch.nn.parallel.DistributedDataParallel` (gloo on CPU, NCCL on CUDA);
evaluation is sharded and all-reduced; only rank 0 writes files and prints.
"""
from __future__ import annotations

import glob
import json
import math
import os
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .data import InteractionData
from .errors import CheckpointError, RecsysError
from .evaluate import KS, evaluate, format_table
from .models import ModelConfig, PopularityModel, SeqRecommender, build_model
from .sequences import Batch, Split, TimeScaler, iterate_batches, make_split, train_windows


@dataclass
class TrainConfig:
    model: str = "timelstm"
    variant: str = "time_lstm3"
    epochs: int = 30
    batch_size: int = 128
    lr: float = 5e-3
    optimizer: str = "adam"          # adam | adamw
    weight_decay: float = 0.0
    dropout: float = 0.2
    emb_dim: int = 64
    hidden: int = 128
    num_layers: int = 1
    time_features: bool = True
    max_len: int = 50
    loss: str = "full"               # full | sampled
    n_neg: int = 256
    sampler_alpha: float = 0.75      # proposal q ~ count^alpha for sampled softmax
    patience: int = 5                # epochs without validation NDCG@10 improvement
    min_epochs: int = 1
    seed: int = 42
    split: str = "loo"               # loo | time
    valid_frac: float = 0.1
    test_frac: float = 0.1
    exclude_history: bool = True
    ties: str = "average"
    grad_clip: float = 5.0
    threads: int = 0                 # 0: leave torch's default
    device: str = "cpu"
    tensorboard: Optional[str] = None

    def validate(self) -> None:
        if self.model not in ("timelstm", "gru", "lstm", "pop"):
            raise RecsysError(f"unknown model {self.model!r}; choose timelstm, gru, lstm or pop")
        if self.optimizer not in ("adam", "adamw"):
            raise RecsysError("optimizer must be adam or adamw")
        if self.loss not in ("full", "sampled"):
            raise RecsysError("loss must be full or sampled")
        if self.epochs < 0 or self.batch_size < 1 or self.max_len < 1 or self.lr <= 0:
            raise RecsysError("epochs >= 0, batch size >= 1, max length >= 1 and lr > 0 are required")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 2 ** 20


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads): with 2 threads on 2 free cores it
    is about 2x the wall time; unlike wall time it barely moves when other processes compete."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def dist_info() -> tuple:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def maybe_init_distributed(device: str) -> bool:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise RecsysError("torch.distributed is not available in this build of PyTorch")
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    return True


def plot_curves(history: List[dict], path: str, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    ax[0].plot(ep, [h["loss"] for h in history], "o-")
    ax[0].set_xlabel("epoch")
    ax[0].set_ylabel("training loss")
    ax[0].grid(alpha=0.3)
    for key in ("NDCG@10", "HR@10"):
        ax[1].plot(ep, [h["valid"][key] for h in history], "o-", label=f"valid {key}")
    ax[1].set_xlabel("epoch")
    ax[1].legend()
    ax[1].grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    ckpt.atomic_write_bytes(path, buf.getvalue())


def _cleanup_temp(out: str) -> None:
    for p in glob.glob(os.path.join(out, ".*.tmp")):
        try:
            os.unlink(p)
        except OSError:
            pass


def model_config_for(cfg: TrainConfig, n_items: int, scaler: TimeScaler) -> ModelConfig:
    return ModelConfig(kind=cfg.model, n_items=n_items, emb_dim=cfg.emb_dim, hidden=cfg.hidden,
                       num_layers=cfg.num_layers, dropout=cfg.dropout, variant=cfg.variant,
                       time_features=cfg.time_features, time_mean=scaler.mean, time_std=scaler.std)


def split_for(data: InteractionData, cfg: TrainConfig) -> Split:
    kw = dict(valid_frac=cfg.valid_frac, test_frac=cfg.test_frac) if cfg.split == "time" else {}
    return make_split(data, cfg.split, **kw)


def train_item_counts(data: InteractionData, split: Split) -> np.ndarray:
    mask = np.zeros(data.n_events, dtype=bool)
    for u in range(data.n_users):
        a = int(data.offsets[u])
        mask[a:a + int(split.train_len[u])] = True
    return np.bincount(data.items[mask], minlength=data.n_items).astype(np.float64)


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def train(data: InteractionData, cfg: TrainConfig, out: str, resume: bool = False,
          source: Optional[dict] = None, printer: Callable[[str], None] = print,
          progress: bool = True) -> Dict:
    """Train ``cfg.model`` on ``data``; write the checkpoint directory ``out``; return metrics.

    Under torchrun the process group is created here and destroyed before returning: a gloo group
    left to interpreter shutdown can abort the process ("terminate called without an active
    exception", seen on rank 1 of the 2-process test)."""
    owns_group = not (dist.is_available() and dist.is_initialized())
    try:
        return _train(data, cfg, out, resume, source, printer, progress)
    finally:
        if owns_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _train(data: InteractionData, cfg: TrainConfig, out: str, resume: bool,
           source: Optional[dict], printer: Callable[[str], None], progress: bool) -> Dict:
    cfg.validate()
    distributed = maybe_init_distributed(cfg.device)
    rank, world = dist_info()
    is_main = rank == 0
    say = printer if is_main else (lambda *_: None)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif distributed:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecsysError("--device cuda requested but CUDA is not available")
    if distributed and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)

    if os.path.exists(out) and not os.path.isdir(out):
        raise RecsysError(f"--out {out} exists and is not a directory")
    last_path = os.path.join(out, "last.pt")
    if resume and not os.path.exists(last_path):
        raise CheckpointError(f"--resume: no {last_path} to resume from")
    if is_main:
        os.makedirs(out, exist_ok=True)
        _cleanup_temp(out)

    split = split_for(data, cfg)
    say(split.summary())
    scaler = TimeScaler.fit(data, split)
    mcfg = model_config_for(cfg, data.n_items, scaler)
    seed_everything(cfg.seed)
    model = build_model(mcfg).to(device)

    if is_main:
        data.save(out)
        ckpt.atomic_write_json({"model": mcfg.to_dict(), "train": asdict(cfg), "source": source or {},
                                "n_users": data.n_users, "n_items": data.n_items, "n_events": data.n_events,
                                "time_scaler": asdict(scaler)}, os.path.join(out, "config.json"))

    t_start = time.perf_counter()
    cpu_start = cpu_seconds()
    if isinstance(model, PopularityModel):
        model.fit(train_item_counts(data, split))
        valid = evaluate(model, data, split, "valid", cfg.max_len, exclude_history=cfg.exclude_history,
                         ties=cfg.ties, distributed=distributed)
        history = [dict(epoch=0, loss=float("nan"), valid=valid, seconds=0.0)]
        if is_main:
            ckpt.atomic_save({"model_config": mcfg.to_dict(), "state_dict": model.state_dict(), "epoch": 0,
                              "valid": valid}, os.path.join(out, "model.pt"))
        return _finish(model, data, split, cfg, out, history, t_start, cpu_start, best_epoch=0, is_main=is_main,
                       distributed=distributed, say=say)

    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    logq = None
    if cfg.loss == "sampled":
        q = (train_item_counts(data, split) + 1.0) ** cfg.sampler_alpha
        logq = torch.log(torch.as_tensor(q / q.sum(), dtype=torch.float32)).to(device)

    history: List[dict] = []
    best, best_epoch, bad, start_epoch = -1.0, 0, 0, 1
    if resume:
        st = ckpt.load(last_path)
        if st.get("model_config") != mcfg.to_dict():
            raise CheckpointError(f"--resume: {last_path} was written with a different model/data config")
        model.load_state_dict(st["state_dict"])
        opt.load_state_dict(st["optimizer"])
        history, best, best_epoch, bad = st["history"], st["best"], st["best_epoch"], st["bad_epochs"]
        start_epoch = st["epoch"] + 1
        torch.set_rng_state(st["torch_rng"])
        say(f"resumed from {last_path} after epoch {st['epoch']} (best valid NDCG@10 {best:.4f} at epoch {best_epoch})")
        if st.get("stopped"):
            start_epoch = cfg.epochs + 1

    net = model
    if distributed:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    windows = train_windows(data, split, cfg.max_len)
    per_rank_bs = max(1, cfg.batch_size // world)
    tb = None
    if cfg.tensorboard and is_main:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:
            raise RecsysError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        tb = SummaryWriter(cfg.tensorboard)
    say(f"model {cfg.model}{' (' + cfg.variant + ')' if cfg.model == 'timelstm' else ''}: "
        f"{sum(p.numel() for p in model.parameters())} parameters; {len(windows)} training windows "
        f"(max length {cfg.max_len}); {data.n_items} items; world size {world}")

    stopped = False
    for epoch in range(start_epoch, cfg.epochs + 1):
        t0 = time.perf_counter()
        rng = np.random.default_rng([cfg.seed, epoch])
        perm = rng.permutation(len(windows))
        if world > 1:  # equal shard sizes: wrap around like DistributedSampler
            pad = (-len(perm)) % world
            perm = np.concatenate([perm, perm[:pad]])[rank::world]
        shard = windows[perm]
        model.train()
        tot, nb = 0.0, 0
        n_steps = math.ceil(len(shard) / per_rank_bs)
        bar = None
        if progress and is_main:
            from tqdm.auto import tqdm
            bar = tqdm(total=n_steps, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, dynamic_ncols=True,
                       file=sys.stderr)
        for batch in iterate_batches(data, shard, per_rank_bs):
            batch = batch.to(device)
            opt.zero_grad(set_to_none=True)
            loss = net(batch, loss=cfg.loss, n_neg=cfg.n_neg, sampler_logq=logq)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            tot += float(loss.detach())
            nb += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{tot / nb:.4f}")
        if bar is not None:
            bar.close()
        train_s = time.perf_counter() - t0
        mean_loss = tot / max(nb, 1)
        if distributed:
            v = torch.tensor([mean_loss], dtype=torch.float64, device=device)
            dist.all_reduce(v)
            mean_loss = float(v.cpu()) / world
        valid = evaluate(model, data, split, "valid", cfg.max_len, exclude_history=cfg.exclude_history,
                         ties=cfg.ties, distributed=distributed)
        secs = time.perf_counter() - t0
        history.append(dict(epoch=epoch, loss=mean_loss, valid=valid, seconds=secs, train_seconds=train_s))
        score = valid["NDCG@10"]
        improved = score > best
        if improved:
            best, best_epoch, bad = score, epoch, 0
        else:
            bad += 1
        say(f"epoch {epoch:3d}  loss {mean_loss:.4f}  valid NDCG@10 {valid['NDCG@10']:.4f}  "
            f"HR@10 {valid['HR@10']:.4f}  {train_s:.1f}s train + {secs - train_s:.1f}s eval"
            + ("  *best*" if improved else f"  ({bad}/{cfg.patience} without improvement)"))
        if tb is not None:
            tb.add_scalar("train/loss", mean_loss, epoch)
            for k in ("NDCG@10", "HR@10", "MRR@10"):
                tb.add_scalar(f"valid/{k}", valid[k], epoch)
        stopped = bad >= cfg.patience and epoch >= cfg.min_epochs
        if is_main:
            if improved:
                ckpt.atomic_save({"model_config": mcfg.to_dict(), "state_dict": model.state_dict(),
                                  "epoch": epoch, "valid": valid}, os.path.join(out, "model.pt"))
            ckpt.atomic_save({"model_config": mcfg.to_dict(), "state_dict": model.state_dict(),
                              "optimizer": opt.state_dict(), "epoch": epoch, "history": history, "best": best,
                              "best_epoch": best_epoch, "bad_epochs": bad, "torch_rng": torch.get_rng_state(),
                              "stopped": stopped, "train_config": asdict(cfg)}, last_path)
            plot_curves(history, os.path.join(out, "curves.png"),
                        title=f"{cfg.model}{' (' + cfg.variant + ')' if cfg.model == 'timelstm' else ''}: {os.path.basename(os.path.abspath(out))}")
        if stopped:
            say(f"early stopping: no validation NDCG@10 improvement for {cfg.patience} epochs "
                f"(best {best:.4f} at epoch {best_epoch})")
            break
    if tb is not None:
        tb.close()
    if distributed:
        dist.barrier()
    if not os.path.exists(os.path.join(out, "model.pt")):
        raise RecsysError("no model was saved (0 epochs?)")
    best_state = ckpt.load(os.path.join(out, "model.pt"))
    model.load_state_dict(best_state["state_dict"])
    return _finish(model, data, split, cfg, out, history, t_start, cpu_start, best_epoch, is_main, distributed, say)


def _finish(model, data, split, cfg, out, history, t_start, cpu_start, best_epoch, is_main, distributed, say) -> Dict:
    valid = evaluate(model, data, split, "valid", cfg.max_len, exclude_history=cfg.exclude_history,
                     ties=cfg.ties, distributed=distributed)
    test = evaluate(model, data, split, "test", cfg.max_len, exclude_history=cfg.exclude_history,
                    ties=cfg.ties, distributed=distributed)
    total = time.perf_counter() - t_start
    cpu = cpu_seconds() - cpu_start
    epochs = [h for h in history if h["epoch"] > 0]
    res = dict(model=cfg.model, variant=cfg.variant if cfg.model == "timelstm" else None, split=split.kind,
               best_epoch=best_epoch, epochs_run=len(epochs),
               seconds_per_epoch=(sum(h["seconds"] for h in epochs) / len(epochs)) if epochs else 0.0,
               total_seconds=total, cpu_seconds=cpu, threads=torch.get_num_threads(), peak_rss_mb=peak_rss_mb(), world_size=dist_info()[1],
               valid=valid, test=test, history=history)
    if is_main:
        ckpt.atomic_write_json(res, os.path.join(out, "metrics.json"))
        say(format_table({f"{cfg.model} test": test}))
        say(f"{cfg.model}: best epoch {best_epoch}, {res['epochs_run']} epochs, {res['seconds_per_epoch']:.2f} s/epoch, "
            f"total {total:.1f} s ({cpu:.1f} s CPU, {res['threads']} threads), peak RSS {res['peak_rss_mb']:.0f} MB; "
            f"checkpoint in {out}")
    if distributed:
        dist.barrier()  # no rank leaves (and tears the group down) while rank 0 still writes
    return res
