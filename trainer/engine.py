"""The engine seam: the one place that knows DDP from DeepSpeed.

The loop and the task are the same for both engines: the loop runs ``engine.model`` (the wrapped student)
through the task, hands the loss to ``engine.backward`` and calls ``engine.step`` once per optimiser step. Only
the student is wrapped and optimised; the teacher is a separate module the engine never sees. Precision is
the engine's business too: DDP runs under torch.autocast (bf16, or fp16 with a GradScaler), DeepSpeed casts
through its own bf16/fp16 config (or its ``torch_autocast`` mode); CPU runs fp32.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from trainer.config import JobConfig

log = logging.getLogger("bgsplit.engine")


def autocast_dtype(precision: str, device: torch.device, bf16_supported: bool | None = None) -> torch.dtype | None:
    """The mixed-precision dtype a run computes in, or None for fp32.

    "auto" is bf16 on a GPU that has it, fp16 (with a loss scaler) on one that does not (V100, T4), and fp32 on
    CPU, where autocast is slower than fp32 on most machines. An explicit "bf16" or "fp16" is honoured on any
    device (CPU autocast supports both), so the GPU precision paths, checkpoint names included, can be exercised
    on a CPU machine."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16_supported else torch.float16


def ddp_module(model: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """The DistributedDataParallel inside ``model``, looking through torch.compile's wrapper: ``no_sync`` lives
    there, and missing it on a compiled student all-reduces every micro-batch of an accumulated step."""
    inner = getattr(model, "_orig_mod", model)
    return inner if isinstance(inner, nn.parallel.DistributedDataParallel) else None


def param_groups(student: nn.Module, trunk_lr_mult: float, split: bool = False) -> list[dict[str, Any]]:
    """The trainable parameters as {trunk, heads} groups, each with its ``lr_mult`` (the schedule's factor) and
    ``role`` (the schedule holds the trunk's LR at 0 during LP-FT's probe phase).

    One group when the multiplier is 1 and ``split`` is not asked for. A lower trunk LR keeps a pre-trained trunk
    near its features while new heads train (bench/aux_study.py: at the demo's LR the trunk leaves the teacher's
    features within 10 steps)."""
    trainable = [p for p in student.parameters() if p.requires_grad]
    trunk_module = getattr(student, "trunk", None)
    if (trunk_lr_mult == 1.0 and not split) or trunk_module is None:
        return [{"params": trainable, "lr_mult": 1.0, "role": "all"}]
    trunk_ids = {id(p) for p in trunk_module.parameters()}
    groups = [{"params": [p for p in trainable if id(p) in trunk_ids], "lr_mult": trunk_lr_mult, "role": "trunk"},
              {"params": [p for p in trainable if id(p) not in trunk_ids], "lr_mult": 1.0, "role": "heads"}]
    return [g for g in groups if g["params"]]


def build_optimizer(student: nn.Module, cfg: JobConfig) -> torch.optim.Optimizer:
    groups = param_groups(student, cfg.optim.trunk_lr_mult, split=cfg.optim.lp_epochs > 0)
    if cfg.optim.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                               weight_decay=cfg.optim.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)


class Engine:
    """What the loop needs from a data-parallel wrapper. ``student`` is the bare module (evaluation, export);
    ``model`` is what the forward pass goes through."""

    name = "base"

    def __init__(self, student: nn.Module, optimizer: torch.optim.Optimizer, cfg: JobConfig, device: torch.device):
        self.student, self.optimizer, self.cfg, self.device = student, optimizer, cfg, device
        self.model: nn.Module = student

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool, micro_batches: int) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """What rank 0 writes into state.pt for this engine."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def student_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The full student weights for rank 0's state.pt (a collective call under ZeRO-3)."""
        return self.student.state_dict()

    sharded_save: Callable[[str], None] | None = None
    """Set by engines whose state is split over ranks: writes this rank's files into a local folder."""

    def load_sharded(self, folder: str) -> None: ...


class DDPEngine(Engine):
    """torch DistributedDataParallel when a process group runs with more than one rank, else the module itself."""

    name = "ddp"

    def __init__(self, student: nn.Module, optimizer: torch.optim.Optimizer, cfg: JobConfig, device: torch.device):
        super().__init__(student, optimizer, cfg, device)
        self.dtype = autocast_dtype(cfg.run.precision, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        model: nn.Module = student
        if dist.is_initialized() and dist.get_world_size() > 1:
            # the aux head gets no gradient in the fine-tuning baseline (lambda = 0)
            unused = cfg.loss.aux_weight <= 0
            model = nn.parallel.DistributedDataParallel(
                student, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=unused)
        if cfg.engine.compile and device.type == "cuda":
            model = torch.compile(model)
        self.model = model

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool, micro_batches: int) -> None:
        # gradients are all-reduced on the last micro-batch only
        ddp = ddp_module(self.model)
        with contextlib.nullcontext() if last or ddp is None else ddp.no_sync():
            self.scaler.scale(loss / micro_batches).backward()

    def step(self) -> None:
        if self.cfg.optim.clip_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.optim.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def deepspeed_config(cfg: JobConfig, device: torch.device, world: int) -> dict[str, Any]:
    """The DeepSpeed JSON config derived from the job config, so there is one source of truth."""
    dtype = autocast_dtype(cfg.run.precision, device)
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "train_batch_size": cfg.data.batch_size * cfg.optim.grad_accum * world,
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        "zero_allow_untested_optimizer": True,  # a torch optimiser: no DeepSpeed op to JIT-compile
        "gradient_clipping": cfg.optim.clip_grad_norm,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if dtype is not None and cfg.engine.torch_autocast:
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16" if dtype == torch.bfloat16 else "float16"}
    elif dtype is not None:
        # DeepSpeed casts the parameters only; BatchNorm's running statistics must share their weights' dtype
        # or the first forward fails ("expected scalar type BFloat16 but found Float"). engine.torch_autocast
        # keeps weights and statistics in fp32 instead.
        name = "bf16" if dtype == torch.bfloat16 else "fp16"
        ds[name] = {"enabled": True}
        ds["data_types"] = {"buffer_dtype": name}
    return ds


class DeepSpeedEngine(Engine):
    """DeepSpeed with ZeRO 0-3 around the student and a torch optimiser; checkpoints through DeepSpeed's own
    partitioned files, which the checkpoint writer uploads next to state.pt."""

    name = "deepspeed"
    TAG = "state"

    def __init__(self, student: nn.Module, optimizer: torch.optim.Optimizer, cfg: JobConfig, device: torch.device):
        super().__init__(student, optimizer, cfg, device)
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        world = dist.get_world_size() if dist.is_initialized() else 1
        if not dist.is_initialized():
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("LOCAL_RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.ds_config = deepspeed_config(cfg, device, world)
        # DeepSpeed's bf16/fp16 modes cast every parameter and keep an fp32 master only of those it optimises:
        # the frozen prefix (model.frozen_stages) keeps its fp32 weights here, so a checkpoint holds them exactly
        frozen = student.frozen_state_names() if hasattr(student, "frozen_state_names") else set()
        self.frozen_fp32 = {name: t.detach().cpu().clone() for name, t in student.state_dict().items()
                            if name in frozen}
        engine, ds_optimizer, _, _ = deepspeed.initialize(model=student, optimizer=optimizer, config=self.ds_config)
        self.model = engine
        self.engine = engine
        self.ds_optimizer = ds_optimizer
        if cfg.engine.compile and device.type == "cuda":
            engine.compile()
        self.sharded_save = self._save_sharded

    def backward(self, loss: torch.Tensor, last: bool, micro_batches: int) -> None:
        # DeepSpeed divides by gradient_accumulation_steps itself and steps only at the boundary
        self.engine.backward(loss)
        self.engine.step()

    def step(self) -> None:
        """Already taken in ``backward``: DeepSpeed updates at its own accumulation boundary."""

    def student_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full fp32 weights: the optimiser's fp32 master of every parameter where DeepSpeed keeps one (bf16/fp16
        modes, ZeRO 1-3: partitions are gathered, so every rank calls this), buffers cast up to fp32. state.pt
        is what evaluation, export and a resume onto another world size read, so it must not be bf16-rounded."""
        from deepspeed.utils import safe_get_full_fp32_param

        state = {}
        for name, param in self.student.named_parameters():
            if name in self.frozen_fp32:
                state[name] = self.frozen_fp32[name].clone()
                continue
            full = safe_get_full_fp32_param(param)  # a collective under ZeRO; None where the param is the master
            state[name] = (param.detach() if full is None else full).float().cpu().clone()
        persistent = self.student.state_dict(keep_vars=True).keys()
        for name, buffer in self.student.named_buffers():
            if name in self.frozen_fp32:
                state[name] = self.frozen_fp32[name].clone()
            elif name in persistent:
                state[name] = buffer.detach().float().cpu().clone() if buffer.is_floating_point() else buffer.cpu()
        return state

    def own_files(self, tag: str) -> set[str]:
        """The names of this rank's files in a DeepSpeed checkpoint, as the installed DeepSpeed writes them
        (ZeRO 1-2 in bf16 prefix them "bf16_", ZeRO-3 adds per-rank model states), not a hand-kept list."""
        names = {os.path.basename(self.engine._get_ckpt_name("", tag))}
        if hasattr(self.engine.optimizer, "dp_process_group"):  # DeepSpeed's own test for writing them
            names.add(os.path.basename(self.engine._get_zero_ckpt_name("", tag)))
        return names

    def _save_sharded(self, folder: str) -> None:
        self.engine.save_checkpoint(folder, tag=self.TAG, save_latest=False)

    def load_sharded(self, folder: str) -> None:
        path, _ = self.engine.load_checkpoint(folder, tag=self.TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint files in {folder}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_engine(student: nn.Module, optimizer: torch.optim.Optimizer, cfg: JobConfig,
                 device: torch.device) -> Engine:
    return (DeepSpeedEngine if cfg.engine.name == "deepspeed" else DDPEngine)(student, optimizer, cfg, device)
