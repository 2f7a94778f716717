"""What the loop knows of a method: its options, its views, its step, its teacher, its encoder.

A method is one small module: it declares its options (an `Options` dataclass: its recipe for small images and
for ImageNet, each value with its source), the views it wants (by role), builds its heads and teacher, computes
the loss from a batch of views, and keeps its own state (EMA teacher, queue) in its `state_dict`. The loop never
looks inside: it calls `distribute`, `compile`, `step` and `after_step`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from ..errors import UserError
from ..models import EncoderAverage
from ..optim import cosine
from ..options import check_ranges, check_type
from ..queue import EmbeddingQueue
from ..sync_batchnorm import convert_sync_batchnorm
from ..views import ViewSpec


class PerView(nn.Module):
    """net applied to each of several inputs in one call: one forward per view (BatchNorm sees one view at a
    time) and one call through DDP per step, however many views the student sees."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, *xs: torch.Tensor) -> list:
        return [self.net(x) for x in xs]


@dataclass
class Options:
    """A method's options. Each method's own dataclass declares every field with `fastssl.options.recipe` (its value
    for small images and for ImageNet, and their source); these first four, the SGD schedule that the trainer
    builds from them, may change when a run resumes, the method's others define what it trains and may not."""

    lr: float = field(metadata={"help": "base learning rate per 256 images; the trainer scales it by batch/256"})
    weight_decay: float = field(metadata={"help": "SGD weight decay"})
    warmup_epochs: float = field(metadata={"help": "linear warm-up epochs before the per-iteration cosine"})
    final_lr_ratio: float = field(metadata={"help": "the cosine ends at lr x this"})
    method: ClassVar[str] = ""  # set by the registry: the method's name, for messages

    def __post_init__(self):
        check_ranges(self)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def fixed(cls) -> set[str]:
        """The options a resumed run keeps: all but the schedule."""
        return set(cls.names()) - {f.name for f in fields(Options)}

    @classmethod
    def help(cls, name: str) -> str:
        """The option's --help text (the schedule's is declared here, once)."""
        return next(f.metadata["help"] for c in cls.__mro__ if hasattr(c, "__dataclass_fields__")
                    for f in fields(c) if f.name == name and f.metadata.get("help"))

    @classmethod
    def recipe(cls, small: bool) -> dict:
        """The recipe's values: small images (at most 64 px) or ImageNet."""
        return {f.name: f.metadata["small"] if small else f.default for f in fields(cls)}

    @classmethod
    def check_given(cls, given: dict) -> None:
        """A one-line error for an option this method does not have, or a value of the wrong type."""
        own = {f.name: f for f in fields(cls)}
        for name, value in given.items():
            if name not in own:
                raise UserError(f"{cls.method} has no option {name!r}; its options: {', '.join(own)}")
            if value is not None:  # None: the recipe's
                check_type(own[name], value)

    @classmethod
    def resolve(cls, given: dict, small: bool) -> "Options":
        """The recipe's values with those `given` (None: the recipe's) in their place, checked."""
        cls.check_given(given)
        return cls(**{**cls.recipe(small), **{k: v for k, v in given.items() if v is not None}})


METHODS: dict[str, type[Method]] = {}  # by name


def register(cls: type[Method]) -> type[Method]:
    """The class decorator of a method's module: makes the method known by its name."""
    METHODS[cls.name] = cls
    cls.Options.method = cls.name
    return cls


def get(name: str) -> type[Method]:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose {' | '.join(sorted(METHODS))}")
    return METHODS[name]


def check_temperatures(opts: Options) -> None:
    """The relational methods' rule: the teacher's distribution is the sharper one."""
    if opts.tau_t >= opts.tau_s:
        raise UserError(f"tau_t={opts.tau_t} must be smaller than tau_s={opts.tau_s}: the teacher's distribution "
                        f"is the sharper one")


class Method(nn.Module):
    name: ClassVar[str]
    backprops_per_image: ClassVar[int]  # student backward passes per image: the "1x vs 2x" cost
    Options: ClassVar[type[Options]]
    student: nn.Module
    teacher: nn.Module

    @staticmethod
    def view_specs(opts: Options, size: int, mean, std) -> dict[str, ViewSpec]:
        """The specs of the views of one image, by role; pipelines make a batch of each, the `views` of `step`."""
        raise NotImplementedError

    def __init__(self, opts: Options, backbone: nn.Module, *, seed: int = 0, encoder_ema: float = 0.0):
        """opts: the method's options; seed: the run's (queue initialisation, shuffles); encoder_ema: the decay of the
        encoder's running average that is evaluated and exported (0: none)."""
        super().__init__()
        self.opts, self.seed = opts, seed
        # The encoder's running average, in the state_dict so that resume is exact. Built from `backbone`, which
        # every encoder() starts as; its first update copies encoder() anyway.
        self.encoder_average = EncoderAverage(backbone, encoder_ema) if encoder_ema else None
        self.queue: EmbeddingQueue | None = None
        # the last step's student output and the teacher's target for the same images, detached (`diagnostics`)
        self.last_pair: tuple[torch.Tensor, torch.Tensor] | None = None
        object.__setattr__(self, "_student_call", None)  # set by distribute(); kept out of _modules and state_dict

    def step(self, views: dict[str, torch.Tensor], progress: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward pass and loss for one batch; `progress` in [0, 1) drives schedules (EMA momentum)."""
        raise NotImplementedError

    @torch.no_grad()
    def diagnostics(self) -> dict[str, torch.Tensor]:
        """Health of the last step's embeddings on this rank's batch, as device scalars (the loop reads them with the
        loss, in one transfer, at the log step): embedding_std, the per-dimension std of the L2-normalised student
        embeddings x sqrt(dim) (1: spread evenly; towards 0: collapse); effective_rank, RankMe's exp(entropy) of
        their singular values (Garrido et al., ICML 2023); agreement, the mean cosine of the student's output and
        the teacher's target for the same images; the queue's fill and age."""
        if self.last_pair is None:
            return {}
        student, teacher = (F.normalize(t.float(), dim=1) for t in self.last_pair)
        singular = torch.linalg.svdvals(student)
        p = singular / singular.sum() + 1e-12
        stats = {"embedding_std": student.std(0).mean() * student.shape[1] ** 0.5,
                 "effective_rank": torch.exp(-(p * p.log()).sum()),
                 "agreement": (student * teacher).sum(1).mean()}
        return {**stats, **(self.queue.diagnostics() if self.queue is not None else {})}

    def student_forward(self, *xs: torch.Tensor) -> list:
        """The student on each view, in one call (through DDP under torchrun)."""
        return (self._student_call or PerView(self.student))(*xs)

    def after_step(self) -> None:
        """What follows the optimiser step: the staged keys into the queue, the encoder's running average."""
        if self.queue is not None:
            self.queue.commit()
        if self.encoder_average is not None:
            self.encoder_average.update(self.encoder())

    def online_encoder(self) -> nn.Module:
        """The student's backbone: the one the gradients train (the online probe reads its features)."""
        return self.student[0]

    def encoder(self) -> nn.Module:
        """The method's trained backbone (the student's; ReSA: the momentum encoder)."""
        return self.online_encoder()

    def evaluated_encoder(self) -> nn.Module:
        """The backbone the kNN monitor evaluates and the run exports: encoder(), or its running average."""
        return self.encoder() if self.encoder_average is None else self.encoder_average.module

    def trainable(self) -> nn.Module:
        """The module whose parameters the optimiser updates."""
        return self.student

    def distribute(self, device: torch.device, sync_bn: bool) -> None:
        """Under torchrun: DDP around the student (gradients averaged over ranks), held outside the method's
        modules so that checkpoints hold each weight once; with sync_bn, BatchNorm statistics over the global
        batch in the student and the teacher (SyncFreeBatchNorm: torch's SyncBatchNorm without its host sync)."""
        if sync_bn:
            self.student = convert_sync_batchnorm(self.student)
            self.teacher = convert_sync_batchnorm(self.teacher)
        # BN running statistics are averaged over ranks when they are read (fastssl.dist), not broadcast from
        # rank 0 at every forward.
        ddp = DistributedDataParallel(PerView(self.student), device_ids=[device.index] if device.type == "cuda"
                                      else None, forward_sync_buffers=False)
        object.__setattr__(self, "_student_call", ddp)

    def networks(self) -> list[nn.Module]:
        """The modules `step` calls: --compile compiles each of them."""
        return [self.student, self.teacher]

    def compile(self) -> None:
        """torch.compile each network `step` calls, in place. Under DDP the compiled student runs inside DDP's forward,
        where dynamo hands the graph to its DDPOptimizer: split at the gradient buckets' boundaries, so the all-reduce
        of each bucket overlaps the rest of the backward. The encoder's average only runs in evaluation."""
        for net in self.networks():
            net.compile()


def cosine_momentum(base: float, progress: float) -> float:
    """BYOL's schedule: base at the start, 1 at the end."""
    return 1 - (1 - base) * cosine(progress)
