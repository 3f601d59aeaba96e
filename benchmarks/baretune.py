"""Row 2f's baseline: the benchmark study's 32 trials as a bare Ray Tune script, without the tool.

What someone who knows Ray Tune would write by hand for the same grid: one function trainable
(the MLP, plain SGD steps, a validation pass every 0.1 epoch and a `tune.report` with it), a grid
search over the trials, one CPU each, actors reused. It has no Hydra, no MLflow, no ASHA, no
checkpoints, no divergence or memory checks and no progress line, so the study's wall against
this one is what the tool adds on top of Ray Tune and torch themselves.

It is given the tool's own lean choices, so that they do not flatter the tool: the same Ray start
(`scaling.local_ray.init_ray`, row 2c) and torch imported only in the workers. The harness writes
the trials and the data (the study's own MNIST-1D split, as tensors) to files before any timing.

    python -m benchmarks.baretune SPEC.json   # prints one JSON line: statuses, best val loss per batch size
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any


def train(config: dict, trials: list[dict], data_path: str) -> None:
    """One trial: train, evaluate every `eval_every` epochs, report val loss and samples."""
    import torch
    import torch.nn.functional as F
    from ray import tune

    t = trials[config["trial"]]
    torch.set_num_threads(1)
    d = torch.load(data_path)
    x, y, x_val, y_val = d["x_train"], d["y_train"], d["x_val"], d["y_val"]
    torch.manual_seed(t["seed"])
    w = t["width"]  # the default MLP: two hidden layers, ReLU, torch's default initialisation
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(x[0].numel(), w), torch.nn.ReLU(),
                                torch.nn.Linear(w, w), torch.nn.ReLU(), torch.nn.Linear(w, int(y.max()) + 1))
    opt = torch.optim.SGD(model.parameters(), lr=t["lr"], momentum=t["momentum"], weight_decay=t["weight_decay"])
    B, n = t["batch_size"], len(y)
    per_epoch = n / B  # the trial loop's budget: e epochs are e x n samples, to the nearest step
    total, per_eval = max(1, round(t["epochs"] * per_epoch)), t["eval_every"] * per_epoch
    # the trial loop's evaluations (scaling.train.eval_steps): the k-th after k x eval_every epochs, to the
    # nearest step, and the last step
    evals = {min(total, max(1, round(k * per_eval))) for k in range(1, math.ceil(total / per_eval) + 1)} | {total}
    best, perms = math.inf, {}

    def perm(epoch: int) -> torch.Tensor:  # the trial loop's data order (a function of seed and epoch),
        if epoch not in perms:  # so that the same trials train
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(t["seed"] * 1_000_003 + epoch))
        return perms[epoch]

    for step in range(total):
        epoch, off = divmod(step * B, n)  # read straight across epoch boundaries, B samples a step
        idx = perm(epoch)[off:off + B]
        if len(idx) < B:
            idx = torch.cat((idx, perm(epoch + 1)[:B - len(idx)]))
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        if step + 1 in evals:
            with torch.no_grad():
                val = F.cross_entropy(model(x_val), y_val).item()
            if not math.isfinite(val):
                tune.report({"val_loss": val, "best_val_loss": best, "samples": (step + 1) * B, "diverged": 1})
                return
            best = min(best, val)
            tune.report({"val_loss": val, "best_val_loss": best, "samples": (step + 1) * B, "diverged": 0})


def main(spec_path: str) -> dict[str, Any]:
    import ray
    from ray import tune

    from scaling.local_ray import init_ray  # only the Ray start: os and logging, no torch, Hydra or MLflow

    spec = json.loads(Path(spec_path).read_text())
    trials = spec["trials"]
    init_ray(None, spec["concurrency"], 0)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(train, trials=trials, data_path=spec["data_path"]), {"cpu": 1}),
        param_space={"trial": tune.grid_search(list(range(len(trials))))},
        tune_config=tune.TuneConfig(reuse_actors=True),
        run_config=tune.RunConfig(name=f"bare-{int(time.time())}", storage_path=spec["storage_path"], verbose=0))
    results = tuner.fit()
    statuses: dict[str, int] = {}
    best: dict[int, float] = {}
    for r in results:
        m = r.metrics or {}
        status = "error" if r.error else ("diverged" if m.get("diverged") else "completed")
        statuses[status] = statuses.get(status, 0) + 1
        b = trials[r.config["trial"]]["batch_size"]
        if status == "completed" and math.isfinite(m.get("best_val_loss", math.inf)):
            best[b] = min(best.get(b, math.inf), m["best_val_loss"])
    ray.shutdown()
    return {"statuses": statuses, "best_per_batch_size": dict(sorted(best.items()))}


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_file():
        sys.exit(f"error: SPEC={sys.argv[1:]!r}: needs one existing JSON file (python -m benchmarks.baretune SPEC.json)")
    print(json.dumps(main(sys.argv[1])))
