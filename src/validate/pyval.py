"""RepFuse's end-to-end check in the user's own PyTorch (shipped as dist/pyval.py).

RepFuse itself never runs a checkpoint: it reads pickles with an allow-list. This script is the
opt-in exception (``repfuse fuse --python PATH``, or the extension after the user consented): the
host (src/validate/python.ts) starts it with the user's interpreter, writes one JSON request on
stdin and reads one JSON line back. It loads the original and the fused full-module checkpoint
with ``torch.load(..., weights_only=False)`` -- which runs the checkpoint's pickled code and
imports the user's model classes -- puts each rewritten module in eval mode as float32, runs both
on the same seeded input and compares every output tensor.

Request: {"original", "fused", "entries": ["model", ...] ('' = the root object is the module),
          "pythonPath": [dir, ...], "inputShape": [n, c, h, w] | null, "defaultSize": 64,
          "seed", "atol", "rtol"}
Reply (the last line on the real stdout; anything the model code prints goes to stderr):
  {"ok": true, "torch": "1.13.0", "python": "3.11.2", "input": {...}, "models": [...],
   "outputs": [TensorDiff, ...]}
  {"ok": false, "stage": "torch" | "import" | "load" | "no-module" | "input" | "run" | "compare"
   | "request" | "internal", "file": path or null, "message": one line}

The statistics are those of compare() in src/validate/worker.ts, computed in float64: per output,
max |d|, max |d| / max(|y|, atol, 1e-12), mean |d| (over all elements), the index of the first
largest |d|, max |y| and atol + rtol * max |y|; elements that are NaN/Inf in one output and not
identically so in the other are counted, never compared.
"""

import json
import os
import sys
import time


class Failure(Exception):
    def __init__(self, stage, message, file=None):
        Exception.__init__(self, message)
        self.stage = stage
        self.message = message
        self.file = file


def describe(err):
    """`Type: message` on one line (the host clips it)."""
    text = str(err).strip().replace("\r", " ").replace("\n", " ")
    return "%s: %s" % (type(err).__name__, text) if text else type(err).__name__


def progress(message):
    sys.stderr.write("@@repfuse-progress %s\n" % message)
    sys.stderr.flush()


def is_import_problem(err):
    """Errors that mean the checkpoint's model code could not be imported (a python-path problem)."""
    if isinstance(err, ImportError):  # ModuleNotFoundError too
        return True
    return isinstance(err, AttributeError) and "Can't get attribute" in str(err)


def load_checkpoint(torch, file):
    import inspect

    kwargs = {"map_location": "cpu"}
    try:
        if "weights_only" in inspect.signature(torch.load).parameters:
            # torch >= 2.6 defaults to True, which refuses module objects.
            kwargs["weights_only"] = False
    except (TypeError, ValueError):
        pass
    try:
        return torch.load(file, **kwargs)
    except Exception as err:  # the user's model code can raise anything while unpickling
        if is_import_problem(err):
            raise Failure("import", "cannot import the model code it pickles: %s" % describe(err), file)
        raise Failure("load", "torch.load failed: %s" % describe(err), file)


def pick_module(torch, ckpt, entry, file):
    nn = torch.nn
    if entry == "":
        obj = ckpt
        where = "the checkpoint itself"
    elif isinstance(ckpt, dict):
        obj = ckpt.get(entry)
        where = "ckpt[%r]" % entry
    else:
        raise Failure("no-module", "holds a %s, not a dict with %r" % (type(ckpt).__name__, entry), file)
    if not isinstance(obj, nn.Module):
        raise Failure("no-module", "%s is a %s, not a torch.nn.Module" % (where, type(obj).__name__), file)
    return obj


def input_shape(torch, model, req):
    if req.get("inputShape"):
        return [int(d) for d in req["inputShape"]]
    nn = torch.nn
    size = int(req.get("defaultSize") or 64)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return [1, m.in_channels, size, size]
        if isinstance(m, nn.Conv1d):
            return [1, m.in_channels, size]
    raise Failure("input", "cannot infer the input shape of %s (no Conv2d/Conv1d found); give it with --input" % type(model).__name__)


def flatten(torch, value, name, out):
    """Tensors of a (nested) tuple/list/dict output, in order, with names like out[1][0]."""
    if isinstance(value, torch.Tensor):
        out.append((name, value))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            flatten(torch, v, "%s[%d]" % (name, i), out)
    elif isinstance(value, dict):
        for k, v in value.items():
            flatten(torch, v, "%s[%r]" % (name, k), out)
    # None, numbers and other objects carry no tensor data to compare.
    return out


def compare(torch, name, ref, got, atol, rtol):
    if list(ref.shape) != list(got.shape):
        raise Failure("compare", "output %s has shape %s in the original but %s in the fused model"
                      % (name, "x".join(map(str, ref.shape)), "x".join(map(str, got.shape))))
    r = ref.detach().to("cpu", torch.float64).reshape(-1)
    f = got.detach().to("cpu", torch.float64).reshape(-1)
    n = r.numel()
    finite = torch.isfinite(r) & torch.isfinite(f)
    same_nonfinite = (r == f) | (torch.isnan(r) & torch.isnan(f))
    non_finite = int((~finite & ~same_nonfinite).sum().item())
    zero = torch.zeros((), dtype=torch.float64)
    d = torch.where(finite, (r - f).abs(), zero)
    ar = torch.where(finite, r.abs(), zero)
    max_abs = float(d.max().item()) if n else 0.0
    worst = int(torch.argmax(d).item()) if n and max_abs > 0 else 0
    max_ref = float(ar.max().item()) if n else 0.0
    floor = max(atol, 1e-12)
    rel = d / torch.clamp(ar, min=floor)
    max_rel = float(rel.max().item()) if n else 0.0
    mean_abs = float(d.sum().item()) / n if n else 0.0
    idx = []
    rest = worst
    for dim in reversed(list(ref.shape)):
        idx.append(rest % dim if dim else 0)
        rest = rest // dim if dim else 0
    idx.reverse()
    tolerance = atol + rtol * max_ref
    return {
        "name": name,
        "shape": list(ref.shape),
        "maxAbsDiff": max_abs,
        "maxRelDiff": max_rel,
        "meanAbsDiff": mean_abs,
        "worstIndex": idx,
        "maxAbsRef": max_ref,
        "tolerance": tolerance,
        "passed": max_abs <= tolerance and non_finite == 0,
        "nonFinite": non_finite,
    }


def run(req):
    for key in ("original", "fused", "entries"):
        if key not in req:
            raise Failure("request", "the request has no %r" % key)
    progress("importing torch")
    try:
        import torch
    except Exception as err:
        raise Failure("torch", "cannot import torch: %s" % describe(err))
    # The user's folders go first, so their `models` / `utils` win over installed packages of the
    # same name; torch is imported already, so nothing here can shadow it.
    sys.path[:0] = [p for p in req.get("pythonPath", []) if p not in sys.path]
    seed = int(req.get("seed", 0))
    atol = float(req["atol"])
    rtol = float(req["rtol"])
    torch.manual_seed(seed)

    progress("loading the original checkpoint")
    original = load_checkpoint(torch, req["original"])
    progress("loading the fused checkpoint")
    fused = load_checkpoint(torch, req["fused"])

    outputs = []
    models = []
    inp = None
    for entry in req["entries"]:
        a = pick_module(torch, original, entry, req["original"])
        b = pick_module(torch, fused, entry, req["fused"])
        a = a.float().eval()
        b = b.float().eval()
        shape = input_shape(torch, a, req)
        gen = torch.Generator().manual_seed(seed)
        x = torch.rand(*shape, generator=gen, dtype=torch.float32) * 2 - 1
        label = entry if entry else "output"
        with torch.no_grad():
            progress("running the original %s" % type(a).__name__)
            try:
                ya = a(x.clone())
            except Exception as err:
                raise Failure("run", "the original %s (%s) fails on a %s input: %s"
                              % (label, type(a).__name__, "x".join(map(str, shape)), describe(err)), req["original"])
            progress("running the fused %s" % type(b).__name__)
            try:
                yb = b(x.clone())
            except Exception as err:
                raise Failure("run", "the fused %s (%s) fails on a %s input: %s"
                              % (label, type(b).__name__, "x".join(map(str, shape)), describe(err)), req["fused"])
        fa = flatten(torch, ya, label, [])
        fb = flatten(torch, yb, label, [])
        if not fa:
            raise Failure("run", "the original %s returns no tensor (%s)" % (label, type(ya).__name__), req["original"])
        if [n for n, _ in fa] != [n for n, _ in fb]:
            raise Failure("compare", "the fused %s returns %s, the original %s"
                          % (label, ", ".join(n for n, _ in fb) or "no tensor", ", ".join(n for n, _ in fa)), req["fused"])
        for (name, ta), (_, tb) in zip(fa, fb):
            outputs.append(compare(torch, name, ta, tb, atol, rtol))
        cls = type(a)
        models.append({"entry": entry, "className": "%s.%s" % (cls.__module__, cls.__qualname__)})
        if inp is None:
            inp = {"shape": shape, "dtype": "float32"}
    return {
        "ok": True,
        "torch": str(torch.__version__),
        "python": "%d.%d.%d" % sys.version_info[:3],
        "input": inp,
        "models": models,
        "outputs": outputs,
    }


def main():
    # The reply goes to the real stdout; whatever the model code prints goes to stderr.
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    t0 = time.time()
    try:
        try:
            req = json.loads(sys.stdin.read())
        except ValueError as err:
            raise Failure("request", "the request is not JSON: %s" % describe(err))
        result = run(req)
    except Failure as f:
        result = {"ok": False, "stage": f.stage, "file": f.file, "message": f.message}
    except BaseException as err:  # noqa: B902 -- SystemExit from user code included
        result = {"ok": False, "stage": "internal", "file": None, "message": describe(err)}
    result["durationMs"] = (time.time() - t0) * 1000.0
    reply.write(json.dumps(result) + "\n")
    reply.flush()


if __name__ == "__main__":
    main()
