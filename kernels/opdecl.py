"""One declaration per op: the custom op, its fake, its backward op and the eager autograd path,
all from ONE forward, ONE backward, ONE save rule and the fake (shape) rules.

An op is declared once::

    LORA_LINEAR = OpDecl("peftfast::lora_linear", forward, backward, save=..., fake=...,
                         backward_fake=...)

* ``forward(*args, hint=None) -> Tensor | tuple[Tensor, ...]``. Its annotated positional parameters
  are the op's schema (``torch.library.infer_schema``): tensors, optional tensors, lists of
  tensors, and static arguments (floats, ints, bools, dtypes and lists of them). ``hint`` is an
  eager-only, op-specific value (e.g. the backend already chosen by the caller, or "update
  base_out in place"); the custom op always passes None.
* ``save(args, outputs) -> list[Tensor | None]``: what backward needs (an eager caller may pass a
  Python int where the schema has a tensor, e.g. a dropout seed: it is kept as is).
* ``backward(saved, grads, needs, statics, hint=None) -> list[Tensor | None]``: one gradient per
  tensor *leaf* of the inputs (a list input counts one leaf per element), None where ``needs``
  (one bool per leaf) is False; ``statics`` are the static arguments, in order.
* ``fake(*args)`` and ``backward_fake(saved, grads, needs, statics)``: shapes and dtypes only.
* ``passthrough={"base_out": 0}``: that input's gradient is the k-th output gradient unchanged
  (filled in here, so no op returns a tensor aliasing its input).

From it:

* ``decl.op`` / ``decl.packet`` (``torch.ops.peftfast.<op>``): ``torch.library.custom_op`` (``name``) with the fake registered, and autograd
  registered through a second custom op ``name + "_backward"`` (schema: saved tensors, output
  gradients, needs, then the static arguments) with its own fake: torch.compile traces forward
  and backward as one op each, with no graph break.
* ``decl(*args, hint=...)``: under torch.compile the custom op; in eager mode the forward itself
  when no input requires grad (no autograd bookkeeping at all), else an ``autograd.Function``
  that calls the same forward and backward directly (no dispatcher round trip: the cost of a
  hand-written Function).

Memory: exactly what ``save`` returns, in both paths. Outputs listed in ``aux_outputs`` (e.g. the
t that lora's backward reuses) are non-differentiable in the eager path, and no zero gradient is
ever materialised for them.
"""
from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch

Tensor = torch.Tensor


def _kind(hint) -> str:
    """"tensor" (Tensor or Optional[Tensor]), "list" (a list of tensors) or "static"."""
    if hint is Tensor:
        return "tensor"
    args = typing.get_args(hint)
    if args and Tensor in args and type(None) in args and len(args) == 2:
        return "tensor"
    if typing.get_origin(hint) in (list, Sequence, typing.List) and args and args[0] is Tensor:
        return "list"
    return "static"


class OpDecl:
    """See the module docstring."""

    def __init__(self, name: str, forward: Callable, backward: Callable, *, save: Callable, fake: Callable,
                 backward_fake: Callable, passthrough: dict[str, int] | None = None,
                 aux_outputs: tuple[int, ...] = (), dirty: Callable | None = None):
        self.name = name
        self.forward = forward
        self.backward = backward
        self.save = save
        self.aux_outputs = aux_outputs
        self.dirty = dirty
        hints = typing.get_type_hints(forward)
        params = [p for p in inspect.signature(forward).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
        self.arg_names = tuple(p.name for p in params)
        self.kinds = tuple(_kind(hints[p.name]) for p in params)
        self.static_idx = tuple(i for i, k in enumerate(self.kinds) if k == "static")
        # leaf index of each passthrough input (only plain tensor inputs before any list input)
        self.passthrough = {}
        for arg, k in (passthrough or {}).items():
            i = self.arg_names.index(arg)
            assert self.kinds[i] == "tensor" and "list" not in self.kinds[:i], arg
            self.passthrough[i] = k

        def op_body(*args, **kwargs):
            return forward(*args, **kwargs)

        op_body.__signature__ = inspect.Signature(
            [p.replace(annotation=hints[p.name], default=inspect.Parameter.empty) for p in params],
            return_annotation=hints["return"])
        self.op = torch.library.custom_op(name, op_body, mutates_args=())
        self.op.register_fake(fake)

        def backward_body(saved, grads, needs, *statics):
            like = next(g for g in grads if g is not None)
            # outputs of a custom op share storage neither with its inputs nor with each other (torch checks
            # storages); a view of a fresh result is fine and is not copied
            taken = {t.untyped_storage().data_ptr() for t in (*saved, *grads) if t is not None}
            out = []
            for g in backward(list(saved), list(grads), list(needs), statics):
                if g is None:
                    g = like.new_empty(0)
                else:
                    if g.untyped_storage().data_ptr() in taken:
                        g = g.clone()
                    taken.add(g.untyped_storage().data_ptr())
                out.append(g)
            return out

        def backward_fake_body(saved, grads, needs, *statics):
            like = next(g for g in grads if g is not None)
            return [like.new_empty(0) if g is None else g
                    for g in backward_fake(list(saved), list(grads), list(needs), statics)]

        static_params = [inspect.Parameter(self.arg_names[i], inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                           annotation=hints[self.arg_names[i]]) for i in self.static_idx]
        backward_body.__signature__ = inspect.Signature(
            [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=a)
             for n, a in (("saved", list[Optional[Tensor]]), ("grads", list[Optional[Tensor]]),
                          ("needs", list[bool]))] + static_params,
            return_annotation=list[Tensor])
        self.backward_op = torch.library.custom_op(name + "_backward", backward_body, mutates_args=())
        self.backward_op.register_fake(backward_fake_body)
        torch.library.register_autograd(name, self._op_backward, setup_context=self._op_setup)
        ns, op_name = name.split("::")
        # callers go through torch.ops (the overload packet, as hand-written code would): traced graphs
        # hold ``peftfast.<op>`` nodes
        self.packet = getattr(getattr(torch.ops, ns), op_name)
        self.backward_packet = getattr(getattr(torch.ops, ns), op_name + "_backward")

    # ------------------------------------------------------------------------------ the custom op
    def _op_setup(self, ctx, inputs, output):
        outputs = output if isinstance(output, tuple) else (output,)
        ctx.save_for_backward(*self.save(inputs, outputs))
        ctx.statics = tuple(inputs[i] for i in self.static_idx)
        ctx.lens = tuple(len(a) if k == "list" else 1 for a, k in zip(inputs, self.kinds))

    def _op_backward(self, ctx, *grads):
        needs = []
        for i, (k, n) in enumerate(zip(self.kinds, ctx.lens)):
            if k != "static":
                needs += [bool(ctx.needs_input_grad[i])] * n
        flat = self.backward_packet(list(ctx.saved_tensors), list(grads), needs, *ctx.statics)
        flat = [g if need else None for g, need in zip(flat, needs)]
        return self._nest(self._pass(flat, needs, grads), ctx.lens)

    # ------------------------------------------------------------------------------ shared helpers
    def _pass(self, flat: list, needs, grads) -> list:
        for i, k in self.passthrough.items():  # plain tensors before any list: leaf index == arg index
            leaf = sum(1 for kind in self.kinds[:i] if kind != "static")
            flat[leaf] = grads[k] if needs[leaf] else None
        return flat

    def _nest(self, flat: list, lens) -> tuple:
        out, i = [], 0
        for k, n in zip(self.kinds, lens):
            if k == "tensor":
                out.append(flat[i])
                i += 1
            elif k == "list":
                part = flat[i:i + n]
                out.append(None if all(g is None for g in part) else part)
                i += n
            else:
                out.append(None)
        return tuple(out)

    def _leaves(self, args) -> list:
        leaves = []
        for a, k in zip(args, self.kinds):
            if k == "tensor":
                leaves.append(a)
            elif k == "list":
                leaves.extend(a)
        return leaves

    # ------------------------------------------------------------------------------ the eager path
    def __call__(self, *args, hint: Any = None):
        """The op on ``args`` (the schema's arguments); see the module docstring."""
        if torch.compiler.is_compiling():
            return self.packet(*args)
        if not torch.is_grad_enabled():  # nothing to record: the leaves are not even listed
            return self.forward(*args, hint=hint)
        leaves = self._leaves(args)
        if not any(isinstance(t, Tensor) and t.requires_grad for t in leaves):
            return self.forward(*args, hint=hint)
        return _EagerFunction.apply(self, (args, hint), *leaves)

    def _rebuild(self, args, leaves) -> tuple:
        out, i = [], 0
        for a, k in zip(args, self.kinds):
            if k == "tensor":
                out.append(leaves[i])
                i += 1
            elif k == "list":
                out.append(list(leaves[i:i + len(a)]))
                i += len(a)
            else:
                out.append(a)
        return tuple(out)


class _EagerFunction(torch.autograd.Function):
    """The eager autograd path of an ``OpDecl``: its forward and backward, called directly."""

    @staticmethod
    def forward(ctx, decl, call, *leaves):
        args, hint = call
        args = decl._rebuild(args, leaves)
        out = decl.forward(*args, hint=hint)
        outputs = out if isinstance(out, tuple) else (out,)
        saved = decl.save(args, outputs)
        is_tensor = [isinstance(s, Tensor) for s in saved]
        ctx.save_for_backward(*(s if t else None for s, t in zip(saved, is_tensor)))
        ctx.others = [None if t else s for s, t in zip(saved, is_tensor)]
        ctx.decl, ctx.hint = decl, hint
        ctx.statics = tuple(args[i] for i in decl.static_idx)
        ctx.set_materialize_grads(False)
        if decl.aux_outputs:
            ctx.mark_non_differentiable(*(outputs[i] for i in decl.aux_outputs))
        if decl.dirty is not None:
            dirty = decl.dirty(args, hint)
            if dirty:
                ctx.mark_dirty(*dirty)
        return out

    @staticmethod
    def backward(ctx, *grads):
        decl = ctx.decl
        saved = [o if t is None else t for t, o in zip(ctx.saved_tensors, ctx.others)]
        needs = ctx.needs_input_grad[2:]
        flat = decl.backward(saved, list(grads), list(needs), ctx.statics, hint=ctx.hint)
        return (None, None, *decl._pass(list(flat), needs, grads))
