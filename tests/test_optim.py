"""Optimizers: every preset builds with its config fields, trains a tiny batch, names are checked;
the eager subclasses do torch's arithmetic bit for bit and never import torch._dynamo."""
from __future__ import annotations

import inspect
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import scaling.config
from scaling.cli import CONF_DIR
from scaling.config import OPTIMIZERS as OPTIMIZER_NAMES, ConfigError, ModelConfig, OptimizerConfig
from scaling.models import build_model
from scaling.optim import OPTIMIZERS, build_optimizer, effective_lr, lr_exponent

CONF = CONF_DIR / "optimizer"
LRS = {"sgd": 0.1, "adam": 0.01, "adamw": 0.01, "adagrad": 0.05, "rmsprop": 0.003}


def preset(name: str, **kw):
    """Return scaling/conf/optimizer/<name>.yaml on top of the schema, as Hydra composes it."""
    cfg = OmegaConf.merge(OmegaConf.structured(OptimizerConfig), OmegaConf.load(CONF / f"{name}.yaml"))
    return OmegaConf.merge(cfg, kw)


def test_registry_matches_config_and_presets():
    assert tuple(OPTIMIZERS) == OPTIMIZER_NAMES
    assert sorted(p.stem for p in CONF.glob("*.yaml")) == sorted(OPTIMIZER_NAMES)


def test_reexports():
    assert effective_lr is scaling.config.effective_lr
    assert lr_exponent is scaling.config.lr_exponent
    assert lr_exponent("sqrt") == 0.5


TORCH_CLASSES = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
                 "adagrad": torch.optim.Adagrad, "rmsprop": torch.optim.RMSprop}


@pytest.mark.parametrize("name,want", [
    ("sgd", {"momentum": 0.8, "nesterov": True, "weight_decay": 1e-4}),
    ("adam", {"betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 1e-4}),
    ("adamw", {"betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 1e-4}),
    ("adagrad", {"eps": 1e-6, "weight_decay": 1e-4}),
    ("rmsprop", {"alpha": 0.9, "eps": 1e-6, "momentum": 0.8, "weight_decay": 1e-4}),
])
def test_config_fields_reach_torch(name, want):
    cls = TORCH_CLASSES[name]
    cfg = preset(name, momentum=0.8, nesterov=name == "sgd", weight_decay=1e-4, beta1=0.8, beta2=0.95,
                 eps=1e-6, alpha=0.9)
    opt = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(3))], lr=0.02)
    assert type(opt).__mro__[1] is cls and type(opt).__name__ == cls.__name__  # torch's class, eager (below)
    group = opt.param_groups[0]
    assert group["lr"] == 0.02
    assert {k: group[k] for k in want} == want


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_training_decreases_loss(name):
    torch.manual_seed(0)
    x, y = torch.randn(32, 40), torch.randint(0, 10, (32,))
    model = build_model(OmegaConf.structured(ModelConfig(width=32, depth=1)), (40,), 10)
    opt = build_optimizer(preset(name), model.parameters(), lr=LRS[name])
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_eager_optimizers_train_bit_for_bit_as_torchs_own(name):
    """The same steps through torch's class and build_optimizer's eager subclass: identical parameters
    and state, with a warmup schedule, step hooks and a state_dict round trip mid-way; the result pickles."""
    cfg = preset(name, momentum=0.8, nesterov=name == "sgd", weight_decay=1e-3)
    cls = TORCH_CLASSES[name]
    defaults = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(1))], 0.1).defaults
    kwargs = {k: v for k, v in defaults.items() if k in inspect.signature(cls).parameters}
    x, y = torch.randn(64, 40, generator=torch.Generator().manual_seed(1)), torch.arange(64) % 10

    def train(make):
        torch.manual_seed(0)
        model = build_model(OmegaConf.structured(ModelConfig(width=32, depth=2)), (40,), 10)
        opt = make(model.parameters())
        hook_calls = []
        opt.register_step_post_hook(lambda o, args, kw: hook_calls.append(1))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 4))
        for step in range(8):
            if step == 4:  # what a resumed trial does: a new optimizer loads the saved state
                saved = opt.state_dict()
                opt = make(model.parameters())
                opt.load_state_dict(saved)
                opt.register_step_post_hook(lambda o, args, kw: hook_calls.append(1))
                sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 4),
                                                          last_epoch=step - 1)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[step * 8:(step + 1) * 8]), y[step * 8:(step + 1) * 8]).backward()
            opt.step()
            sched.step()
        assert len(hook_calls) == 8
        return model, opt

    ref_model, ref_opt = train(lambda p: cls(p, **kwargs))
    model, opt = train(lambda p: build_optimizer(cfg, p, 0.1))
    for a, b in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(a, b)
    copied = pickle.loads(pickle.dumps(opt))  # as torch's own optimizers pickle
    assert type(copied) is type(opt) and len(copied.state) == len(opt.state) > 0
    ref_state, state = ref_opt.state_dict(), opt.state_dict()
    assert ref_state["param_groups"] == state["param_groups"]
    for i, buffers in ref_state["state"].items():
        for k, v in buffers.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(state["state"][i][k])), (i, k)


def test_a_trial_never_imports_torch_dynamo():
    """torch.optim's compiler decorators import torch._dynamo (~1 s of CPU) on first use; a trial
    (optimizer, schedule, noise scale, clipping, checkpoint and resume) must not: it is every trial
    worker's start-up."""
    code = """
import sys
import torch
from scaling.cli import compose
from scaling.train import run_trial
from scaling.reporters import Reporter

class Keep(Reporter):
    state = None
    def report(self, metrics, checkpoint=None):
        if checkpoint is not None and self.state is None:
            self.state = checkpoint()

for name in ("sgd", "adam", "adamw", "adagrad", "rmsprop"):
    cfg = compose(["data.n_samples=600", "epochs=1", "eval_every=0.5", "batch_size=32", "model.width=16",
                   "mlflow.enabled=false", "threads=1", f"optimizer={name}", "optimizer.grad_clip=1.0",
                   "gns.enabled=true", "micro_batch_size=16", "schedule=cosine", "warmup.epochs=0.25"])
    keep = Keep()
    assert run_trial(cfg, keep).status == "completed"
    assert keep.state is not None
    assert run_trial(cfg, Reporter(), resume=keep.state).status == "completed"
print("torch._dynamo imported:", "torch._dynamo" in sys.modules)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch._dynamo imported: False" in proc.stdout, proc.stdout[-2000:]


def test_unknown_name_raises():
    with pytest.raises(ConfigError, match="optimizer.name='lion'"):
        build_optimizer(OmegaConf.create({"name": "lion"}), [torch.nn.Parameter(torch.zeros(1))], lr=0.1)


def test_nonpositive_lr_raises():
    with pytest.raises(ConfigError, match="lr"):
        build_optimizer(preset("sgd"), [torch.nn.Parameter(torch.zeros(1))], lr=0.0)
