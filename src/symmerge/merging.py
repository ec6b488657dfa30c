"""The front door: ``merge(models, method=..., data=...)``, as ``symmerge merge`` does.

It validates the inputs once (same architecture, finite weights, data when the method needs
it), traces the symmetry, runs the registered method, loads the merged weights into a copy of
the first model and renormalizes (BN reset or REPAIR) on request.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from symmerge.groupmap import GroupMap
from symmerge.methods import MergeResult, get_method, list_methods, method_info
from symmerge.spec import SymmetrySpec, trace

__all__ = [
    "HEADS", "RENORMS", "BatchNormStatsWarning", "build_model", "check_compatible", "interpolation",
    "interpolation_path", "merge", "trace_model",
]  # fmt: skip

RENORMS = (None, "reset-bn", "repair")
HEADS = ("shared", "per-task")


class BatchNormStatsWarning(UserWarning):
    """A merge between the endpoints left BatchNorm running statistics interpolated: they
    rarely fit the merged weights (a merged ResNet may predict one class) until recomputed
    with ``renorm="reset-bn"`` or ``"repair"``."""


def has_bn_statistics(model: nn.Module) -> bool:
    """Whether ``model`` has BatchNorm layers that use running statistics in eval mode."""
    from torch.nn.modules.batchnorm import _BatchNorm

    return any(isinstance(m, _BatchNorm) and m.track_running_stats for m in model.modules())


def _warn_bn_statistics(subject: str) -> None:
    warnings.warn(
        BatchNormStatsWarning(
            f"{subject} interpolated from the inputs' and rarely fit the merged weights; pass "
            "renorm='reset-bn' or 'repair' with data to recompute them"
        ),
        stacklevel=3,  # the caller of merge() / interpolation()
    )


def check_architecture(models: Sequence[nn.Module]) -> None:
    """Raise ValueError unless every model has model 0's parameters and layer types (their
    sizes may differ): parents of other depths or layer types are not one architecture."""
    ref = models[0].state_dict()
    kinds = {n: type(m).__name__ for n, m in models[0].named_modules()}
    for k, m in enumerate(models[1:], 1):
        sd = m.state_dict()
        if set(sd) != set(ref):
            missing, extra = sorted(set(ref) - set(sd))[:3], sorted(set(sd) - set(ref))[:3]
            raise ValueError(
                f"model {k} has a different architecture from model 0 (another depth or other "
                f"layers: missing {missing}, unexpected {extra}); merging needs one architecture"
            )
        for name, mod in m.named_modules():
            if kinds.get(name, type(mod).__name__) != type(mod).__name__:
                raise ValueError(
                    f"model {k} has other layer types from model 0: '{name}' is "
                    f"{type(mod).__name__}, not {kinds[name]}"
                )


def check_compatible(models: Sequence[nn.Module], method: str | None = None) -> bool:
    """Raise ValueError unless all models share one architecture and have finite weights.

    Models of different widths (same state-dict keys, other sizes) pass only when ``method``
    can merge them (its registry capability ``unequal_widths``); the error names the methods
    that can. Returns whether the widths differ.
    """
    if len(models) < 2:
        raise ValueError(f"merging needs at least 2 models, got {len(models)}")
    can = method is not None and method_info(method).unequal_widths
    unequal = False
    check_architecture(models)
    ref = models[0].state_dict()
    for k, m in enumerate(models):
        for name, t in m.state_dict().items():
            if t.shape != ref[name].shape:
                if t.dim() != ref[name].dim() or not can:
                    who = f"the '{method}' method" if method else "this method"
                    capable = [n for n in list_methods() if method_info(n).unequal_widths]
                    raise ValueError(
                        f"model {k} has a different width from model 0: '{name}' is "
                        f"{tuple(t.shape)} vs {tuple(ref[name].shape)}; {who} needs equal "
                        f"widths (methods that merge different widths: {', '.join(capable)})"
                    )
                unequal = True
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"model {k} has non-finite values (NaN/inf) in '{name}'")
    return unequal


def merge(
    models: Sequence[nn.Module],
    method: str = "weight",
    *,
    data: Iterable[Any] | None = None,
    renorm: str | None = None,
    renorm_data: Iterable[Any] | None = None,
    lam: float = 0.5,
    seed: int = 0,
    spec: SymmetrySpec | None = None,
    example_inputs: Any = None,
    heads: str = "shared",
    block_sparse: bool = False,
    finetune: int = 0,
    **method_kwargs: Any,
) -> tuple[nn.Module, MergeResult]:
    """Merge ``models`` with a registered method.

    Args:
        models: two or more models of one architecture (model 0 is the reference order);
            their group widths may differ when the method takes unequal widths (each model is
            then traced, and the merged model has the wider widths).
        method: a name from :func:`symmerge.methods.list_methods`.
        data: batches for data-based methods (``activation``, ``ste``).
        renorm: ``None``, ``"reset-bn"`` or ``"repair"``; uses ``renorm_data`` (or ``data``).
            ``None`` on a BatchNorm model merged between the endpoints warns
            (:class:`BatchNormStatsWarning`): its running statistics stay interpolated.
        lam: interpolation weight of model 1 for two models (0 gives model 0, 1 model 1).
        spec: the symmetry of model 0 (traced if None).
        example_inputs: inputs for tracing (default: a batch of 2 of ``model.input_shape``).
        heads: ``"shared"`` (one head, the models' heads merged over the union label index) or
            ``"per-task"`` (one head per source model, each reading the merged features
            through its own unmerge: the output is model 0's logits, then model 1's, ...).
            Models with outputs of different sizes (other label spaces) need ``"per-task"``.
        block_sparse: return the model exported block-sparse: layers whose merged weights
            have structurally empty blocks (partial merges, partial zips, the ensemble)
            compute only the non-zero blocks (:func:`symmerge.blocksparse.export_merged`);
            checkpoints record the blocks.
        finetune: epochs of Adam on ``data`` (labelled batches) after the merge and its
            renormalisation (:func:`symmerge.refine.finetune.finetune`); 0, the default, is
            zero-shot. The losses go to ``result.details["finetune_loss"]``.

    Returns:
        ``(merged model, MergeResult)``; the inputs are not modified. When a group's merged
        width differs from model 0's (zip, partial and side-by-side maps, unequal parents) or
        heads are kept per task, the model is model 0's architecture resized
        (:func:`symmerge.resize.resize`).
    """
    if method not in list_methods():
        raise ValueError(f"unknown method {method!r}; registered methods: {list_methods()}")
    if renorm not in RENORMS:
        raise ValueError(
            f"The 'renorm' parameter of merge must be one of {RENORMS}. Got {renorm!r} instead."
        )
    if not (isinstance(lam, (int, float)) and 0.0 <= lam <= 1.0 and math.isfinite(lam)):
        raise ValueError(f"The 'lam' parameter of merge must be a float in [0, 1]. Got {lam!r}.")
    if heads not in HEADS:
        raise ValueError(
            f"The 'heads' parameter of merge must be one of {HEADS}. Got {heads!r} instead."
        )
    if isinstance(finetune, bool) or not isinstance(finetune, int) or finetune < 0:
        raise ValueError(
            f"The 'finetune' parameter of merge must be an int >= 0. Got {finetune!r}."
        )
    if finetune and data is None:
        raise ValueError("finetune= trains on data=: pass labelled batches")
    models = sources = list(models)  # sources keep their own heads (for per-task heads)
    if len(models) > 1:
        check_architecture(models)
        spec = spec if spec is not None else trace_model(models[0], example_inputs)
        models = _method_heads(spec, models, heads, example_inputs)
    unequal = check_compatible(models, method)
    if method_info(method).needs_data and data is None:
        raise ValueError(f"the '{method}' method needs data (batches of inputs and labels)")
    renorm_data = renorm_data if renorm_data is not None else data
    if renorm and renorm_data is None:
        raise ValueError(f"renorm={renorm!r} needs data (renorm_data= or data=)")
    kwargs = dict(method_kwargs)
    if unequal and kwargs.get("specs") is None:  # each model traced at its own widths
        kwargs["specs"] = [
            spec if k == 0 and spec is not None else trace_model(m, example_inputs)
            for k, m in enumerate(models)
        ]
    if spec is None:
        spec = kwargs["specs"][0] if unequal else trace_model(models[0], example_inputs)
    fn = get_method(method)
    if data is not None:
        kwargs["data"] = data
    result = fn(spec, models, lam=lam, seed=seed, **kwargs)
    if heads == "per-task":
        num_outputs = _stack_heads(spec, sources, result, kwargs.get("specs"))
    else:
        num_outputs = None
    state = result.state_dict
    if renorm or finetune:  # they change the model in place: result keeps the method's output
        state = {k: v.clone() for k, v in state.items()}
    merged = build_model(models[0], spec, result.maps, state, num_outputs=num_outputs,
                         example_inputs=example_inputs)  # fmt: skip
    t0 = time.perf_counter()
    if renorm == "reset-bn":
        from symmerge.renorm import reset_bn

        reset_bn(merged, renorm_data)
    elif renorm == "repair":  # goals through the maps: any GroupMap, any widths
        from symmerge.renorm import repair

        repair(merged, sources, renorm_data, maps=result.maps, spec=spec)
    elif (_averages_units(result.maps) and has_bn_statistics(merged)
          and result.details.get("bn_statistics") != "fitted"):  # fmt: skip
        _warn_bn_statistics("the merged model's BatchNorm running statistics are")
    if renorm:  # the method's own time stays in result.seconds
        result.timings = {**result.timings, "renorm": time.perf_counter() - t0}
    if finetune:
        from symmerge.refine.finetune import finetune as train_epochs

        t0 = time.perf_counter()
        losses = train_epochs(merged, data, finetune, seed=seed)
        result.details = {**result.details, "finetune_loss": losses}
        result.timings = {**result.timings, "finetune": time.perf_counter() - t0}
    if block_sparse:
        from symmerge.blocksparse import export_merged

        sds = [{k: v.detach() for k, v in m.state_dict().items()} for m in models]
        merged = export_merged(merged, kwargs.get("specs") or spec, sds, result.maps)
    return merged.eval(), result


def interpolation(
    models: Sequence[nn.Module],
    method: str = "weight",
    lambdas: Sequence[float] = tuple(k / 10 for k in range(11)),
    *,
    data: Iterable[Any] | None = None,
    renorm: str | None = None,
    seed: int = 0,
    spec: SymmetrySpec | None = None,
    example_inputs: Any = None,
    **method_kwargs: Any,
) -> Iterator[tuple[float, nn.Module]]:
    """Models along (1-λ)·A + λ·aligned(B): align once (at λ=0.5), then rebuild for each λ.

    Each point is renormalized on ``data`` when ``renorm`` is given (REPAIR with goal weights
    (1-λ, λ)); without it, BatchNorm models warn once (:class:`BatchNormStatsWarning`).
    Yields ``(λ, model)``.
    """

    models = list(models)
    if len(models) != 2:
        raise ValueError(f"interpolation needs exactly 2 models, got {len(models)}")
    if method not in list_methods():
        raise ValueError(f"unknown method {method!r}; registered methods: {list_methods()}")
    unequal = check_compatible(models, method)
    spec = spec if spec is not None else trace_model(models[0], example_inputs)
    specs = [spec, trace_model(models[1], example_inputs)] if unequal else None
    if specs is not None:
        method_kwargs = {**method_kwargs, "specs": specs}
    with warnings.catch_warnings():  # the midpoint is only for the alignment
        warnings.simplefilter("ignore", BatchNormStatsWarning)
        mid, result = merge(models, method, data=data, seed=seed, spec=spec, **method_kwargs)
    del mid
    if renorm is None and any(0 < lam < 1 for lam in lambdas) and has_bn_statistics(models[0]):
        _warn_bn_statistics("at each point, the BatchNorm running statistics are")
    yield from interpolation_path(models, spec, result.maps, lambdas, data=data, renorm=renorm,
                                  specs=specs, example_inputs=example_inputs)  # fmt: skip


def interpolation_path(
    models: Sequence[nn.Module],
    spec: SymmetrySpec,
    maps: Mapping[str, GroupMap],
    lambdas: Sequence[float],
    *,
    data: Iterable[Any] | None = None,
    renorm: str | None = None,
    specs: Sequence[SymmetrySpec] | None = None,
    example_inputs: Any = None,
) -> Iterator[tuple[float, nn.Module]]:
    """Models along (1-λ)·A + λ·aligned(B) for permutation ``maps`` a merge of the two
    ``models`` found, each renormalised on ``data`` as ``renorm`` says (REPAIR with goal
    weights (1-λ, λ)). At λ = 0 and 1 (without renorm) the points compute the endpoints'
    functions. Yields ``(λ, model)``."""
    from symmerge.groupmap import build_state_dict

    if not all(gm.is_permutation or gm.indices is not None for gm in maps.values()):
        raise ValueError("an interpolation path needs permutation maps (a matching's)")
    states = [m.state_dict() for m in models]
    for lam in lambdas:
        point_maps = {g: gm.with_weights([1.0 - lam, lam]) for g, gm in maps.items()}
        state = build_state_dict(specs or spec, states, point_maps, weights=[1.0 - lam, lam])
        point = build_model(models[0], spec, point_maps, state, example_inputs=example_inputs)
        if renorm == "reset-bn":
            from symmerge.renorm import reset_bn

            reset_bn(point, data)
        elif renorm == "repair":
            from symmerge.renorm import repair

            repair(point, models, data, maps=point_maps, spec=spec)
        yield lam, point.eval()


def build_model(
    model: nn.Module,
    spec: SymmetrySpec,
    maps: Mapping[str, GroupMap],
    state_dict: Mapping[str, torch.Tensor],
    *,
    num_outputs: int | None = None,
    example_inputs: Any = None,
) -> nn.Module:
    """The merged model: ``model``'s architecture at the maps' widths, holding ``state_dict``.

    A copy of ``model`` when every group keeps its width; otherwise ``model`` resized to each
    map's ``n_out`` (and block count), so no method builds modules itself.
    """
    from symmerge.resize import resize, with_state

    widths = {g: gm.n_out for g, gm in maps.items() if gm.n_out != spec.groups[g].size}
    blocks = {g: gm.blocks for g, gm in maps.items() if gm.blocks is not None}
    if widths or blocks or num_outputs is not None:
        inputs = None if example_inputs is None else _as_tuple(example_inputs)
        return resize(model, spec, widths, blocks=blocks, num_outputs=num_outputs,
                      state_dict=state_dict, example_inputs=inputs)  # fmt: skip
    return with_state(model, state_dict)


def _averages_units(maps: Mapping[str, GroupMap]) -> bool:
    """Whether some merged unit mixes several models (its statistics are then averages);
    a side-by-side map or an endpoint (lambda 0 or 1) keeps every unit from one model."""
    for gm in maps.values():
        sharing = sum((gm.mass(m) > 0).long() for m in range(gm.num_models))
        if bool((sharing > 1).any()):
            return True
    return False


def _as_tuple(x: Any) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def _stack_heads(
    spec: SymmetrySpec,
    models: Sequence[nn.Module],
    result: MergeResult,
    specs: Sequence[SymmetrySpec] | None = None,
) -> int:
    """Replace the merged head by every model's own head reading the merged features (its
    ``W_m U_m``, weight 1), stacked along the output axis; returns the new output size.
    ``specs``: one per model, for models of different widths."""
    from symmerge.groupmap import build_state_dict
    from symmerge.resize import output_axes

    axes = output_axes(spec)
    sizes = {size for _, _, size in axes}
    if len(sizes) != 1:
        raise ValueError(
            "heads='per-task' needs a model with one output axis on its parameters (a "
            f"classifier head); found output sizes {sorted(sizes) or 'none'}"
        )
    tensors = {t for t, _, _ in axes}
    for t in list(tensors):
        tensors.update(spec.aliases.get(t, []))
    terms = []
    for m, model in enumerate(models):
        maps = {g: gm.select(m) for g, gm in result.maps.items()}
        sd = {k: v for k, v in model.state_dict().items()}
        terms.append(build_state_dict(specs[m] if specs else spec, [sd], maps, weights=[1.0]))
    total = 0
    for tensor, axis, _ in axes:
        for name in [tensor, *spec.aliases.get(tensor, [])]:
            if name in result.state_dict:
                result.state_dict[name] = torch.cat([t[name] for t in terms], axis)
                total = result.state_dict[name].shape[axis]
    return total


def _method_heads(
    spec: SymmetrySpec, models: list[nn.Module], heads: str, example_inputs: Any
) -> list[nn.Module]:
    """``models`` as the method sees them. Outputs of different sizes (other label spaces)
    cannot share a head: an error for ``heads="shared"``; for ``"per-task"`` the method sees
    every head cut or zero-padded to model 0's size (rows of different label spaces do not
    correspond anyway), and :func:`_stack_heads` then stacks each model's own head."""
    from symmerge.resize import output_axes, resize

    axes = output_axes(spec)
    if not axes:
        return models
    tensor, axis, n0 = axes[0]
    sizes = []
    for m in models:
        t = m.state_dict().get(tensor)  # a missing one is check_compatible's to report
        sizes.append(n0 if t is None or t.dim() <= axis else int(t.shape[axis]))
    if all(n == n0 for n in sizes):
        return models
    if heads == "shared":
        raise ValueError(
            f"the models' outputs differ in size ({sizes} on '{tensor}'): they are trained on "
            "different label spaces, which one shared head cannot hold; pass "
            "heads='per-task' to keep every model's own head on the merged features"
        )
    inputs = None if example_inputs is None else _as_tuple(example_inputs)

    def cut(m: nn.Module) -> nn.Module:
        return resize(m, trace_model(m, example_inputs), {}, num_outputs=n0, example_inputs=inputs)

    return [m if n == n0 else cut(m) for m, n in zip(models, sizes, strict=True)]


def trace_model(model: nn.Module, example_inputs: Any = None) -> SymmetrySpec:
    """``model``'s symmetry spec, traced on ``example_inputs`` (default: random inputs of the
    model's ``input_shape``), as :func:`merge` traces it."""
    if example_inputs is None:
        from symmerge.stats import shape_inputs

        example_inputs = shape_inputs(model)
        if example_inputs is None:
            raise ValueError("pass example_inputs= or spec= (the model has no input_shape)")
    return trace(model, example_inputs)
