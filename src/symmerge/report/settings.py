"""The report's settings: the same names at every scale (:data:`SETTING_NAMES`; a scale may
add its own), each a recipe of source checkpoints, merge data and test sets.

Which methods a setting runs is read from their registered capabilities
(:func:`symmerge.methods.method_info`), never from a list of names, so a newly registered
method enters every setting it can run in. A setting adds rows of its own: ``+ REPAIR`` for
every data-free method where ``repair`` is set (on the same data as the data-using methods),
and one row per budget for methods with a target width where ``budgets`` is set.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from symmerge.methods import MethodInfo, method_info

__all__ = [
    "CPU_EXTRA",
    "CPU_PARAMS",
    "DEFAULT_SEEDS",
    "DESCRIPTION_FIELDS",
    "definition_of",
    "SCALES",
    "SETTING_NAMES",
    "Job",
    "Setting",
    "Source",
    "TestSet",
    "applicability",
    "jobs",
    "settings_for",
]

SCALES = ("smoke", "cpu", "paper")

#: Every scale defines at least these settings (with models and data of its size); the smoke
#: scale exactly these.
SETTING_NAMES = (
    "same-task",
    "n-models",
    "cross-dataset",
    "disjoint-classes",
    "budgets",
    "non-iid",
    "sharded",
    "widths",
)


@dataclass(frozen=True)
class Source:
    """One source checkpoint: the arguments of ``symmerge train``.

    ``seed`` is an offset: the checkpoint of report seed ``s`` is trained with seed
    ``1000 * s + seed``, so the sources of one setting differ and seeds do not collide.
    ``split``/``part``/``n_parts`` train on one part of a split of the training set, cut with
    the report seed (:func:`symmerge.data.split_indices`).
    """

    dataset: str
    model: str
    seed: int
    classes: tuple[int, ...] | None = None
    split: str | None = None
    part: int | None = None
    n_parts: int | None = None
    epochs: int = 2
    limit_train: int | None = None

    def recipe(self, report_seed: int) -> dict[str, Any]:
        """The ``train_model`` arguments of this source at ``report_seed`` (JSON-ready)."""
        return {
            "model": self.model,
            "dataset": self.dataset,
            "classes": None if self.classes is None else list(self.classes),
            "seed": 1000 * report_seed + self.seed,
            "epochs": self.epochs,
            "limit_train": self.limit_train,
            "split": self.split,
            "part": self.part,
            "n_parts": self.n_parts,
            "split_seed": report_seed if self.split else None,
        }


@dataclass(frozen=True)
class TestSet:
    """A test split, optionally restricted to some classes."""

    dataset: str
    classes: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Setting:
    """A comparison: sources merged by every applicable method on the same data.

    Attributes:
        name, title: the setting's name and a line saying it.
        sources: the checkpoints merged (their order is the models' order).
        tests: the test sets; ``accuracy`` is their mean (``metric="mean"``) or, for sources
            trained on disjoint classes (``metric="joint"``), the joint accuracy over the
            sources' classes on the one test set.
        data: the data source spec (:mod:`symmerge.sources`) every data-using method and
            every renormalisation gets; ``samples`` images of each dataset in it.
        heads: ``merge``'s ``heads``.
        repair: add a ``+ REPAIR`` row for every data-free method.
        budgets: run only methods with a target width, once per budget (compute relative to
            one source): ``budget=B`` where the method takes it, else ``width=round(B * n)``.
        block_sparse: export merges block-sparse (same outputs), so that the compute counted
            is the compute spent (a side-by-side block costs its block, not a dense layer).
        reset_bn: recompute the BatchNorm statistics on the setting's data after every merge
            that ``merge()`` says left them interpolated (:class:`BatchNormStatsWarning`), as
            the papers do for BatchNorm networks; a method that fits them (kf-linear, ...)
            keeps its own. Such a run records ``renorm: "reset-bn"``.
        params: per-method keywords for this setting.
        stand_in: the papers' setting this one stands in for, and how it differs.
    """

    name: str
    title: str
    sources: tuple[Source, ...]
    tests: tuple[TestSet, ...]
    data: str
    samples: int
    metric: str = "mean"
    heads: str = "shared"
    repair: bool = False
    budgets: tuple[float, ...] = ()
    block_sparse: bool = True
    reset_bn: bool = False
    params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    stand_in: str = ""

    def __post_init__(self) -> None:
        if self.metric not in ("mean", "joint"):
            raise ValueError(f"setting {self.name!r}: metric must be 'mean' or 'joint'")
        if self.heads == "per-task" and self.metric != "joint":
            raise ValueError(f"setting {self.name!r}: per-task heads are measured by 'joint'")
        if self.metric == "joint" and len(self.tests) != 1:
            raise ValueError(f"setting {self.name!r}: 'joint' needs exactly one test set")

    @property
    def unequal_widths(self) -> bool:
        return len({s.model for s in self.sources}) > 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (what ``meta.settings`` records)."""
        out = asdict(self)
        out["params"] = {k: dict(v) for k, v in self.params.items()}
        return _jsonable(out)

    def definition(self) -> dict[str, Any]:
        """What the setting's numbers depend on: :meth:`to_dict` less the words
        (``title``, ``stand_in``). Runs are keyed by it; a folder's runs of a setting whose
        definition changed are not reused or kept."""
        return definition_of(self.to_dict())


#: Fields of :class:`Setting` that describe it in words and change no number.
DESCRIPTION_FIELDS = ("title", "stand_in")


def definition_of(recorded: dict[str, Any]) -> dict[str, Any]:
    """The definition (:meth:`Setting.definition`) of a setting as a results file records it
    (:meth:`Setting.to_dict`)."""
    return {k: v for k, v in recorded.items() if k not in DESCRIPTION_FIELDS}


@dataclass(frozen=True)
class Job:
    """One row of a setting's table: a method with its keywords and renormalisation.

    ``error`` marks a row that cannot run (recorded as failed with that reason).
    """

    method: str
    label: str
    params: dict[str, Any] = field(default_factory=dict)
    renorm: str | None = None
    budget: float | None = None
    error: str | None = None


#: Methods whose ``+ REPAIR`` row would repeat their own: the side-by-side ensemble averages
#: no unit, so REPAIR leaves it exactly as it is.
NO_REPAIR_ROW = frozenset({"ensemble"})


def applicability(setting: Setting, info: MethodInfo) -> str | None:
    """Why ``info``'s method does not run in ``setting`` (``None`` when it does)."""
    n = len(setting.sources)
    if not info.accepts(n):
        return f"merges at most {info.max_models} models, the setting has {n}"
    if setting.unequal_widths and not info.unequal_widths:
        return "needs equal widths"
    if setting.budgets and not info.target_width:
        return "has no target width"
    return None


def jobs(setting: Setting, methods: Sequence[str]) -> list[Job]:
    """The rows ``setting`` runs for ``methods`` (registered names), in their order."""
    out: list[Job] = []
    width = _hidden_width(setting.sources[0].model)
    for name in methods:
        info = method_info(name)
        if applicability(setting, info) is not None:
            continue
        params = dict(setting.params.get(name, {}))
        if setting.budgets:
            for b in setting.budgets:
                extra, error = _budget_params(info, b, width)
                out.append(Job(name, f"{name} @{b:g}x", {**params, **extra}, budget=b,
                               error=error))  # fmt: skip
            continue
        out.append(Job(name, name, params))
        if setting.repair and not info.needs_data and name not in NO_REPAIR_ROW:
            out.append(Job(name, f"{name} + REPAIR", params, renorm="repair"))
    return out


def _budget_params(
    info: MethodInfo, budget: float, width: int | None
) -> tuple[dict[str, Any], str | None]:
    taken = inspect.signature(info.fn).parameters
    if "budget" in taken:
        return {"budget": budget}, None
    if "width" in taken and width is not None:
        return {"width": round(budget * width)}, None
    if "width" in taken:
        return {}, (f"'{info.name}' takes a target width, not a budget, and this setting's "
                    "model has no single hidden width to scale")  # fmt: skip
    return {}, f"'{info.name}' has a target width but takes neither budget= nor width="


def _hidden_width(model: str) -> int | None:
    """The hidden width of an MLP, which a budget scales into a target width; ``None`` for
    models whose layers differ in width (a ResNet's ``width`` is a multiplier)."""
    from symmerge.models import parse_model_name
    from symmerge.models.mlp import MLP

    arch, kwargs = parse_model_name(model)
    if arch != "mlp":
        return None
    return int(kwargs.get("width", inspect.signature(MLP).parameters["width"].default))


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------------------
# the settings at each scale
# --------------------------------------------------------------------------------------

#: Smoke scale: tiny MLPs (2 hidden layers of 128), 2 epochs on 5000 training images.
SMOKE_MLP = "mlp-w128-d2"
SMOKE_NARROW = "mlp-w64-d2"
SMOKE_TRAIN = {"epochs": 2, "limit_train": 5000}
SMOKE_SAMPLES = 1000
#: Method keywords of every smoke setting: STE for 100 steps at the authors' rate for small
#: merge sets (their default length, one epoch, is 2-4 steps of these 1000-2000 images).
SMOKE_PARAMS = {"ste": {"steps": 100, "lr": 0.5}}


def _smoke() -> dict[str, Setting]:
    def src(dataset: str, seed: int, **kw: Any) -> Source:
        return Source(dataset, kw.pop("model", SMOKE_MLP), seed, **SMOKE_TRAIN, **kw)

    mnist = (TestSet("mnist"),)
    both = (TestSet("mnist"), TestSet("fashion-mnist"))
    cross = (src("mnist", 0), src("fashion-mnist", 1))
    split = {"split": "dirichlet", "n_parts": 2}
    shards = {"split": "shards", "n_parts": 2}
    common: dict[str, Any] = {"samples": SMOKE_SAMPLES, "params": SMOKE_PARAMS}
    settings = [
        Setting("same-task", "two MNIST MLPs (different seeds)",
                (src("mnist", 0), src("mnist", 1)), mnist, "mnist", repair=True,
                stand_in="Git Re-Basin's MNIST MLP (784-512-512-512-10, trained to "
                "convergence); here 784-128-128-10 after 2 epochs on 5000 images", **common),
        Setting("n-models", "three MNIST MLPs merged at once",
                (src("mnist", 0), src("mnist", 1), src("mnist", 2)), mnist, "mnist",
                repair=True, stand_in="C2M3's MLP on EMNIST letters, 3 models (EMNIST is "
                "not available offline: MNIST stands in)", **common),
        Setting("cross-dataset", "an MNIST and a Fashion-MNIST MLP, one shared 10-way head",
                cross, both, "mnist,fashion-mnist", repair=True,
                stand_in="Yamada et al.'s MNIST/Fashion-MNIST pair (784-512x3, 100 epochs); "
                "STE here for 100 steps at lr 0.5 on 1000 images of each dataset", **common),
        Setting("disjoint-classes", "MNIST classes 0-4 vs 5-9, a head per task",
                (src("mnist", 0, classes=tuple(range(5))),
                 src("mnist", 1, classes=tuple(range(5, 10)))),
                mnist, "mnist", metric="joint", heads="per-task", repair=True,
                stand_in="ZipIt!/MuDSC's CIFAR-10 5+5 with ResNet-20x4 and CLIP text heads; "
                "here MNIST MLPs with each model's own head on the merged features",
                **common),
        Setting("budgets", "the cross-dataset pair merged at compute budgets 1x-2x",
                cross, both, "mnist,fashion-mnist", budgets=(1.0, 1.5, 2.0),
                stand_in="PLeaS's DomainNet ResNet-50 pairs (unavailable offline): the "
                "MNIST/Fashion-MNIST pair with one shared head stands in; MuDSC in its zip "
                "variant (the one with a target width)",
                **{**common, "params": {**SMOKE_PARAMS, "mudsc": {"variant": "zip"}}}),
        Setting("non-iid", "MNIST MLPs trained on the two parts of a Dirichlet split",
                (src("mnist", 0, part=1, **split), src("mnist", 1, part=2, **split)),
                mnist, "mnist", repair=True,
                stand_in="neuron-interpolation fusion's non-IID VGG11 / CIFAR-10 parents; "
                "here MNIST MLPs on Dirichlet parts (concentrations 1-5 per class)", **common),
        Setting("sharded", "MNIST MLPs trained on disjoint shards of whole classes",
                (src("mnist", 0, part=1, **shards), src("mnist", 1, part=2, **shards)),
                mnist, "mnist", repair=True,
                stand_in="neuron-interpolation fusion's sharded ViT / CIFAR-100 parents; "
                "here MNIST MLPs on 5 classes each, tested on all 10", **common),
        Setting("widths", "MNIST MLPs of different widths (128 and 64)",
                (src("mnist", 0), src("mnist", 1, model=SMOKE_NARROW)), mnist, "mnist",
                repair=True, stand_in="fusion of parents of different widths (OT fusion, "
                "neuron interpolation); merged at the wider width or the method's own",
                **common),
    ]  # fmt: skip
    return {s.name: s for s in settings}


# CPU scale: the zoo MLP (784-512-512-512-10) trained on the full training sets, and
# ResNet-20x1 on CIFAR-10 (BatchNorm and LayerNorm), every setting at 3 seeds.
#
# ViT-Tiny is trained on MNIST, not CIFAR-10: one epoch of its 60000 images takes about 8
# minutes on one thread here (483 s measured), and a ViT trained from scratch on CIFAR-10
# needs far more epochs than a ResNet to mean anything (the recipe's default is 50), days of
# CPU for two endpoints at 3 seeds; CIFAR-10 ViTs belong to the paper scale.

#: The zoo MLP, and the narrower one of the widths setting (784-256-256-256-10).
CPU_MLP = "mlp"
CPU_NARROW = "mlp-w256"
#: MLP epochs on the full training set (or on its part): the MLP recipe's default, where
#: the zoo MLP reaches 98.6 % on MNIST and 90 % on Fashion-MNIST (docs/training.md).
CPU_MLP_EPOCHS = 10
#: ResNet-20x1 epochs: on all of CIFAR-10, and on five classes (half the images). The shared
#: reference checkpoints of this recipe reach 84.9-85.4 % after 15 epochs, and 89.2 % / 94.3 %
#: on their own classes after 20: far enough to mean something, not converged.
CPU_RESNET_EPOCHS = 15
CPU_HALF_EPOCHS = 20
CPU_SAMPLES = 2000
#: Method keywords of the cpu settings, in one place. STE: 100 steps at the authors' rate for
#: small merge sets (2000 images of each dataset are 4-8 batches of 500, so their default
#: length, one epoch, would be 4-8 steps). kf-gradient's default (100 epochs a level,
#: patience 15) took 482 s on two zoo MLPs (2 threads, a loaded machine) and is up to an hour a
#: merge of ResNet-20s on one thread (4.3 s per level-epoch of 1600 images, 11 levels): 10
#: epochs with patience 3 bound it to a tenth.
CPU_PARAMS: dict[str, dict[str, Any]] = {
    "ste": {"steps": 100, "lr": 0.5}, "kf-gradient": {"epochs": 10, "patience": 3},
}  # fmt: skip
#: ViT-Tiny epochs on MNIST (the MLP's budget; two epochs reached 92.8 % in a trial).
CPU_VIT_EPOCHS = 10
#: The cpu scale's settings beyond :data:`SETTING_NAMES`.
CPU_EXTRA = ("n-models-5", "cross-dataset-coreset", "resnet20", "resnet20-ln", "resnet20-ln-3",
             "resnet20-disjoint", "vit-tiny")  # fmt: skip
#: The small merge set of cross-dataset-coreset: images per class of each dataset.
CPU_CORESET = "coreset:herding:10"


def _cpu() -> dict[str, Setting]:
    """The smoke settings at a size whose numbers mean something, plus CIFAR-10 ResNet-20s
    (the architecture of the papers' CIFAR tables) and five MLPs at once."""

    def mlp(dataset: str, seed: int, **kw: Any) -> Source:
        return Source(dataset, kw.pop("model", CPU_MLP), seed, epochs=CPU_MLP_EPOCHS, **kw)

    def resnet(seed: int, norm: str = "", classes: tuple[int, ...] | None = None) -> Source:
        epochs = CPU_RESNET_EPOCHS if classes is None else CPU_HALF_EPOCHS
        return Source("cifar10", "resnet20" + norm, seed, classes=classes, epochs=epochs)

    mnist = (TestSet("mnist"),)
    both = (TestSet("mnist"), TestSet("fashion-mnist"))
    cifar = (TestSet("cifar10"),)
    cross = (mlp("mnist", 0), mlp("fashion-mnist", 1))
    split = {"split": "dirichlet", "n_parts": 2}
    shards = {"split": "shards", "n_parts": 2}
    common: dict[str, Any] = {"samples": CPU_SAMPLES, "params": CPU_PARAMS}
    conv: dict[str, Any] = {"samples": CPU_SAMPLES, "params": CPU_PARAMS, "repair": True}
    trained = (f"{CPU_MLP_EPOCHS} epochs on the full training set (symmerge's MLP recipe: "
               "SGD, warm-up + cosine)")  # fmt: skip
    r20 = f"ResNet-20x1, {CPU_RESNET_EPOCHS} epochs of symmerge's recipe on a CPU (not converged)"
    settings = [
        Setting("same-task", "two MNIST MLPs (different seeds)",
                (mlp("mnist", 0), mlp("mnist", 1)), mnist, "mnist", repair=True,
                stand_in="Git Re-Basin's MNIST MLP (784-512-512-512-10, trained to "
                f"convergence): the same MLP, {trained}", **common),
        Setting("n-models", "three MNIST MLPs merged at once",
                (mlp("mnist", 0), mlp("mnist", 1), mlp("mnist", 2)), mnist, "mnist",
                repair=True, stand_in="C2M3's MLP on EMNIST letters, 3 models (784-512x3-256-26, "
                f"Adam); EMNIST is not available offline: MNIST MLPs 784-512x3-10, {trained}",
                **common),
        Setting("cross-dataset", "an MNIST and a Fashion-MNIST MLP, one shared 10-way head",
                cross, both, "mnist,fashion-mnist", repair=True,
                stand_in="Yamada et al.'s MNIST/Fashion-MNIST pair (784-512x3, 100 epochs, STE "
                f"on the full training sets or condensed ones); here {trained}, STE for 100 "
                f"steps at lr 0.5 on {CPU_SAMPLES} images of each dataset", **common),
        Setting("disjoint-classes", "MNIST classes 0-4 vs 5-9, a head per task",
                (mlp("mnist", 0, classes=tuple(range(5))),
                 mlp("mnist", 1, classes=tuple(range(5, 10)))),
                mnist, "mnist", metric="joint", heads="per-task", repair=True,
                stand_in="ZipIt!/MuDSC's CIFAR-10 5+5 with ResNet-20x4 and CLIP text heads "
                "(resnet20-disjoint is the CIFAR-10 one); here MNIST MLPs, "
                f"{CPU_MLP_EPOCHS} epochs on their five classes, each model's own head on the "
                "merged features", **common),
        Setting("budgets", "the cross-dataset pair merged at compute budgets 1x-2x",
                cross, both, "mnist,fashion-mnist", budgets=(1.0, 1.5, 2.0),
                stand_in="PLeaS's DomainNet ResNet-50 pairs (unavailable offline): the "
                "MNIST/Fashion-MNIST MLP pair with one shared head stands in; MuDSC in its "
                "zip variant (the one with a target width)",
                **{**common, "params": {**CPU_PARAMS, "mudsc": {"variant": "zip"}}}),
        Setting("non-iid", "MNIST MLPs trained on the two parts of a Dirichlet split",
                (mlp("mnist", 0, part=1, **split), mlp("mnist", 1, part=2, **split)),
                mnist, "mnist", repair=True,
                stand_in="neuron-interpolation fusion's non-IID VGG11 / CIFAR-10 parents; "
                f"here MNIST MLPs, {CPU_MLP_EPOCHS} epochs on the parts of a Dirichlet split "
                "(concentrations 1-5 per class)", **common),
        Setting("sharded", "MNIST MLPs trained on disjoint shards of whole classes",
                (mlp("mnist", 0, part=1, **shards), mlp("mnist", 1, part=2, **shards)),
                mnist, "mnist", repair=True,
                stand_in="neuron-interpolation fusion's sharded ViT / CIFAR-100 parents; "
                f"here MNIST MLPs, {CPU_MLP_EPOCHS} epochs on 5 whole classes each, tested "
                "on all 10", **common),
        Setting("widths", "MNIST MLPs of different widths (512 and 256)",
                (mlp("mnist", 0), mlp("mnist", 1, model=CPU_NARROW)), mnist, "mnist",
                repair=True, stand_in="fusion of parents of different widths (OT fusion, "
                "neuron interpolation): 784-512x3 and 784-256x3 MLPs, merged at the wider "
                "width or the method's own", **common),
        Setting("n-models-5", "five MNIST MLPs merged at once",
                tuple(mlp("mnist", k) for k in range(5)), mnist, "mnist", repair=True,
                stand_in="C2M3's scaling in the number of models (their Figure 7); "
                f"here 5 MNIST MLPs 784-512x3-10, {trained}", **common),
        Setting("cross-dataset-coreset", "the cross-dataset pair merged with 10 images per "
                "class of each dataset", cross, both, CPU_CORESET, repair=True,
                stand_in="Yamada et al.'s small merge sets: DM/DC condensed sets of 10 images "
                "per class; here a herding coreset of 10 per class of each dataset (200 "
                "images; condensed sets need a condensation run first), STE for 100 steps at "
                "lr 0.5, every data-using method and REPAIR on the same 200 images", **common),
        Setting("resnet20", "two CIFAR-10 ResNet-20s with BatchNorm (different seeds)",
                (resnet(0), resnet(1)), cifar, "cifar10", reset_bn=True,
                stand_in="same-task CIFAR-10 ResNet-20 pairs with BatchNorm (the merging "
                "papers' are x2-x16, trained to convergence on a GPU, with the BN "
                f"statistics reset after merging); here {r20}, BN statistics recomputed on "
                "the merge data after every merge that leaves them interpolated", **conv),
        Setting("resnet20-ln", "two CIFAR-10 ResNet-20s with LayerNorm (different seeds)",
                (resnet(0, "-ln"), resnet(1, "-ln")), cifar, "cifar10",
                stand_in="C2M3's ResNet-20 with LayerNorm (x2 and 3 models in their CIFAR-10 "
                f"table: resnet20-ln-3), here 2 models; {r20}; no running statistics to reset",
                **conv),
        Setting("resnet20-ln-3", "three CIFAR-10 ResNet-20s with LayerNorm merged at once",
                (resnet(0, "-ln"), resnet(1, "-ln"), resnet(2, "-ln")), cifar, "cifar10",
                stand_in="C2M3's ResNet-20x2 (LayerNorm) / CIFAR-10, 3 models, C2M3 against "
                "MergeMany (theirs: SGD lr 0.1, wd 1e-4, batch 100, to convergence); here "
                f"{r20}, width 1 instead of 2", **conv),
        Setting("resnet20-disjoint", "CIFAR-10 classes 0-4 vs 5-9 (ResNet-20, BatchNorm), "
                "a head per task",
                (resnet(0, classes=tuple(range(5))), resnet(1, classes=tuple(range(5, 10)))),
                cifar, "cifar10", metric="joint", heads="per-task", reset_bn=True,
                stand_in="ZipIt!/MuDSC's CIFAR-10 (5+5) with ResNet-20x4 and CLIP "
                "text-embedding heads (one shared output space); here ResNet-20x1 with "
                f"BatchNorm, {CPU_HALF_EPOCHS} epochs on its five classes, each model's own "
                "head on the merged features (joint accuracy, no task id), BN statistics "
                "recomputed after merges that leave them interpolated", **conv),
        Setting("vit-tiny", "two MNIST ViT-Tiny (different seeds)",
                tuple(Source("mnist", "vit-tiny", k, epochs=CPU_VIT_EPOCHS) for k in (0, 1)),
                mnist, "mnist", repair=True,
                stand_in="the papers' ViTs (ZipIt!'s ImageNet-pretrained ViT-S/16 fine-tuned on "
                "class splits, neuron interpolation's ViT on sharded CIFAR-100), trained on "
                "GPUs; here two ViT-Tiny from different random inits (6 pre-norm blocks, width "
                f"192, 3 heads of 64, patch 4) trained {CPU_VIT_EPOCHS} epochs on MNIST on a "
                "CPU", **common),
    ]  # fmt: skip
    return {s.name: s for s in settings}


#: Seeds a scale runs when ``--seeds`` is not given.
DEFAULT_SEEDS = {"smoke": (0,), "cpu": (0, 1, 2), "paper": (0, 1, 2)}


def settings_for(scale: str) -> dict[str, Setting]:
    """The settings of ``scale`` by name: :data:`SETTING_NAMES` in that order, then the
    scale's own (the cpu scale's :data:`CPU_EXTRA`).

    Raises ``NotImplementedError`` for a scale this version does not define yet.
    """
    if scale == "smoke":
        found = _smoke()
        assert tuple(found) == SETTING_NAMES, "the smoke scale defines exactly the shared names"
        return found
    if scale == "cpu":
        found = _cpu()
        assert tuple(found) == SETTING_NAMES + CPU_EXTRA, "every scale defines the shared names"
        return found
    raise NotImplementedError(f"the {scale!r} scale is not implemented yet in this version")
