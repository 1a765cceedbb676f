"""The sealed model format: what crosses from a variant's process to the evaluator.

A variant hands over its model as a graph of ATen operators plus the graph's tensors, and
nothing else: no Python of the variant's survives the crossing. `write_model` runs in the
variant's process and is only a convenience (a variant could write any bytes); `read_model`
runs in the evaluator and trusts nothing in the file. It never unpickles, imports or execs
(`torch.export.load` unpickles, so it is not used): operators are looked up by name in
`torch.ops.aten` only and must pass `_check_operator`, tensors are raw bytes with a dtype and
a shape, and the graph is walked by a small interpreter (`Model`).

File: MAGIC, the header's length (8 bytes, little-endian), the header (UTF-8 JSON), tensor bytes.
The header holds the batch shape the graph was captured at, the tensors' dtype/shape/offset,
and the graph: its nodes in order, each an operator with arguments that refer to the model's
input, a tensor, or an earlier node. Values that JSON lacks are tagged objects
(`{"dtype": "bfloat16"}`, `{"float": "inf"}`, `{"node": 3}`).
"""

from __future__ import annotations

import json
import math
import re
import struct
from typing import Any, BinaryIO

import torch

MAGIC = b"EVOSEAL1"
SUFFIX = ".evomodel"
MAX_HEADER_BYTES = 64 * 2**20

DTYPES = {
    name: getattr(torch, name)
    for name in ("float32", "float64", "float16", "bfloat16", "complex64", "complex128",
                 "int64", "int32", "int16", "int8", "uint8", "bool")
}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
LAYOUTS = {"strided": torch.strided}
MEMORY_FORMATS = {"contiguous_format": torch.contiguous_format, "preserve_format": torch.preserve_format,
                  "channels_last": torch.channels_last}

# What a handed-over graph may call: torch's core ATen operator set (the small, stable IR its
# compilers target) plus the composite operators torch.export keeps for a transformer (linear,
# attention, norms, ...), listed by name. Nothing else: an allow-list, because the long tail of
# ATen holds operators that read files, skip bounds checks or return uninitialised memory.
_COMPOSITES = frozenset("""
    linear bilinear scaled_dot_product_attention _scaled_dot_product_flash_attention
    _scaled_dot_product_flash_attention_for_cpu _scaled_dot_product_efficient_attention
    _scaled_dot_product_cudnn_attention rms_norm layer_norm group_norm embedding unbind chunk split split_with_sizes tensor_split to _assert_tensor_metadata square
    transpose t swapaxes movedim reshape contiguous matmul einsum softmax log_softmax gelu silu mish
    softplus hardtanh relu6 flatten unflatten expand_as view_as type_as repeat_interleave
    baddbmm cumsum cumprod tril triu masked_fill where zeros_like ones_like full_like new_zeros
    new_ones new_full new_empty outer polar view_as_complex view_as_real complex stack hstack vstack
    narrow index_select squeeze unsqueeze norm linalg_vector_norm rsqrt lerp sigmoid logsumexp mean
    std var conv1d conv2d pad roll flip clamp minimum maximum floor_divide remainder argmax topk sort
    detach clone lift_fresh_copy cross dot vdot kron atleast_2d broadcast_to logical_and logical_or
    logical_not one_hot cosine_similarity _unsafe_view
""".split())
# Even if core or listed above: operators that reinterpret storage or resize; backward kernels and
# low-level norm kernels, which trust their callers' shapes (out-of-bounds reads and writes); and
# randomness, which would make a score depend on what the evaluator ran before.
_DENIED = re.compile(r"as_strided|resize|storage|unsafe_(index|masked|split|chunk)|from_file|save|load|print|warn"
                     r"|^set|nested|sparse|mkldnn|quantiz|pin_memory|record_stream|segment_reduce|backward"
                     r"|batch_norm|instance_norm|embedding_bag|^_fused|^rand|bernoulli|normal|uniform|multinomial"
                     r"|dropout|poisson|exponential|geometric|cauchy")
# Allocations whose memory is not initialised could show the evaluator's earlier data: zeroed.
_UNINITIALISED = re.compile(r"^(new_)?empty(_like|_strided|_permuted)?$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def is_allowed(op: torch._ops.OpOverload) -> bool:
    """On the allow-list: a core ATen operator or a listed composite, never denied or mutating."""
    packet_name = op.name().removeprefix("aten::").partition(".")[0]
    return (op.namespace == "aten" and not _DENIED.search(packet_name) and not op._schema.is_mutable
            and (packet_name in _COMPOSITES or torch.Tag.core in op.tags))


class ExportError(Exception):
    """The model could not be captured as a graph (raised in the variant's process)."""


class SealedFormatError(Exception):
    """The file is not a model the evaluator will run; the message says why."""


# ---------------------------------------------------------------------------------------------
# Writing (in the variant's process)
# ---------------------------------------------------------------------------------------------


class _HandedOver(torch.nn.Module):
    """The model as the evaluator calls it: token ids in, float logits out (bf16 autocast on CUDA)."""

    def __init__(self, model: torch.nn.Module, autocast_device: str | None):
        super().__init__()
        self.model = model
        self.autocast_device = autocast_device

    def forward(self, idx):
        if self.autocast_device:
            with torch.autocast(self.autocast_device, dtype=torch.bfloat16):
                out = self.model(idx)
        else:
            out = self.model(idx)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.float()


def _short(error: BaseException) -> str:
    """torch.export's messages run to pages; the first lines say what went wrong."""
    text = f"{type(error).__name__}: {error}".strip()
    lines = [line for line in text.splitlines() if line.strip()][:6]
    return "\n".join(lines)[:1200]


def write_model(model: torch.nn.Module, batch_size: int, seq_len: int, device: str, out: BinaryIO) -> dict:
    """Capture `model` with torch.export at (batch_size, seq_len) and write it sealed; returns the header."""
    example = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
    module = _HandedOver(model, "cuda" if device == "cuda" else None)
    try:
        with torch.no_grad():
            program = torch.export.export(module, (example,), strict=False)
        if _has_in_place_ops(program.graph_module):
            # In-place ops (relu_, add_ on an activation) become out-of-place, and a write to the
            # model's own state becomes a visible mutation, refused just below.
            program = program.run_decompositions({})
    except Exception as e:  # torch.export raises many types; all mean "this model cannot be captured"
        raise ExportError(_short(e)) from None

    tensors: dict[str, torch.Tensor] = {}
    signature = program.graph_signature
    mutated = [spec for spec in signature.output_specs if spec.kind.name != "USER_OUTPUT"]
    if mutated:
        raise ExportError("the model changes its own state while it runs (buffer or input mutation: "
                          f"{', '.join(str(s.target) for s in mutated[:3])}); the evaluator scores stateless models only")
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    inputs: dict[str, Any] = {}
    for node, spec in zip(placeholders, signature.input_specs):
        kind = spec.kind.name
        if kind == "USER_INPUT":
            inputs[node.name] = {"input": 0}
        elif kind in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR"):
            source = program.state_dict if spec.target in program.state_dict else program.constants
            tensors[spec.target] = source[spec.target]
            inputs[node.name] = {"tensor": spec.target}
        else:
            raise ExportError(f"the model holds a {kind.lower()} ({spec.target}), which the evaluator cannot run")
    graph = _encode_graph(program.graph_module, program.graph, inputs)

    table, offset, blobs = {}, 0, []
    for name, tensor in tensors.items():
        data = _tensor_bytes(name, tensor)
        table[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape), "offset": offset, "nbytes": len(data)}
        blobs.append(data)
        offset += len(data)
    header = {"batch_size": batch_size, "seq_len": seq_len, "tensors": table, "graph": graph}
    encoded = json.dumps(header, allow_nan=False).encode()
    out.write(MAGIC + struct.pack("<Q", len(encoded)) + encoded)
    for data in blobs:
        out.write(data)
    return header


def _has_in_place_ops(module: torch.nn.Module) -> bool:
    for graph_module in module.modules():
        for node in getattr(graph_module, "graph", torch.fx.Graph()).nodes:
            if isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable:
                return True
    return False


def _tensor_bytes(name: str, tensor: torch.Tensor) -> bytes:
    if tensor.dtype not in _DTYPE_NAMES or tensor.layout != torch.strided or tensor.is_quantized:
        raise ExportError(f"tensor {name} has dtype {tensor.dtype} / layout {tensor.layout}, which the evaluator cannot load")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _encode_graph(module: torch.fx.GraphModule, graph: torch.fx.Graph, inputs: dict[str, Any]) -> dict:
    values = dict(inputs)  # fx node name -> encoded reference
    nodes, output = [], None
    for node in graph.nodes:
        if node.op == "placeholder":
            if node.name not in values:
                raise ExportError(f"unexpected graph input {node.name}")
        elif node.op == "get_attr":
            values[node.name] = {"submodule": node.target}
        elif node.op == "call_function":
            nodes.append(_encode_call(module, node, values))
            values[node.name] = {"node": len(nodes) - 1}
        elif node.op == "output":
            output = _encode_value(node.args[0], values)
        else:
            raise ExportError(f"graph node {node.op} {node.target} is not supported")
    return {"nodes": nodes, "output": output}


def _encode_call(module: torch.fx.GraphModule, node: torch.fx.Node, values: dict) -> dict:
    import operator

    target = node.target
    if target is operator.getitem:
        return {"op": "getitem", "args": [_encode_value(a, values) for a in node.args]}
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":
        if not is_allowed(target):
            raise ExportError(f"the graph calls aten.{_op_name(target)}, which the evaluator does not run "
                              "(allowed: core ATen plus the composites listed in trainer/sealed.py)")
        return {"op": _op_name(target), "args": [_encode_value(a, values) for a in node.args],
                "kwargs": {k: _encode_value(v, values) for k, v in node.kwargs.items()}}
    name = getattr(target, "__name__", str(target))
    if name in ("wrap_with_autocast", "wrap_with_set_grad_enabled"):
        if name == "wrap_with_autocast":
            device_type, dtype, enabled, _cache, submodule, *operands = node.args
            region = {"op": "autocast", "dtype": _encode_value(dtype, values), "enabled": bool(enabled)}
        else:
            _enabled, submodule, *operands = node.args
            region = {"op": "region"}  # grad mode is irrelevant: the evaluator never takes gradients
        inner = getattr(module, submodule.target)
        sub_inputs = {p.name: {"arg": i} for i, p in enumerate(n for n in inner.graph.nodes if n.op == "placeholder")}
        region["graph"] = _encode_graph(inner, inner.graph, sub_inputs)
        region["args"] = [_encode_value(a, values) for a in operands]
        return region
    raise ExportError(f"the graph calls {name}, which is not an ATen operator; the evaluator runs ATen operators only")


def _op_name(op: torch._ops.OpOverload) -> str:
    """aten.linear.default -> 'linear.default'."""
    packet, _, overload = op.name().removeprefix("aten::").partition(".")
    return f"{packet}.{overload or 'default'}"


def _encode_value(value: Any, values: dict) -> Any:
    if isinstance(value, torch.fx.Node):
        return values[value.name]
    if isinstance(value, (list, tuple)):
        return [_encode_value(v, values) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, torch.dtype):
        return {"dtype": _DTYPE_NAMES.get(value) or _refuse_value(value)}
    if isinstance(value, torch.device):
        return {"device": value.type}
    if isinstance(value, torch.layout):
        return {"layout": "strided"} if value == torch.strided else _refuse_value(value)
    if isinstance(value, torch.memory_format):
        names = {v: k for k, v in MEMORY_FORMATS.items()}
        return {"memory_format": names.get(value) or _refuse_value(value)}
    return _refuse_value(value)


def _refuse_value(value: Any):
    raise ExportError(f"the graph passes a {type(value).__name__} ({value!r:.80}) that the evaluator cannot carry")


# ---------------------------------------------------------------------------------------------
# Reading and running (in the evaluator)
# ---------------------------------------------------------------------------------------------


def _check_operator(name: str):
    """An ATen operator by its 'packet.overload' name, or SealedFormatError saying why not."""
    packet_name, _, overload_name = name.partition(".")
    if not (_NAME.match(packet_name) and _NAME.match(overload_name or "default")):
        raise SealedFormatError(f"{name[:80]!r} is not an operator name")
    try:
        op = getattr(getattr(torch.ops.aten, packet_name), overload_name or "default")
    except (AttributeError, RuntimeError):
        op = None
    if not isinstance(op, torch._ops.OpOverload) or not is_allowed(op):
        raise SealedFormatError(f"operator aten.{name} is not on the evaluator's list of allowed operators "
                                "(core ATen plus the composites in trainer/sealed.py)")
    if _UNINITIALISED.match(packet_name):
        return _zeroed(op)
    return op


def _zeroed(op):
    def allocate(*args, **kwargs):
        return op(*args, **kwargs).zero_()

    return allocate


class Model:
    """A handed-over model, callable on a (batch_size, seq_len) tensor of token ids."""

    def __init__(self, header: dict, tensors: dict[str, torch.Tensor], device: torch.device):
        self.batch_size = header["batch_size"]
        self.seq_len = header["seq_len"]
        self.device = device
        self.tensors = tensors
        self.graph = _prepare_graph(header["graph"], tensors, device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape) != (self.batch_size, self.seq_len):
            raise ValueError(f"the model was captured for input {(self.batch_size, self.seq_len)}, got {tuple(x.shape)}")
        out = _run(self.graph, [x], self)
        if isinstance(out, list) and len(out) == 1:
            out = out[0]
        if not isinstance(out, torch.Tensor):
            raise SealedFormatError(f"the model's output is a {type(out).__name__}, not a tensor of logits")
        return out


def read_model(data: bytes | memoryview, device: str | torch.device, max_batch: int = 4096) -> Model:
    """Parse and check a sealed model; every problem is a SealedFormatError with a plain message."""
    device = torch.device(device)
    view = memoryview(data if not isinstance(data, bytes) else bytearray(data))  # torch wants a writable buffer
    if len(view) < 16 or bytes(view[:8]) != MAGIC:
        raise SealedFormatError("not a sealed model file (wrong magic bytes)")
    (length,) = struct.unpack("<Q", view[8:16])
    if length > MAX_HEADER_BYTES or 16 + length > len(view):
        raise SealedFormatError(f"header of {length} bytes does not fit the file")
    try:
        header = json.loads(bytes(view[16 : 16 + length]))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise SealedFormatError(f"header is not JSON that can be read: {str(e)[:200]}") from None
    if not isinstance(header, dict) or not {"batch_size", "seq_len", "tensors", "graph"} <= set(header):
        raise SealedFormatError("header lacks batch_size, seq_len, tensors or graph")
    batch, seq = header["batch_size"], header["seq_len"]
    if not (isinstance(batch, int) and 1 <= batch <= max_batch and isinstance(seq, int) and seq >= 1):
        raise SealedFormatError(f"batch_size {batch!r} / seq_len {seq!r} out of range (batch 1..{max_batch})")
    body = view[16 + length :]
    tensors = {}
    for name, spec in _mapping(header["tensors"], "tensors").items():
        tensors[name] = _read_tensor(name, spec, body, device)
    try:
        return Model(header, tensors, device)
    except RecursionError:
        raise SealedFormatError("the graph is nested too deeply") from None


def _mapping(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise SealedFormatError(f"{what} must be a JSON object")
    return value


def _read_tensor(name: str, spec: dict, body: memoryview, device: torch.device) -> torch.Tensor:
    try:
        dtype = DTYPES[spec["dtype"]]
        shape = [int(s) for s in spec["shape"]]
        offset, nbytes = int(spec["offset"]), int(spec["nbytes"])
    except (KeyError, TypeError, ValueError):
        raise SealedFormatError(f"tensor {name[:80]!r}: bad dtype/shape/offset/nbytes in {spec!r:.200}") from None
    numel = math.prod(shape)
    if any(s < 0 for s in shape) or nbytes != numel * dtype.itemsize or offset < 0 or offset + nbytes > len(body):
        raise SealedFormatError(f"tensor {name[:80]!r}: shape {str(shape)[:80]} of {spec['dtype']} does not match its "
                                f"{nbytes} bytes at {offset}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    raw = torch.frombuffer(body, dtype=torch.uint8, count=nbytes, offset=offset)
    return raw.view(dtype).reshape(shape).to(device)  # .to copies: the file's buffer is not kept


def _prepare_graph(graph: dict, tensors: dict, device: torch.device) -> dict:
    """Resolve operators and check every reference once, so running is a plain walk."""
    graph = _mapping(graph, "graph")
    nodes = graph.get("nodes")
    if not isinstance(nodes, list):
        raise SealedFormatError("graph.nodes must be a list")
    prepared = []
    for index, node in enumerate(nodes):
        node = _mapping(node, f"node {index}")
        op = node.get("op")
        check = lambda v: _check_value(v, index, tensors, device)  # noqa: E731
        if op == "getitem":
            prepared.append(("getitem", None, [check(a) for a in node.get("args", [])], {}))
        elif op in ("autocast", "region"):
            inner = _prepare_graph(node.get("graph"), tensors, device)
            dtype = _check_value(node.get("dtype"), index, tensors, device) if op == "autocast" else None
            prepared.append((op, (inner, dtype, bool(node.get("enabled", True))), [check(a) for a in node.get("args", [])], {}))
        elif isinstance(op, str):
            kwargs = _mapping(node.get("kwargs", {}), f"node {index} kwargs")
            prepared.append(("call", _check_operator(op), [check(a) for a in node.get("args", [])],
                             {str(k): check(v) for k, v in kwargs.items()}))
        else:
            raise SealedFormatError(f"node {index}: op must be a string")
    output = _check_value(graph.get("output"), len(nodes), tensors, device)
    return {"nodes": prepared, "output": output}


class _Ref:
    __slots__ = ("kind", "key")

    def __init__(self, kind: str, key):
        self.kind, self.key = kind, key


def _check_value(value, index: int, tensors: dict, device: torch.device):
    """Decode one argument; references may only point backwards (the graph is acyclic)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_check_value(v, index, tensors, device) for v in value]
    if not isinstance(value, dict) or len(value) != 1:
        raise SealedFormatError(f"node {index}: cannot decode argument {value!r:.120}")
    (tag, content), = value.items()
    if tag == "node" and isinstance(content, int) and 0 <= content < index:
        return _Ref("node", content)
    if tag in ("input", "arg") and isinstance(content, int) and content >= 0:
        return _Ref(tag, content)
    if tag == "tensor" and content in tensors:
        return _Ref("tensor", content)
    if tag == "dtype" and content in DTYPES:
        return DTYPES[content]
    if tag == "device":
        return device  # captured on the variant's device; runs on the evaluator's
    if tag == "layout" and content in LAYOUTS:
        return LAYOUTS[content]
    if tag == "memory_format" and content in MEMORY_FORMATS:
        return MEMORY_FORMATS[content]
    if tag == "float" and content in ("inf", "-inf", "nan"):
        return float(content)
    raise SealedFormatError(f"node {index}: bad reference or value {value!r:.120}")


def _resolve(value, results: list, args: list, model: Model):
    if isinstance(value, _Ref):
        if value.kind == "node":
            return results[value.key]
        if value.kind == "tensor":
            return model.tensors[value.key]
        source = args if value.kind in ("input", "arg") else None
        if value.key >= len(source):
            raise SealedFormatError(f"reference to argument {value.key} of {len(source)}")
        return source[value.key]
    if isinstance(value, list):
        return [_resolve(v, results, args, model) for v in value]
    return value


def _run(graph: dict, args: list, model: Model):
    results: list = []
    for kind, target, raw_args, raw_kwargs in graph["nodes"]:
        call_args = [_resolve(a, results, args, model) for a in raw_args]
        if kind == "call":
            kwargs = {k: _resolve(v, results, args, model) for k, v in raw_kwargs.items()}
            results.append(target(*call_args, **kwargs))
        elif kind == "getitem":
            container, position = call_args
            if not isinstance(container, (tuple, list)) or not isinstance(position, int):
                raise SealedFormatError("getitem on something that is not a tuple of results")
            results.append(container[position])
        else:
            inner, dtype, enabled = target
            if kind == "autocast":
                with torch.autocast(model.device.type, dtype=dtype, enabled=enabled):
                    results.append(_as_tuple(_run(inner, call_args, model)))
            else:
                results.append(_as_tuple(_run(inner, call_args, model)))
    return _resolve(graph["output"], results, args, model)


def _as_tuple(value):
    return tuple(value) if isinstance(value, list) else (value,)
