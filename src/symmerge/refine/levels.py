"""Levels: a model cut, from its traced spec, into the consecutive sub-networks that
neuron-interpolation fusion fits one after another (algorithms.md §5(b)).

Rule: taking the Linear / Conv layers in forward order, a level ends after a layer when no
later layer reads or writes a group written up to it other than that layer's own output group
and the next layer reads that group (so parallel branches, such as SwiGLU's gate and value or
the inputs of a concatenation, share a level), and every other module with parameters (a norm)
joins the level of the layer called before it.

So an MLP or a VGG has one level per layer (with its norm), the head last; in a ResNet the stem
is a level and every residual block is one, because its skip keeps the stream alive past its
first conv (the second conv writes the stream group again, which was written before the cut).
A level's input is what its first module receives; its output is the input of the first
activation module (ReLU, GELU, ...) called after its last layer: the pre-activation, e.g. a
block's sum before its last ReLU. Without such an activation the output is what the next level
receives, and for the last level the model's output.

Example:
    >>> import torch
    >>> from symmerge import trace
    >>> from symmerge.models import create_model
    >>> net = create_model("mlp", width=8, depth=2)[0]
    >>> x = torch.randn(2, *net.input_shape)
    >>> [lv.modules for lv in levels(net, trace(net, (x,)))]
    [('layers.1',), ('layers.3',), ('layers.5',)]
    >>> h_in, h_out = run_until(net, levels(net, trace(net, (x,)))[-1], x)
    >>> torch.equal(h_out, net(x))
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from symmerge.spec import SymmetrySpec

__all__ = ["ACTIVATIONS", "Level", "levels", "run_until"]

#: Module types that end a level's computation (its output is their input).
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Tanh, nn.Sigmoid, nn.Softplus,
)  # fmt: skip
_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)


@dataclass(frozen=True)
class Level:
    """One level: its modules with parameters and where its input and output are observed.

    Attributes:
        index: position, from 0 (the last level is the head).
        modules: the modules with parameters, in forward order (their first call).
        layers: the Linear / Conv layers among them.
        group: the group of the output's units (the last layer's output group); ``None`` when
            that axis is in no group (the head's logits).
        entry: ``(module, call)``: the level's input is what that call of the module receives.
        exit: ``(module, call, pre)``: its output is that call's input (``pre``) or output.
    """

    index: int
    modules: tuple[str, ...]
    layers: tuple[str, ...]
    group: str | None
    entry: tuple[str, int]
    exit: tuple[str, int, bool]


def _owns(mod: nn.Module) -> bool:
    return next(mod.parameters(recurse=False), None) is not None


def _calls(model: nn.Module, example_inputs: Sequence[Any]) -> list[tuple[str, int]]:
    """``(module, call number)`` of every call of a leaf module or a module with parameters."""
    order: list[tuple[str, int]] = []
    seen: dict[str, int] = {}
    handles = []

    def record(name: str) -> Any:
        def hook(mod: nn.Module, args: Any) -> None:
            order.append((name, seen.get(name, 0)))
            seen[name] = seen.get(name, 0) + 1

        return hook

    for name, mod in model.named_modules():
        if name and (not any(mod.children()) or _owns(mod)):
            handles.append(mod.register_forward_pre_hook(record(name)))
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*example_inputs)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return order


def levels(
    model: nn.Module, spec: SymmetrySpec, example_inputs: Sequence[Any] | None = None
) -> list[Level]:
    """The levels of ``model`` (the rule of the module docstring), in forward order.

    Args:
        model: the model ``spec`` was traced from (or one of its family at other widths: only
            module names and the order of calls matter).
        spec: its symmetry; a layer's weight axes say which groups it reads and writes.
        example_inputs: positional inputs for one forward pass that records the call order
            (default: a batch of 2 of ``model.input_shape``).

    Raises:
        ValueError: the model has no Linear / Conv layer, or no inputs to run it.
    """
    if example_inputs is None:
        from symmerge.stats import shape_inputs

        example_inputs = shape_inputs(model)
        if example_inputs is None:
            raise ValueError("pass example_inputs= (the model has no input_shape)")
    calls = _calls(model, example_inputs)
    mods = dict(model.named_modules())
    first: dict[str, int] = {}
    for pos, (name, _) in enumerate(calls):
        first.setdefault(name, pos)
    owned = [n for n in first if _owns(mods[n])]  # forward order
    layers = [n for n in owned if isinstance(mods[n], _LAYERS)]
    if not layers:
        raise ValueError("the model has no Linear / Conv layer to cut into levels")
    writes: dict[str, set[str]] = {n: set() for n in layers}
    reads: dict[str, set[str]] = {n: set() for n in layers}
    for mem in spec.members():
        layer, _, leaf = mem.tensor.rpartition(".")
        if leaf == "weight" and layer in writes and mem.axis in (0, 1):
            found = {f.group for s in mem.segments for f in s.factors if f.group is not None}
            (writes if mem.axis == 0 else reads)[layer].update(found)
    cuts = []  # indices of the layers that end a level
    for i, layer in enumerate(layers):
        before = set().union(*(writes[n] for n in layers[: i + 1])) - writes[layer]
        later = set().union(*(reads[n] | writes[n] for n in layers[i + 1 :]))
        # a parallel branch (SwiGLU's gate, one input of a concatenation) does not feed the
        # next layer: its output meets the others' later, so it stays in their level
        feeds = i + 1 == len(layers) or not writes[layer] or writes[layer] & reads[layers[i + 1]]
        if not before & later and feeds:
            cuts.append(i)
    level_of: dict[str, int] = {}
    start = 0
    for k, i in enumerate(cuts):
        for n in layers[start : i + 1]:
            level_of[n] = k
        start = i + 1
    current = 0
    for n in owned:  # norms join the level of the layer called before them
        current = level_of.get(n, current)
        level_of.setdefault(n, current)
    members = [[n for n in owned if level_of[n] == k] for k in range(len(cuts))]
    starts = [first[m[0]] for m in members] + [len(calls)]
    out = []
    for k, names in enumerate(members):
        last_layer = layers[cuts[k]]
        span = calls[first[last_layer] : starts[k + 1]]
        act = next((c for c in span if isinstance(mods[c[0]], ACTIVATIONS)), None)
        if act is not None:
            exit_ = (*act, True)
        elif k + 1 < len(members):
            exit_ = (*calls[starts[k + 1]], True)
        else:
            exit_ = (*calls[-1], False)
        group = sorted(writes[last_layer])[0] if len(writes[last_layer]) == 1 else None
        mine = tuple(n for n in names if isinstance(mods[n], _LAYERS))
        out.append(Level(k, tuple(names), mine, group, calls[starts[k]], exit_))
    return out


class _Stop(Exception):
    """Raised by a hook once the level's output is seen, to skip the rest of the model."""


def run_until(model: nn.Module, level: Level, *inputs: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
    """The input and output of ``level`` when ``model`` runs on ``inputs``: the model runs up
    to the level's output and no further (forward hooks; grad mode and module modes are the
    caller's).

    Raises:
        RuntimeError: the forward pass never reached the level's input or output.
    """
    seen: dict[str, Any] = {}
    counts: dict[str, int] = {}
    (entry, entry_call), (exit_name, exit_call, pre) = level.entry, level.exit
    mods = dict(model.named_modules())

    def count(name: str, mod: nn.Module, args: Any) -> None:
        k = counts.get(name, 0)
        counts[name] = k + 1
        if name == entry and k == entry_call:
            seen["input"] = args[0]
        if name == exit_name and k == exit_call and pre:
            seen["output"] = args[0]
            raise _Stop

    def done(mod: nn.Module, args: Any, output: Any) -> None:
        if counts.get(exit_name) == exit_call + 1:
            seen["output"] = output
            raise _Stop

    handles = [
        mods[n].register_forward_pre_hook(lambda m, a, n=n: count(n, m, a))
        for n in {entry, exit_name}
    ]
    if not pre:
        handles.append(mods[exit_name].register_forward_hook(done))
    try:
        model(*inputs, **kwargs)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    if "input" not in seen or "output" not in seen:
        raise RuntimeError(
            f"the forward pass did not reach level {level.index}'s "
            f"{'input' if 'input' not in seen else 'output'} ({entry!r} / {exit_name!r})"
        )
    return seen["input"], seen["output"]
