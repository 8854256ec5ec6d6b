#!/usr/bin/python3
"""Check, with PyTorch itself, checkpoints that RepFuse wrote.

Called by the TypeScript test-suite (Debian's PyTorch: run it with /usr/bin/python3):

    check_fused.py state_dict  <family> <fused.pt|.pth|.safetensors> [--fp16]
    check_fused.py full_module <fused_full.pt> [--original FIXTURE.pt] [--family F]
    check_fused.py load        <file.pt|.pth|.safetensors>

It prints exactly ONE JSON line on stdout and exits with

    0  the file is correct                     ({"ok": true, ...})
    1  the file was examined and is wrong      ({"ok": false, "stage": ..., "error": ...}),
       including "cannot be loaded", "weights_only=True refuses it", wrong keys,
       shapes or dtypes, or outputs that do not match the reference
    2  the check itself could not run          ({"ok": false, "stage": "usage"|"setup", ...}):
       bad arguments, missing file, unknown family, missing reference fixtures

Modes
-----
state_dict   Builds the family's fixture net (test/fixtures/python/models/common.py,
             the same seeds as test/fixtures/torch/make_torch_fixtures.py), converts it
             to deploy form with the modules' own switch_to_deploy(), then
             ``load_state_dict(torch.load(f, map_location='cpu', weights_only=True),
             strict=True)`` -- weights_only=True succeeding is part of the contract.
             A .safetensors file is parsed here (struct + json + torch.frombuffer) and
             validated against the format's rules.  A dict wrapping the weights under
             'state_dict' / 'model' / 'ema' / 'net' / 'params' and a 'module.' prefix
             (DataParallel) are accepted and reported ("entry", "prefix").  The deployed
             net is run in float32 on test/fixtures/torch/<family>.input.npy and compared
             with <family>.output.npy (the *unfused* net's output).  Floating tensors
             must be float32 (or float16 with --fp16).  Tolerance 1e-4 (fp32) or 5e-2
             (--fp16), relative to max(1, max|reference|).
full_module  Unpickles a full-module checkpoint (torch.load without weights_only, with
             test/fixtures/python and test/fixtures/torch/python on sys.path).  Before
             unpickling, every GLOBAL / STACK_GLOBAL in the pickle is checked against an
             allow-list (torch, collections, numpy, _codecs, models.*, ultralytics.*);
             anything else (e.g. posix.system) is refused without being loaded.
             Then: ckpt['model'] (or ckpt['ema'] when 'model' is None) must be an
             nn.Module whose rep blocks are all in deploy form (deploy flag set, branch
             attributes removed or None, the deployed conv present with a bias); every
             other checkpoint entry and every plain module attribute (yaml, names,
             stride, i/f/type/np, ...) must equal the original fixture's; parameter
             dtypes must be unchanged; the model, cast to float32, must reproduce the
             reference output (tolerance 5e-2 for fp16 checkpoints, 1e-4 for fp32).
             The original fixture is --original, or looked up in
             test/fixtures/torch/manifest.json by family (inferred from the block
             classes) and by which entry holds the model.
load         torch.load(f, map_location='cpu', weights_only=True) (or the safetensors
             parser) and report every tensor's dtype and shape, the container layout and,
             for zip files, the archive's records (CRC-checked with zipfile).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import pickletools
import struct
import sys
import traceback
import zipfile
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Optional, Tuple

sys.dont_write_bytecode = True

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
MODELS_DIR = os.path.join(REPO, "test", "fixtures", "python")
TORCH_FIXTURES = os.path.join(REPO, "test", "fixtures", "torch")
SHIM_DIR = os.path.join(TORCH_FIXTURES, "python")  # stand-in 'ultralytics' package
for _p in (SHIM_DIR, MODELS_DIR):
    if _p not in sys.path:
        sys.path.insert(0, _p)

TOL_FP32 = 1e-4
TOL_FP16 = 5e-2
WEIGHT_ENTRIES = ("state_dict", "model", "ema", "net", "params", "model_state_dict")

# Families whose fixture nets exist (the ONNX-only 'yolov7dedup' is not a torch fixture).
FAMILIES = ("repvgg", "yolov7", "mobileone", "ultralytics", "acnet", "qarepvgg", "repvit",
            "ppyoloe")


class CheckFailed(Exception):
    """The file was examined and is wrong (exit 1)."""

    def __init__(self, stage: str, message: str, **extra):
        super().__init__(message)
        self.stage = stage
        self.extra = extra


class SetupError(Exception):
    """The check could not run (exit 2)."""

    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage


# ----------------------------------------------------------------------------------
# what "deploy form" means, per block class (the checker's own spec; the fixture
# script cross-checks it against what switch_to_deploy() really does)
# ----------------------------------------------------------------------------------

def block_spec():
    """class -> (family, deploy flag attribute or None, deployed conv attribute,
    training-branch attributes that must be gone or None).  Ordered: subclasses first."""
    from models import common as C
    return [
        (C.QARepVGGBlock, "qarepvgg", "deploy", "rbr_reparam",
         ("rbr_dense", "rbr_1x1", "rbr_identity")),
        (C.RepVGGBlock, "repvgg", "deploy", "rbr_reparam",
         ("rbr_dense", "rbr_1x1", "rbr_identity")),
        (C.RepConv, "yolov7", "deploy", "rbr_reparam",
         ("rbr_dense", "rbr_1x1", "rbr_identity")),
        (C.MobileOneBlock, "mobileone", "inference_mode", "reparam_conv",
         ("rbr_conv", "rbr_scale", "rbr_skip")),
        (C.UltralyticsRepConv, "ultralytics", None, "conv", ("conv1", "conv2", "bn")),
        (C.UltralyticsRepVGGDW, "ultralytics", None, "conv", ("conv1",)),
        (C.ACBlock, "acnet", "deploy", "fused_conv",
         ("square_conv", "square_bn", "ver_conv", "ver_bn", "hor_conv", "hor_bn")),
        (C.RepViTRepVGGDW, "repvit", None, "conv", ("conv1", "bn")),
        (C.RepVggBlock, "ppyoloe", None, "conv", ("conv1", "conv2")),
    ]


def spec_for(m) -> Optional[Tuple]:
    for entry in block_spec():
        if isinstance(m, entry[0]):
            return entry
    return None


def rep_blocks(model) -> List[Tuple[str, Any]]:
    return [(n, m) for n, m in model.named_modules() if spec_for(m) is not None]


def deploy_problems(name: str, m) -> List[str]:
    """Why block `m` is not in deploy form ([] if it is)."""
    import torch.nn as nn
    _, family, flag, conv_name, branches = spec_for(m)
    probs = []
    if flag is not None and getattr(m, flag, None) is not True:
        probs.append(f"{name}: {type(m).__name__}.{flag} is {getattr(m, flag, '<missing>')!r}, "
                     f"expected True")
    for b in branches:
        if getattr(m, b, None) is not None:
            probs.append(f"{name}: training branch '{b}' still present "
                         f"({type(getattr(m, b)).__name__})")
    conv = getattr(m, conv_name, None)
    if not isinstance(conv, nn.Conv2d):
        probs.append(f"{name}: deployed conv '{conv_name}' is "
                     f"{type(conv).__name__ if conv is not None else 'missing'}, "
                     f"expected torch.nn.Conv2d")
    elif conv.bias is None:
        probs.append(f"{name}: deployed conv '{conv_name}' has no bias")
    return probs


def family_of_model(model) -> Optional[str]:
    fams = sorted({spec_for(m)[1] for _, m in rep_blocks(model)})
    return fams[0] if len(fams) == 1 else None


# ----------------------------------------------------------------------------------
# safetensors (parsed and written by hand: no 'safetensors' package needed)
# ----------------------------------------------------------------------------------

ST_DTYPES = {  # safetensors dtype -> (torch dtype name, itemsize)
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2),
    "BF16": ("bfloat16", 2), "I64": ("int64", 8), "I32": ("int32", 4),
    "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1), "BOOL": ("bool", 1),
}


def read_safetensors(path: str) -> Tuple["OrderedDict[str, Any]", Dict[str, str], Dict]:
    """Parse and validate a .safetensors file. Returns (tensors, metadata, info).
    Raises CheckFailed('safetensors', ...) on any violation of the format."""
    import torch
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise CheckFailed("safetensors", f"file is {len(raw)} bytes, shorter than the 8-byte "
                                         f"header length")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > 100_000_000 or 8 + n > len(raw):
        raise CheckFailed("safetensors", f"header length {n} impossible for a {len(raw)}-byte "
                                         f"file")
    try:
        header = json.loads(raw[8:8 + n].decode("utf-8"), object_pairs_hook=OrderedDict)
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckFailed("safetensors", f"header is not UTF-8 JSON: {e}")
    if not isinstance(header, dict):
        raise CheckFailed("safetensors", "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckFailed("safetensors", "__metadata__ must map strings to strings")
    body = memoryview(raw)[8 + n:]
    spans = []
    tensors: "OrderedDict[str, Any]" = OrderedDict()
    for name, h in header.items():
        if not isinstance(h, dict) or set(h) != {"dtype", "shape", "data_offsets"}:
            raise CheckFailed("safetensors", f"{name}: entry must have exactly dtype, shape, "
                                             f"data_offsets (has {sorted(h) if isinstance(h, dict) else h!r})")
        dt, shape, offs = h["dtype"], h["shape"], h["data_offsets"]
        if dt not in ST_DTYPES:
            raise CheckFailed("safetensors", f"{name}: unknown dtype {dt!r}")
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise CheckFailed("safetensors", f"{name}: bad shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(
                isinstance(o, int) for o in offs) and 0 <= offs[0] <= offs[1] <= len(body)):
            raise CheckFailed("safetensors", f"{name}: bad data_offsets {offs!r} "
                                             f"(data section is {len(body)} bytes)")
        tname, itemsize = ST_DTYPES[dt]
        numel = math.prod(shape)
        if offs[1] - offs[0] != numel * itemsize:
            raise CheckFailed("safetensors", f"{name}: {dt}{shape} needs {numel * itemsize} "
                                             f"bytes, data_offsets span {offs[1] - offs[0]}")
        spans.append((offs[0], offs[1], name))
        dtype = getattr(torch, tname)
        if numel == 0:
            t = torch.empty(shape, dtype=dtype)
        else:
            t = torch.frombuffer(bytearray(body[offs[0]:offs[1]]), dtype=dtype).reshape(shape)
        tensors[name] = t
    pos = 0
    for b, e, name in sorted(spans):
        if b != pos:
            raise CheckFailed("safetensors", f"{name}: data starts at {b}, expected {pos} "
                                             f"(tensors must tile the data section without "
                                             f"gaps or overlaps)")
        pos = e
    if pos != len(body):
        raise CheckFailed("safetensors", f"data section is {len(body)} bytes but tensors "
                                         f"cover {pos}")
    info = {"header_bytes": n, "header_padded_to_8": (8 + n) % 8 == 0,
            "tensor_order_is_name_order": [s[2] for s in sorted(spans)] == sorted(
                s[2] for s in spans)}
    return tensors, metadata, info


def write_safetensors(path: str, tensors: Dict[str, Any],
                      metadata: Optional[Dict[str, str]] = None) -> None:
    """Write tensors (sorted by name, contiguous, little endian) in safetensors format;
    the JSON header is padded with spaces to a multiple of 8 bytes (as the reference
    implementation does)."""
    import torch
    rev = {getattr(torch, t): k for k, (t, _) in ST_DTYPES.items()}
    header: "OrderedDict[str, Any]" = OrderedDict()
    header["__metadata__"] = dict(metadata or {"format": "pt"})
    blobs = []
    pos = 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        data = t.numpy().tobytes() if t.dtype != torch.bfloat16 else \
            t.view(torch.int16).numpy().tobytes()
        header[name] = OrderedDict([("dtype", rev[t.dtype]), ("shape", list(t.shape)),
                                    ("data_offsets", [pos, pos + len(data)])])
        blobs.append(data)
        pos += len(data)
    assert sys.byteorder == "little"
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * ((8 - (8 + len(hb)) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for b in blobs:
            f.write(b)


# ----------------------------------------------------------------------------------
# static pickle inspection (never executes anything)
# ----------------------------------------------------------------------------------

def torch_file_layout(path: str) -> Dict:
    """{'format': 'zip'|'legacy'|'safetensors'|'unknown', ...} from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return {"format": "zip"}
    if head[:2] == b"\x80\x02" or head[:1] == b"\x80":
        return {"format": "legacy"}
    if len(head) >= 9 and head[8:9] == b"{":
        return {"format": "safetensors"}
    return {"format": "unknown"}


def zip_data_pkl(path: str) -> Tuple[str, bytes, List[str]]:
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pk = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pk) != 1:
            raise CheckFailed("zip", f"expected one data.pkl record, found {pk}")
        return pk[0], z.read(pk[0]), names


def pickle_globals_in(data: bytes, start: int = 0) -> Tuple[List[str], int]:
    """All classes/functions a pickle refers to ('module.name'), and where it ends.
    STACK_GLOBAL operands are resolved from the preceding string pushes (also through
    the memo); an unresolvable one is reported as '?.?'."""
    found = []
    memo: Dict[int, Any] = {}
    recent: List[Any] = []
    memo_next = 0
    end = start
    stream = io.BytesIO(data)
    stream.seek(start)
    ops = list(pickletools.genops(stream))
    getattr_memo: set = set()
    # Strings by memo index (a method name written once is fetched from the memo afterwards).
    strings: Dict[int, str] = {}
    for j, (o, a, _) in enumerate(ops):
        if o.name in ("BINPUT", "LONG_BINPUT", "PUT") and j and isinstance(ops[j - 1][1], str) and ops[j - 1][0].name.endswith(("UNICODE", "UNICODE8")):
            strings[int(a)] = ops[j - 1][1]
    for i, (op, arg, pos) in enumerate(ops):
        name = op.name
        val: Any = None
        is_getattr = (name == "GLOBAL" and arg in ("__builtin__ getattr", "builtins getattr")) or (
            name in ("BINGET", "LONG_BINGET", "GET") and int(arg) in getattr_memo)
        if is_getattr:
            # A module's bound-method attribute (YOLO's Model.fuse(): forward = forward_fuse) is
            # pickled as getattr(<the module, from the memo>, 'name'): allowed in exactly that shape.
            if name == "GLOBAL" and i + 1 < len(ops) and ops[i + 1][0].name in ("BINPUT", "LONG_BINPUT"):
                getattr_memo.add(int(ops[i + 1][1]))
            found.append("builtins.getattr(bound method)" if bound_method_at(ops, i + 1, strings) else "__builtin__.getattr")
            recent.append(None)
            continue
        if name == "GLOBAL":
            mod, _, attr = arg.partition(" ")
            found.append(f"{mod}.{attr}")
        elif name == "STACK_GLOBAL":
            if len(recent) >= 2 and isinstance(recent[-2], str) and isinstance(recent[-1], str):
                found.append(f"{recent[-2]}.{recent[-1]}")
            else:
                found.append("?.?")
        elif name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING",
                      "BINSTRING", "SHORT_BINSTRING"):
            val = arg
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            val = memo.get(int(arg))
        if name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[int(arg)] = recent[-1] if recent else None
        elif name == "MEMOIZE":
            memo[memo_next] = recent[-1] if recent else None
            memo_next += 1
        else:
            recent.append(val)
            recent = recent[-4:]
        if name == "STOP":
            end = stream.tell()
            break
    return found, end


def bound_method_at(ops, i: int, strings: Dict[int, str]) -> bool:
    """Whether ops[i:] read: [PUT] GET(obj) STRING(identifier) [PUT] TUPLE2 [PUT] REDUCE."""
    names = [(o.name, a) for o, a, _ in ops[i:i + 8]]
    names = [(n, a) for n, a in names if n not in ("BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE")]
    if len(names) < 4:
        return False
    (g, _), (sname, sval), (t, _), (r, _) = names[:4]
    if sname in ("BINGET", "LONG_BINGET", "GET"):
        sname, sval = "BINUNICODE", strings.get(int(sval))
    return (g in ("BINGET", "LONG_BINGET", "GET") and sname in ("BINUNICODE", "SHORT_BINUNICODE")
            and isinstance(sval, str) and sval.isidentifier() and not sval.startswith("_")
            and t == "TUPLE2" and r == "REDUCE")


def pickle_globals(path: str) -> List[str]:
    """Every GLOBAL of a torch file (zip: data.pkl; legacy: all five pickles)."""
    layout = torch_file_layout(path)["format"]
    if layout == "zip":
        _, data, _ = zip_data_pkl(path)
        return sorted(set(pickle_globals_in(data)[0]))
    if layout == "legacy":
        with open(path, "rb") as f:
            data = f.read()
        out, pos = [], 0
        for _ in range(5):  # magic, protocol version, sys_info, main object, storage keys
            g, pos = pickle_globals_in(data, pos)
            out += g
        return sorted(set(out))
    return []


SAFE_GLOBAL_PREFIXES = ("torch.", "collections.OrderedDict", "collections.defaultdict",
                        "numpy.core.multiarray.scalar", "numpy.core.multiarray._reconstruct",
                        "numpy._core.multiarray.scalar", "numpy._core.multiarray._reconstruct",
                        "numpy.dtype", "numpy.ndarray", "_codecs.encode", "models.",
                        "ultralytics.", "builtins.set", "builtins.frozenset", "builtins.slice",
                        "builtins.bytearray", "builtins.complex", "copyreg._reconstructor",
                        "__builtin__.set", "datetime.datetime", "pathlib.PosixPath",
                        "builtins.getattr(bound method)")
UNSAFE_TORCH = ("torch.load", "torch.save", "torch.hub", "torch.ops", "torch.jit",
                "torch.package", "torch.compile", "torch.utils.cpp_extension",
                "torch._C._jit", "torch.serialization.load", "torch.backends",
                "torch.distributed", "torch.multiprocessing", "torch.storage._load",
                "torch._dynamo", "torch.fx")


def refuse_unsafe_globals(path: str) -> List[str]:
    globs = pickle_globals(path)
    bad = [g for g in globs
           if not g.startswith(SAFE_GLOBAL_PREFIXES) or g.startswith(UNSAFE_TORCH)]
    if bad:
        raise CheckFailed("pickle_scan", f"refusing to unpickle {os.path.basename(path)}: it "
                                         f"references {bad} (not loaded)", globals=globs)
    return globs


# ----------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------

def torch_load_weights_only(path: str):
    import torch
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckFailed("load", f"torch.load(weights_only=True) failed: "
                                  f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def load_weights_file(path: str) -> Tuple[Any, Dict]:
    """torch.load(weights_only=True) or the safetensors parser; plus layout facts."""
    layout = torch_file_layout(path)
    if path.endswith(".safetensors") or layout["format"] == "safetensors":
        tensors, metadata, info = read_safetensors(path)
        layout = {"format": "safetensors", "metadata": metadata, **info}
        return tensors, layout
    if layout["format"] == "unknown":
        raise CheckFailed("load", "not a torch zip, legacy torch pickle or safetensors file")
    obj = torch_load_weights_only(path)
    if layout["format"] == "zip":
        name, _, names = zip_data_pkl(path)
        layout["archive_root"] = name[:-len("data.pkl")].rstrip("/")
        layout["records"] = names
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
            infos = z.infolist()
        if bad is not None:
            raise CheckFailed("zip", f"CRC mismatch in record {bad}")
        # informative: torch's writer pads every record's data to a 64-byte boundary
        unaligned = []
        with open(path, "rb") as f:
            for info in infos:
                f.seek(info.header_offset)
                h = f.read(30)
                n, m = struct.unpack("<HH", h[26:30])
                if (info.header_offset + 30 + n + m) % 64:
                    unaligned.append(info.filename)
        layout["records_not_64_aligned"] = unaligned
        layout["compressed_records"] = [i.filename for i in infos
                                        if i.compress_type != zipfile.ZIP_STORED]
    return obj, layout


def unwrap_state_dict(obj) -> Tuple["OrderedDict[str, Any]", Optional[str], str, List[str]]:
    """(flat state_dict, entry key or None, stripped prefix, other top-level keys)."""
    import torch
    if not isinstance(obj, dict):
        raise CheckFailed("layout", f"top-level object is {type(obj).__name__}, expected a "
                                    f"dict of tensors")
    entry = None
    others: List[str] = []
    if not all(torch.is_tensor(v) for v in obj.values()):
        cands = [k for k in WEIGHT_ENTRIES if isinstance(obj.get(k), dict)]
        if not cands:
            bad = [k for k, v in obj.items() if not torch.is_tensor(v)][:5]
            raise CheckFailed("layout", f"not a state_dict: non-tensor values at {bad} and no "
                                        f"{list(WEIGHT_ENTRIES)} entry")
        entry = cands[0]
        others = [str(k) for k in obj if k != entry]
        obj = obj[entry]
        bad = [k for k, v in obj.items() if not torch.is_tensor(v)][:5]
        if bad:
            raise CheckFailed("layout", f"non-tensor values in ['{entry}']: {bad}")
    keys = list(obj)
    prefix = ""
    if keys and all(isinstance(k, str) and k.startswith("module.") for k in keys):
        prefix = "module."
    sd = OrderedDict((k[len(prefix):], v) for k, v in obj.items())
    return sd, entry, prefix, others


def reference(family: str):
    import numpy as np
    import torch
    xi = os.path.join(TORCH_FIXTURES, f"{family}.input.npy")
    yo = os.path.join(TORCH_FIXTURES, f"{family}.output.npy")
    for p in (xi, yo):
        if not os.path.exists(p):
            raise SetupError("setup", f"reference {p} missing: run "
                                      f"/usr/bin/python3 test/fixtures/torch/make_torch_fixtures.py")
    return torch.from_numpy(np.load(xi)), torch.from_numpy(np.load(yo))


def build_deploy_net(family: str):
    from models import common as C
    net = C.build_family(family, seed=C.FAMILIES.index(family))
    for _, m in rep_blocks(net):
        m.switch_to_deploy()
    # RepViT's official replace_batchnorm puts the fused conv in the RepVGGDW block's place
    # (token_mixer.0.weight), which is the layout RepFuse writes.
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, C.RepViTRepVGGDW) and not hasattr(child, "conv1"):
                setattr(parent, name, child.conv)
    return net.eval()


def compare(y, ref, tol: float) -> Tuple[float, float]:
    import torch
    if tuple(y.shape) != tuple(ref.shape):
        raise CheckFailed("compare", f"output shape {list(y.shape)} != reference "
                                     f"{list(ref.shape)}")
    y = y.float()
    if not torch.isfinite(y).all():
        raise CheckFailed("compare", "output has NaN/Inf")
    d = float((y - ref).abs().max())
    bound = tol * max(1.0, float(ref.abs().max()))
    return d, bound


def dtype_summary(tensors: Iterable) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for t in tensors:
        k = str(t.dtype).replace("torch.", "")
        out[k] = out.get(k, 0) + 1
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------------
# modes
# ----------------------------------------------------------------------------------

def mode_state_dict(args) -> Dict:
    import torch
    if args.family not in FAMILIES:
        raise SetupError("usage", f"unknown family {args.family!r}; one of {list(FAMILIES)}")
    obj, layout = load_weights_file(args.file)
    sd, entry, prefix, others = unwrap_state_dict(obj)
    x, ref = reference(args.family)
    net = build_deploy_net(args.family)
    want = net.state_dict()
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    shape_mismatch = [f"{k}: {list(sd[k].shape)} != {list(want[k].shape)}"
                      for k in want if k in sd and sd[k].shape != want[k].shape]
    want_float = torch.float16 if args.fp16 else torch.float32
    dtype_mismatch = [f"{k}: {sd[k].dtype}" for k in sd
                      if sd[k].is_floating_point() and sd[k].dtype != want_float]
    int_mismatch = [f"{k}: {sd[k].dtype} != {want[k].dtype}" for k in want
                    if k in sd and not want[k].is_floating_point() and sd[k].dtype != want[k].dtype]
    result = OrderedDict([("ok", False), ("mode", "state_dict"), ("family", args.family),
                          ("file", args.file), ("format", layout["format"]), ("entry", entry),
                          ("prefix", prefix), ("other_entries", others),
                          ("tensors", len(sd)), ("dtypes", dtype_summary(sd.values())),
                          ("missing", missing), ("unexpected", unexpected)])
    if missing or unexpected or shape_mismatch:
        raise CheckFailed("keys", "state_dict does not match the deployed net "
                                  f"({len(missing)} missing, {len(unexpected)} unexpected, "
                                  f"{len(shape_mismatch)} shape mismatches)",
                          **result, shape_mismatch=shape_mismatch)
    if dtype_mismatch or int_mismatch:
        raise CheckFailed("dtype", f"expected floating tensors in {want_float}"
                                   + ("" if args.fp16 else " (pass --fp16 for a float16 file)"),
                          **result, dtype_mismatch=(dtype_mismatch + int_mismatch)[:20])
    try:
        net.load_state_dict(sd, strict=True)
    except Exception as e:  # noqa: BLE001
        raise CheckFailed("load_state_dict", f"{type(e).__name__}: {e}", **result)
    net = net.float().eval()
    with torch.no_grad():
        y = net(x)
    d, bound = compare(y, ref, TOL_FP16 if args.fp16 else TOL_FP32)
    result["max_abs_diff"] = d
    result["tolerance"] = bound
    if d > bound:
        raise CheckFailed("compare", f"max |fused - reference| = {d:.3g} > {bound:.3g}",
                          **result)
    result["ok"] = True
    return result


def _plain_attrs(m) -> Dict[str, Any]:
    return {k: v for k, v in vars(m).items() if not k.startswith("_") and k != "training"}


def same_value(a, b) -> bool:
    import numpy as np
    import torch
    if type(a) is not type(b):
        return False
    if torch.is_tensor(a):
        return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b))
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and a.tobytes() == b.tobytes()
    if isinstance(a, dict):
        return list(a) == list(b) and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001
        return False


def describe_value(v) -> Any:
    import numpy as np
    import torch
    import torch.nn as nn
    if isinstance(v, np.generic):  # before float: numpy.float64 subclasses float
        return f"<{type(v).__module__}.{type(v).__name__} {v.item()!r}>"
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, nn.Module):
        return f"<{type(v).__module__}.{type(v).__qualname__}>"
    if torch.is_tensor(v):
        return f"<tensor {str(v.dtype).replace('torch.', '')} {list(v.shape)}>"
    if isinstance(v, np.ndarray):
        return f"<numpy.ndarray {v.dtype} {list(v.shape)}>"
    if isinstance(v, dict):
        return {str(k): describe_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [describe_value(x) for x in v]
    return f"<{type(v).__module__}.{type(v).__qualname__}>"


def _load_full(path: str):
    import torch
    refuse_unsafe_globals(path)
    try:
        return torch.load(path, map_location="cpu")
    except Exception as e:  # noqa: BLE001
        raise CheckFailed("load", f"torch.load (full unpickling) failed: "
                                  f"{type(e).__name__}: {e}")


def _model_of(ckpt) -> Tuple[str, Any]:
    import torch.nn as nn
    if isinstance(ckpt, nn.Module):
        return "", ckpt
    if not isinstance(ckpt, dict):
        raise CheckFailed("layout", f"checkpoint is {type(ckpt).__name__}, expected a dict")
    for k in ("model", "ema"):
        if isinstance(ckpt.get(k), nn.Module):
            return k, ckpt[k]
    raise CheckFailed("layout", f"no nn.Module under 'model' or 'ema' (keys {list(ckpt)})")


def find_original(family: str, entry: str) -> str:
    mpath = os.path.join(TORCH_FIXTURES, "manifest.json")
    if not os.path.exists(mpath):
        raise SetupError("setup", f"{mpath} missing; pass --original")
    with open(mpath) as f:
        manifest = json.load(f)
    form = "full_module" if entry == "model" else "full_module_ema"
    files = [e["file"] for e in manifest["files"]
             if e["family"] == family and e["form"] == form]
    if len(files) != 1:
        raise SetupError("setup", f"no unique {form} fixture for family {family} in the "
                                  f"manifest ({files}); pass --original")
    return os.path.join(TORCH_FIXTURES, files[0])


def mode_full_module(args) -> Dict:
    import torch
    import torch.nn as nn
    globs = pickle_globals(args.file)
    ckpt = _load_full(args.file)
    entry, model = _model_of(ckpt)
    family = args.family or family_of_model(model)
    if family is None:
        # RepFuse may have replaced the block objects; fall back to the original's family
        if not args.original:
            raise CheckFailed("blocks", "no rep blocks found (or several families) and no "
                                        "--family/--original given")
    orig_path = args.original or find_original(family, entry)
    if not os.path.exists(orig_path):
        raise SetupError("setup", f"original fixture {orig_path} missing")
    orig = _load_full(orig_path)
    o_entry, o_model = _model_of(orig)
    family = family or family_of_model(o_model)
    x, ref = reference(family)

    result = OrderedDict([("ok", False), ("mode", "full_module"), ("file", args.file),
                          ("original", os.path.relpath(orig_path, os.getcwd())),
                          ("family", family), ("model_entry", entry),
                          ("entries", list(ckpt) if isinstance(ckpt, dict) else []),
                          ("pickle_globals", globs)])
    problems: List[str] = []
    if entry != o_entry:
        problems.append(f"model is under '{entry}', the original had it under '{o_entry}'")
    # 1. every rep block deployed; count matches the original's
    blocks = rep_blocks(model)
    o_blocks = rep_blocks(o_model)
    for n, m in blocks:
        problems += deploy_problems(n, m)
    if [n for n, _ in blocks] != [n for n, _ in o_blocks]:
        problems.append(f"rep blocks {[n for n, _ in blocks]} != original's "
                        f"{[n for n, _ in o_blocks]}")
    result["deploy_blocks"] = len(blocks) if not problems else sum(
        1 for n, m in blocks if not deploy_problems(n, m))
    # 2. the other checkpoint entries
    if isinstance(orig, dict):
        for k, v in orig.items():
            if k not in ckpt:
                problems.append(f"entry '{k}' missing")
            elif isinstance(v, nn.Module) or isinstance(ckpt[k], nn.Module):
                if isinstance(v, nn.Module) != isinstance(ckpt[k], nn.Module):
                    problems.append(f"entry '{k}': {describe_value(ckpt[k])} vs original "
                                    f"{describe_value(v)}")
            elif not same_value(v, ckpt[k]):
                problems.append(f"entry '{k}' changed: {describe_value(ckpt[k])!r} vs original "
                                f"{describe_value(v)!r}")
        extra = [k for k in ckpt if k not in orig]
        if extra:
            problems.append(f"new entries {extra}")
    # 3. plain attributes of every module (outside the rep blocks' own flags/branches)
    o_mods = dict(o_model.named_modules())
    block_names = [n for n, _ in o_blocks]
    checked = 0
    for n, m in model.named_modules():
        if any(n != b and n.startswith(b + ".") for b in block_names):
            continue  # inside a rep block: structure changes legitimately
        om = o_mods.get(n)
        if om is None:
            problems.append(f"module '{n}' ({type(m).__name__}) not in the original")
            continue
        if type(m) is not type(om):
            problems.append(f"module '{n}' is {type(m).__qualname__}, original "
                            f"{type(om).__qualname__}")
            continue
        skip = set()
        sp = spec_for(m)
        if sp is not None:
            skip = set(sp[4]) | ({sp[2]} if sp[2] else set()) | {"alpha"}
        a, b = _plain_attrs(m), _plain_attrs(om)
        for k in sorted(set(a) | set(b)):
            if k in skip or k == "forward":
                continue
            checked += 1
            if k not in a or k not in b or not same_value(a[k], b[k]):
                problems.append(f"module '{n}': attribute '{k}' "
                                f"{describe_value(a.get(k, '<missing>'))!r} vs original "
                                f"{describe_value(b.get(k, '<missing>'))!r}")
        if sp is None:
            for k in set(m._modules) ^ set(om._modules):
                problems.append(f"module '{n}': child '{k}' added/removed")
    result["attributes_checked"] = checked
    # 4. dtypes preserved; non-block tensors unchanged
    sd, o_sd = model.state_dict(), o_model.state_dict()
    result["dtypes"] = dtype_summary(sd.values())
    fdt = sorted({str(t.dtype) for t in sd.values() if t.is_floating_point()})
    o_fdt = sorted({str(t.dtype) for t in o_sd.values() if t.is_floating_point()})
    if fdt != o_fdt:
        problems.append(f"floating dtypes {fdt} differ from the original's {o_fdt}")
    for k, v in o_sd.items():
        if any(k.startswith(b + ".") for b in block_names):
            continue
        if k not in sd:
            problems.append(f"tensor '{k}' (outside the rep blocks) missing")
        elif not same_value(v, sd[k]):
            problems.append(f"tensor '{k}' (outside the rep blocks) changed")
    # 5. output
    fp16 = any(t.dtype == torch.float16 for t in o_sd.values())
    run = model.float().eval()
    try:
        with torch.no_grad():
            y = run(x)
    except Exception as e:  # noqa: BLE001
        raise CheckFailed("forward", f"running the model failed: {type(e).__name__}: {e}",
                          **result, problems=problems)
    d, bound = compare(y, ref, TOL_FP16 if fp16 else TOL_FP32)
    result["max_abs_diff"] = d
    result["tolerance"] = bound
    if d > bound:
        problems.append(f"max |fused - reference| = {d:.3g} > {bound:.3g}")
    if problems:
        raise CheckFailed("full_module", problems[0], **result, problems=problems)
    result["ok"] = True
    return result


def _flatten(obj, path: str, out_t: Dict, out_o: Dict) -> None:
    import torch
    if torch.is_tensor(obj):
        out_t[path] = {"dtype": str(obj.dtype).replace("torch.", ""), "shape": list(obj.shape)}
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{path}.{k}" if path else str(k), out_t, out_o)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _flatten(v, f"{path}.{i}" if path else str(i), out_t, out_o)
    else:
        out_o[path] = describe_value(obj)


def mode_load(args) -> Dict:
    if args.full:
        layout = torch_file_layout(args.file)
        if layout["format"] == "zip":
            layout["archive_root"] = zip_data_pkl(args.file)[0][:-len("data.pkl")].rstrip("/")
        ckpt = _load_full(args.file)  # refuses non-allow-listed globals first
        import torch.nn as nn
        obj = {k: (v.state_dict() if isinstance(v, nn.Module) else v) for k, v in
               ckpt.items()} if isinstance(ckpt, dict) else (
            ckpt.state_dict() if isinstance(ckpt, nn.Module) else ckpt)
    else:
        obj, layout = load_weights_file(args.file)
    tensors: Dict[str, Any] = OrderedDict()
    other: Dict[str, Any] = OrderedDict()
    _flatten(obj, "", tensors, other)
    res = OrderedDict([("ok", True), ("mode", "load"), ("file", args.file)])
    res.update(layout)
    res["top"] = type(obj).__name__
    res["keys"] = [str(k) for k in obj] if isinstance(obj, dict) else []
    if layout["format"] != "safetensors":
        res["pickle_globals"] = pickle_globals(args.file)
    res["dtypes"] = {}
    for v in tensors.values():
        res["dtypes"][v["dtype"]] = res["dtypes"].get(v["dtype"], 0) + 1
    res["tensors"] = tensors
    res["other"] = other
    return res


# ----------------------------------------------------------------------------------

def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="check_fused.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__)
    sub = ap.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("state_dict", help="fused state_dict (.pt/.pth/.safetensors) of a "
                                          "fixture family")
    p.add_argument("family", help=f"one of {', '.join(FAMILIES)}")
    p.add_argument("file")
    p.add_argument("--fp16", action="store_true",
                   help="the file holds float16 tensors (tolerance 5e-2)")
    p = sub.add_parser("full_module", help="fused full-module checkpoint (YOLO style)")
    p.add_argument("file")
    p.add_argument("--original", help="the unfused fixture it came from (default: looked up "
                                      "in test/fixtures/torch/manifest.json)")
    p.add_argument("--family", choices=FAMILIES)
    p = sub.add_parser("load", help="torch.load(weights_only=True) and list the tensors")
    p.add_argument("file")
    p.add_argument("--full", action="store_true",
                   help="full unpickling (after the GLOBAL allow-list scan) for full-module "
                        "checkpoints; nn.Module entries are listed as their state_dict")

    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        if e.code == 0:
            return 0
        print(json.dumps({"ok": False, "stage": "usage",
                          "error": "bad arguments (see --help on stderr)"}))
        return 2
    out = {"ok": False, "mode": args.mode}
    try:
        if not os.path.isfile(args.file):
            raise SetupError("usage", f"no such file: {args.file}")
        try:
            import torch  # noqa: F401
        except ImportError as e:
            raise SetupError("setup", f"PyTorch not importable ({e}); use /usr/bin/python3")
        fn = {"state_dict": mode_state_dict, "full_module": mode_full_module,
              "load": mode_load}[args.mode]
        res = fn(args)
        print(json.dumps(res, default=str))
        return 0
    except CheckFailed as e:
        out.update(e.extra)
        out.update({"ok": False, "stage": e.stage, "error": str(e)})
        print(json.dumps(out, default=str))
        return 1
    except SetupError as e:
        out.update({"ok": False, "stage": e.stage, "error": str(e)})
        print(json.dumps(out, default=str))
        return 2
    except Exception as e:  # noqa: BLE001
        out.update({"ok": False, "stage": "internal", "error": f"{type(e).__name__}: {e}",
                    "traceback": traceback.format_exc().splitlines()[-6:]})
        print(json.dumps(out, default=str))
        return 2


if __name__ == "__main__":
    sys.exit(main())
