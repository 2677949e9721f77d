"""What a dry run watches for while the real code runs on fake CUDA tensors.

`DeviceWatch` sits above PyTorch's FakeTensorMode and sees every op first:
- each tensor it makes records its origin: the stage and a short stack of where it was created;
- a CPU tensor meeting a CUDA one (FakeTensorDeviceMismatchError, as a GPU would refuse) is a finding naming the op, the
  module running and each tensor's origin; the CPU tensor is then moved so the run goes on to the next finding;
- a random op drawing on the CUDA device with a generator made for the CPU (a GPU refuses it) is a finding;
- small tensors (sizes, noise levels, row indices) keep their values: the op runs for real on the CPU beside the fake
  one, so code that reads values (`route`, `.tolist()`, `bool(...)`) works; a value the run never computes (a loss, a
  gradient norm) reads as finite / true, and is listed;
- `saved(...)` checks what a backup or a save writes: every tensor must be in host memory.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorDeviceMismatchError, unset_fake_temporarily
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from .runtime import short_stack

VALUE_LIMIT = 1 << 16  # elements: a tensor up to this size keeps its values (indices, noise levels, masks)
# made without values: nothing to compute
_UNINITIALISED = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default, torch.ops.aten.empty_like.default,
                  torch.ops.aten.new_empty.default, torch.ops.aten.new_empty_strided.default}
_PIN = {torch.ops.aten._pin_memory.default}
_IS_PINNED = {torch.ops.aten.is_pinned.default}


@dataclass
class Finding:
    """One device-placement bug: `kind` is "mismatch", "generator", "saved" or "error"."""

    kind: str
    stage: str
    message: str
    where: list[str] = field(default_factory=list)  # the code running when it happened, innermost first
    module: str = ""  # the module whose forward was running
    origins: list[str] = field(default_factory=list)  # each tensor involved: device, shape, where it was made

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def origin_of(tensor) -> str:
    """"cuda:0 bf16[1, 16, 9, 60, 104] made in <stage> at <frames>"."""
    dtype = str(tensor.dtype).removeprefix("torch.")
    what = f"{tensor.device} {dtype}{list(tensor.shape)}"
    made = getattr(tensor, "_dry_origin", None)
    if made is None:
        return what + " (made outside the dry run's sight: a model weight, or a tensor from numpy)"
    stage, frames = made
    return f"{what} made in '{stage}' at " + " < ".join(frames or ["(library code)"])


class DeviceWatch(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.findings: list[Finding] = []
        self.assumed: dict[str, int] = {}  # "where: what" → times a value the run never computed was assumed
        self.stage = ""
        self.modules: list[str] = []  # forward calls running, outermost first
        self.names: dict[int, str] = {}  # id(module) → its qualified name in the model part it belongs to
        self._seen: set = set()

    # --- module context -----------------------------------------------------------------------------------------
    def name_modules(self, prefix: str, module: torch.nn.Module) -> None:
        for name, sub in module.named_modules():
            self.names.setdefault(id(sub), f"{prefix}.{name}" if name else prefix)

    def entered(self, module, args) -> None:
        self.modules.append(self.names.get(id(module), type(module).__name__))

    def left(self, module, args, output) -> None:
        if self.modules:
            self.modules.pop()

    def module(self) -> str:
        return self.modules[-1] if self.modules else ("(autograd's backward)" if torch._C._current_graph_task_id() != -1 else "")

    # --- findings -----------------------------------------------------------------------------------------------
    def add(self, kind: str, message: str, tensors=(), where=None) -> None:
        where = where if where is not None else short_stack()
        key = (kind, self.stage, tuple(where[:2]), message)
        if key in self._seen:  # a loop meets the same bug once per iteration: report it once
            return
        self._seen.add(key)
        self.findings.append(Finding(kind, self.stage, message, where, self.module(), [origin_of(t) for t in tensors]))

    def saved(self, what: str, tree) -> None:
        """Everything a backup or save writes must be in host memory (a GPU tensor in a file is loaded back onto
        a GPU, or not at all without one, and is copied synchronously while the file is written)."""
        away = [(path, value) for path, value in _leaves(tree)
                if isinstance(value, torch.Tensor) and value.device.type != "cpu"]
        if away:
            named = ", ".join(path or "a tensor" for path, _ in away[:3]) + (f" and {len(away) - 3} more" if len(away) > 3 else "")
            self.add("saved", f"{what}: {len(away)} tensor(s) written from {away[0][1].device}, not from host memory: "
                     f"{named}", [value for _, value in away[:3]])

    # --- the ops ------------------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _PIN:  # pinned host memory: a plain host copy here
            return args[0].clone()
        if func in _IS_PINNED:
            return True
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        device = kwargs.get("device")
        if tensors and not any(isinstance(t, FakeTensor) for t in tensors) and (device is None or torch.device(device).type == "cpu"):
            # host tensors a run reads (cached text rows, decoded frames) are real: what is computed from them alone
            # on the host is computed for real, as in a run
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        data_dependent = torch.Tag.data_dependent_output in func.tags or torch.Tag.dynamic_output_shape in func.tags
        if data_dependent:
            known = self._from_values(func, args, kwargs)
            if known is not _UNKNOWN:
                return known
            if func is torch.ops.aten._local_scalar_dense.default:
                return self._assume(args[0])
        try:
            out = func(*args, **kwargs)
        except FakeTensorDeviceMismatchError as error:
            args, kwargs = self._mismatch(func, args, kwargs, error)
            out = func(*args, **kwargs)
        self._record(func, args, kwargs, out)
        return out

    def _mismatch(self, func, args, kwargs, error):
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_cpu = [t for t in tensors if t.device.type == "cpu" and t.dim() > 0]
        others = [t for t in tensors if t.device.type != "cpu"]
        self.add("mismatch", f"{func.overloadpacket.__name__}: a host (CPU) tensor meets a {others[0].device if others else 'CUDA'} "
                 "tensor; a GPU run stops here (Expected all tensors to be on the same device)", on_cpu + others[:1])
        device = others[0].device if others else torch.device("cuda", 0)
        moved = {id(t): t.to(device) for t in on_cpu}  # go on, to find the next one
        return pytree.tree_map_only(torch.Tensor, lambda t: moved.get(id(t), t), (args, kwargs))

    @contextlib.contextmanager
    def random_draws(self):
        """torch's random functions, checked for a generator made for another device than the numbers' (a GPU run
        refuses one; here the generator reaches an op as a plain CPU one, so the check is made where it is passed)."""
        names = ("randn", "rand", "randint", "randn_like", "rand_like", "randint_like", "normal", "randperm",
                 "bernoulli", "multinomial")
        originals = {name: getattr(torch, name) for name in names}

        def checked(name, function):
            def draw(*args, generator=None, **kwargs):
                if generator is not None:
                    self._check_generator(name, generator, args, kwargs)
                    kwargs["generator"] = generator
                return function(*args, **kwargs)
            return draw

        for name, function in originals.items():
            setattr(torch, name, checked(name, function))
        try:
            yield
        finally:
            for name, function in originals.items():
                setattr(torch, name, function)

    def _check_generator(self, name, generator, args, kwargs) -> None:
        device = kwargs.get("device")
        if device is None:
            tensor = next((t for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor)), None)
            drawn_like_input = name.endswith("_like") or name in ("normal", "bernoulli", "multinomial")
            device = tensor.device if drawn_like_input and tensor is not None else torch.device("cpu")
        device = torch.device(device)
        if device.type != generator.device.type:
            made = " < ".join(getattr(generator, "origin", [])) or "(unknown)"
            self.add("generator", f"torch.{name}: random numbers for {device} drawn with a generator made for "
                     f"{generator.device} (made at {made}); a GPU run stops here (Expected a '{device.type}' device "
                     "type for generator)")

    def _assume(self, tensor):
        """A value the dry run never computed: finite, true, one."""
        where = " < ".join(short_stack(depth=2)) or "(library code)"
        self.assumed[where] = self.assumed.get(where, 0) + 1
        if tensor.dtype == torch.bool:
            return True
        return 1.0 if tensor.is_floating_point() else 1

    # --- values of small tensors --------------------------------------------------------------------------------
    @staticmethod
    def _all_known(args, kwargs) -> bool:
        return all(not isinstance(t, FakeTensor) or hasattr(t, "_dry_value") for t in pytree.tree_leaves((args, kwargs)))

    def _values(self, args, kwargs):
        """(args, kwargs) with every tensor replaced by its values on the CPU, or None when one has none."""
        missing = []

        def value(x):
            if isinstance(x, torch.Tensor):
                known = x if not isinstance(x, FakeTensor) else getattr(x, "_dry_value", None)
                if known is None:
                    missing.append(x)
                return known
            if isinstance(x, torch.device) and x.type != "cpu":
                return torch.device("cpu")
            if isinstance(x, torch.Generator):
                return x
            return x

        converted = pytree.tree_map(value, (args, kwargs))
        if missing:
            return None
        args, kwargs = converted
        if "device" in kwargs:
            kwargs = dict(kwargs, device=torch.device("cpu"))
        if kwargs.get("pin_memory"):
            kwargs = dict(kwargs, pin_memory=False)
        return args, kwargs

    def _from_values(self, func, args, kwargs):
        values = self._values(args, kwargs)
        if values is None:
            return _UNKNOWN
        with unset_fake_temporarily():
            result = func(*values[0], **values[1])
        if not isinstance(result, torch.Tensor):
            return result
        device = next(t.device for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor))
        fake = torch.empty_strided(result.shape, result.stride(), dtype=result.dtype, device=device)
        fake._dry_value = result
        fake._dry_origin = (self.stage, short_stack())
        return fake

    def _record(self, func, args, kwargs, out) -> None:
        outputs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if not outputs:
            return
        where = (self.stage, short_stack())
        if outputs[0].device.type == "cpu":
            # a host tensor made from another one comes from where the first was made: the root of a wrong chain
            inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.device.type == "cpu"]
            where = next((t._dry_origin for t in inputs if getattr(t, "_dry_origin", None)), where)
        for tensor in outputs:
            if getattr(tensor, "_dry_origin", None) is None:
                try:
                    tensor._dry_origin = where
                except AttributeError:  # a real tensor out of an op on real tensors: nothing to note
                    pass
        if func is torch.ops.aten._to_copy.default and _moves_only(args, kwargs) and hasattr(args[0], "_dry_value") \
                or func is torch.ops.aten._to_copy.default and _moves_only(args, kwargs) and not isinstance(args[0], FakeTensor):
            # a tensor moved to another device keeps its values, whatever its size (a cached text row to the GPU)
            outputs[0]._dry_value = args[0]._dry_value if isinstance(args[0], FakeTensor) else args[0]
            return
        # views cost nothing to compute on values: a small header read out of a large row keeps its values
        small = func not in _UNINITIALISED and (func.is_view or all(t.numel() <= VALUE_LIMIT for t in outputs))
        values = self._values(args, kwargs) if small and self._all_known(args, kwargs) else None
        if values is None:
            # a tensor written in place by an op whose result is not known no longer has known values
            for tensor in _written(func, args, kwargs):
                for name in ("_dry_value", "_dry_head"):
                    if hasattr(tensor, name):
                        delattr(tensor, name)
            self._head(func, args, kwargs, outputs)
            return
        try:
            with unset_fake_temporarily():
                result = func(*values[0], **values[1])
        except Exception:  # an op the CPU cannot run on these values: the values are simply not known
            return
        for tensor, value in zip(outputs, [t for t in pytree.tree_leaves(result) if isinstance(t, torch.Tensor)]):
            if isinstance(tensor, FakeTensor):
                tensor._dry_value = value


    def _head(self, func, args, kwargs, outputs) -> None:
        """A large tensor whose first values along its last dimension are known keeps them (`_dry_head`): a packed
        text row (models/packing.py) is its small header, then the encoders' outputs, and `unpack` reads the header
        even where the rows were encoded in the step (an embedding or text encoder that trains). The ops that carry
        a head along move rows, never positions within one; a read inside the head has its values."""
        if len(outputs) != 1 or not isinstance(outputs[0], FakeTensor) or func not in _ROW_OPS:
            return
        out = outputs[0]
        if func is torch.ops.aten.cat.default and (args[1] if len(args) > 1 else kwargs.get("dim", 0)) % out.dim() == out.dim() - 1:
            known = []  # along the last dimension: the leading pieces whose values are known, then one piece's head
            for piece in args[0]:
                value = _known(piece)
                known.append(value if value is not None else getattr(piece, "_dry_head", None))
                if value is None:
                    break
            known = [k for k in known if k is not None]
            with unset_fake_temporarily():
                head = torch.cat(known, dim=-1) if known else None
        else:
            missing = []

            def head_of(x):
                if isinstance(x, FakeTensor):
                    value = _known(x)
                    value = value if value is not None else getattr(x, "_dry_head", None)
                    if value is None:
                        missing.append(x)
                    return value
                if isinstance(x, torch.device):
                    return torch.device("cpu")
                return x

            converted = pytree.tree_map(head_of, (args, kwargs))
            if missing or not any(hasattr(t, "_dry_head") for t in pytree.tree_leaves(args) if isinstance(t, FakeTensor)):
                return
            if not _keeps_rows(func, args, kwargs):
                return
            try:
                with unset_fake_temporarily():
                    head = func(*converted[0], **{k: v for k, v in converted[1].items() if k != "pin_memory"})
            except Exception:  # a read beyond the head (a slice past it, a shape it cannot take)
                return
        if not isinstance(head, torch.Tensor):
            return
        if head.shape == out.shape:
            out._dry_value = head  # all known (a read inside the head)
        elif out.dim() and head.dim() == out.dim() and head.shape[:-1] == out.shape[:-1] and 0 < head.shape[-1] < out.shape[-1]:
            out._dry_head = head


_UNKNOWN = object()
_aten = torch.ops.aten
# ops that move whole rows (or change dtype / device) and keep each row's values in order along the last dimension
_ROW_OPS = {_aten.cat.default, _aten.stack.default, _aten._to_copy.default, _aten.clone.default, _aten.detach.default,
            _aten.alias.default, _aten.index.Tensor, _aten.select.int, _aten.slice.Tensor, _aten.unsqueeze.default,
            _aten.index_select.default, _aten.lift_fresh.default}


def _keeps_rows(func, args, kwargs) -> bool:
    """Whether the op's output starts, along its last dimension, where its input's does (so the head's result is a
    head of the output): not an index into the last dimension, nor a slice or select counted from its end."""
    last = args[0].dim() - 1 if isinstance(args[0], torch.Tensor) else None
    if func is _aten.index.Tensor:
        return len(args[1]) < args[0].dim()
    if func is _aten.index_select.default:
        return args[1] % args[0].dim() != last
    if func is _aten.select.int:
        return args[1] % args[0].dim() != last or args[2] >= 0
    if func is _aten.slice.Tensor:
        dim = (args[1] if len(args) > 1 else kwargs.get("dim", 0)) % args[0].dim()
        start = args[2] if len(args) > 2 else kwargs.get("start")
        end = args[3] if len(args) > 3 else kwargs.get("end")
        return dim != last or ((start or 0) >= 0 and (end is None or end >= 0))
    return True


def _known(tensor) -> torch.Tensor | None:
    if not isinstance(tensor, FakeTensor):
        return tensor
    return getattr(tensor, "_dry_value", None)


def _moves_only(args, kwargs) -> bool:
    """A `_to_copy` that changes the device and nothing else."""
    return len(args) == 1 and all(key in ("device", "non_blocking") or (key == "dtype" and value in (None, args[0].dtype))
                                  or (key == "layout" and value in (None, torch.strided)) for key, value in kwargs.items())


def _written(func, args, kwargs) -> list:
    schema = func._schema
    written = []
    for index, argument in enumerate(schema.arguments):
        if argument.alias_info is not None and argument.alias_info.is_write:
            value = args[index] if index < len(args) else kwargs.get(argument.name)
            written += [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]
    return written


def _leaves(tree, path: str = ""):
    """(key path, value) of every leaf of nested dicts, lists and tuples."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, f"{path}.{key}" if path else str(key))
    elif isinstance(tree, (list, tuple)):
        for index, value in enumerate(tree):
            yield from _leaves(value, f"{path}[{index}]")
    else:
        yield path, tree
