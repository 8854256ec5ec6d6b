#!/usr/bin/python3
"""Check RepFuse's deploy outputs against the official conversion, with PyTorch itself.

Called by test/deploy-official.test.ts (Debian's PyTorch: run with /usr/bin/python3):

    deploy_check.py state_dict <fused.pt> <fixture_dir>
    deploy_check.py full_module <fused_full.pt> <fixture_dir>
    deploy_check.py run_only <fused_full.pt> <fixture_dir> [<outputs_prefix>]

<fixture_dir> is one of test/fixtures/official/<family>/ (see /work/coord/FIXTURES.md): deploy_sd.pt,
deploy_out_<i>.npy, input.npy, meta.json and, for YOLO families, deploy_full.pt (the officially
converted full module) and the stand-ins named by meta.json's "standins" (self-written classes at
the official import paths). Only the stand-ins and site packages are on sys.path.

state_dict   weights_only=True load; exactly the keys, shapes and dtypes of deploy_sd.pt, values
             within 1e-5 * max|w| per tensor (fp32); where deploy_full.pt exists, the official deploy
             model (its module, cast to float32) loads it with strict=True and reproduces
             deploy_out_<i>.npy within 1e-5 * max|y|.
full_module  the rewritten checkpoint unpickles with only the stand-ins, and every module is in the
             state the official conversion leaves it (deploy_full.pt): class, children, parameters
             (shape, dtype, requires_grad), buffers, plain attributes (flags, None slots) and
             instance-bound methods (forward -> forward_fuse); then
             torch.load(out)['model'].float().eval()(x) reproduces deploy_full_out_<i>.npy
             (fp16 checkpoints: within fp16 rounding, 2e-3 * max|y|; fp32: 1e-5 * max|y|).
run_only     only the last step of full_module: unpickle with the stand-ins, run, compare
             (for outputs that are not meant to look like deploy_full.pt, e.g. --no-fold-bn);
             <outputs_prefix> names other reference outputs of the fixture (<prefix>_<i>.npy, e.g.
             unknown_child_out for a checkpoint with a child RepFuse must leave alone).

Prints exactly one JSON line; exit 0 ok, 1 wrong, 2 could not run.
"""
import json
import os
import sys

sys.dont_write_bytecode = True


def emit(ok, **kw):
    print(json.dumps(dict(ok=ok, **kw), default=str))
    sys.exit(0 if ok else 1)


def setup(fixture):
    meta = json.load(open(os.path.join(fixture, "meta.json")))
    st = meta.get("standins")
    if st:
        sys.path.insert(0, os.path.normpath(os.path.join(fixture, "..", st)))
    return meta


def outputs_of(y):
    """Model outputs flattened in order (tuples/lists of tensors, nested)."""
    import torch

    if isinstance(y, torch.Tensor):
        return [y]
    if isinstance(y, (list, tuple)):
        out = []
        for v in y:
            out.extend(outputs_of(v))
        return out
    if isinstance(y, dict):
        out = []
        for v in y.values():
            out.extend(outputs_of(v))
        return out
    return []


def compare_outputs(model, fixture, prefix, rel):
    import numpy as np
    import torch

    x = torch.from_numpy(np.load(os.path.join(fixture, "input.npy")))
    with torch.no_grad():
        ys = [t.float().numpy() for t in outputs_of(model(x))]
    i, worst = 0, []
    while os.path.exists(os.path.join(fixture, f"{prefix}_{i}.npy")):
        ref = np.load(os.path.join(fixture, f"{prefix}_{i}.npy"))
        if i >= len(ys):
            return {"error": f"the model returned {len(ys)} outputs; {prefix}_{i}.npy has no counterpart"}
        if ys[i].shape != ref.shape:
            return {"error": f"output {i} has shape {ys[i].shape}, {prefix}_{i}.npy {ref.shape}"}
        d = float(np.abs(ys[i] - ref).max()) if ref.size else 0.0
        m = float(np.abs(ref).max()) if ref.size else 0.0
        worst.append({"output": i, "max_abs_diff": d, "max_abs": m, "tolerance": rel * max(m, 1e-12)})
        i += 1
    if i == 0:
        return {"error": f"no {prefix}_0.npy in {fixture}"}
    bad = [w for w in worst if not w["max_abs_diff"] <= w["tolerance"]]
    return {"outputs": worst, "bad": bad}


def state_dict(path, fixture):
    import torch

    meta = setup(fixture)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    ref = torch.load(os.path.join(fixture, "deploy_sd.pt"), map_location="cpu", weights_only=True)
    missing = [k for k in ref if k not in sd]
    unexpected = [k for k in sd if k not in ref]
    wrong = []
    worst = 0.0
    for k, r in ref.items():
        if k not in sd:
            continue
        t = sd[k]
        if tuple(t.shape) != tuple(r.shape) or t.dtype != r.dtype:
            wrong.append(f"{k}: {tuple(t.shape)} {t.dtype}, official {tuple(r.shape)} {r.dtype}")
            continue
        if not r.is_floating_point():
            if not torch.equal(t, r):
                wrong.append(f"{k}: values differ")
            continue
        m = float(r.double().abs().max()) if r.numel() else 0.0
        d = float((t.double() - r.double()).abs().max()) if r.numel() else 0.0
        rel = d / m if m else d
        worst = max(worst, rel)
        if rel > 1e-5:
            wrong.append(f"{k}: max |d| {d:.3g} > 1e-5 * max|w| ({m:.3g})")
    res = {"tensors": len(sd), "missing": missing, "unexpected": unexpected, "wrong": wrong[:20], "worst_rel": worst}
    if missing or unexpected or wrong:
        emit(False, stage="keys", **res)
    full = os.path.join(fixture, "deploy_full.pt")
    if os.path.exists(full):
        ck = torch.load(full, map_location="cpu")
        model = (ck["model"] if isinstance(ck, dict) else ck).float().eval()
        try:
            model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, strict=True)
        except Exception as e:  # noqa: BLE001
            emit(False, stage="strict", error=str(e).splitlines()[0], **res)
        res["strict"] = True
        out = compare_outputs(model, fixture, "deploy_out", 1e-5)
        if "error" in out:
            emit(False, stage="run", error=out["error"], **res)
        res["outputs"] = out["outputs"]
        if out["bad"]:
            emit(False, stage="run", error=f"outputs differ: {out['bad']}", **res)
    res["family"] = meta.get("family")
    emit(True, **res)


def describe(m):
    """What the official conversion leaves on one module, in comparable form."""
    import hashlib

    import torch

    d = {}
    for k, v in m.__dict__.items():
        if k.startswith("_") or k == "training":
            continue
        if hasattr(v, "__func__") and getattr(v, "__self__", None) is m:
            d[k] = f"<bound {v.__func__.__name__}>"
        elif isinstance(v, torch.Tensor):
            # plain tensor attributes (MobileOne's id_tensor, ...): shape, dtype and exact values
            digest = hashlib.sha1(v.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:12]
            d[k] = f"<tensor {tuple(v.shape)} {v.dtype} {'grad ' if v.requires_grad else ''}{digest}>"
        elif v is None or isinstance(v, (bool, int, float, str)):
            d[k] = v
        elif isinstance(v, (tuple, list)) and all(isinstance(x, (bool, int, float, str)) for x in v):
            d[k] = list(v)
        else:
            d[k] = f"<{type(v).__name__}>"
    return {
        "class": f"{type(m).__module__}.{type(m).__qualname__}",
        "modules": list(m._modules.keys()),
        "params": {k: None if p is None else [list(p.shape), str(p.dtype), bool(p.requires_grad)] for k, p in m._parameters.items()},
        "buffers": {k: None if b is None else [list(b.shape), str(b.dtype)] for k, b in m._buffers.items()},
        "attrs": d,
    }


def run_only(path, fixture, prefix=None):
    import torch

    meta = setup(fixture)
    ck = torch.load(path, map_location="cpu")
    m = ck["model"] if isinstance(ck, dict) else ck
    fp16 = any(p.dtype == torch.float16 for p in m.parameters())
    if prefix is None:
        prefix = "deploy_full_out" if os.path.exists(os.path.join(fixture, "deploy_full_out_0.npy")) else "deploy_out"
    out = compare_outputs(m.float().eval(), fixture, prefix, 2e-3 if fp16 else 1e-5)
    res = {"family": meta.get("family"), "fp16": fp16}
    if "error" in out:
        emit(False, stage="run", error=out["error"], **res)
    if out["bad"]:
        emit(False, stage="run", error=f"outputs differ: {out['bad']}", outputs=out["outputs"], **res)
    emit(True, outputs=out["outputs"], **res)


def full_module(path, fixture):
    import torch

    meta = setup(fixture)
    ck = torch.load(path, map_location="cpu")
    ref = torch.load(os.path.join(fixture, "deploy_full.pt"), map_location="cpu")
    ours_m = ck["model"] if isinstance(ck, dict) else ck
    ref_m = ref["model"] if isinstance(ref, dict) else ref
    ours = dict(ours_m.named_modules(remove_duplicate=False))
    theirs = dict(ref_m.named_modules(remove_duplicate=False))
    diffs = []
    for name in theirs:
        if name not in ours:
            diffs.append(f"{name or '<root>'}: missing (official: {type(theirs[name]).__name__})")
    for name in ours:
        if name not in theirs:
            diffs.append(f"{name or '<root>'}: not in the official deploy model ({type(ours[name]).__name__})")
            continue
        a, b = describe(ours[name]), describe(theirs[name])
        for field in ("class", "modules", "params", "buffers", "attrs"):
            if a[field] != b[field]:
                if isinstance(a[field], dict):
                    keys = sorted(set(a[field]) | set(b[field]))
                    delta = {k: [a[field].get(k, "<absent>"), b[field].get(k, "<absent>")] for k in keys if a[field].get(k, "<absent>") != b[field].get(k, "<absent>")}
                    diffs.append(f"{name or '<root>'}.{field}: ours/official {delta}")
                else:
                    diffs.append(f"{name or '<root>'}.{field}: ours {a[field]}, official {b[field]}")
    entries = list(ck.keys()) if isinstance(ck, dict) else None
    ref_entries = list(ref.keys()) if isinstance(ref, dict) else None
    res = {"modules": len(ours), "diffs": diffs[:40], "ndiffs": len(diffs), "entries": entries, "family": meta.get("family")}
    if diffs:
        emit(False, stage="structure", error=f"{len(diffs)} differences from the official deploy model", **res)
    if entries != ref_entries:
        emit(False, stage="entries", error=f"checkpoint entries {entries}, official {ref_entries}", **res)
    fp16 = any(p.dtype == torch.float16 for p in ours_m.parameters())
    res["fp16"] = fp16
    model = ours_m.float().eval()
    prefix = "deploy_full_out" if os.path.exists(os.path.join(fixture, "deploy_full_out_0.npy")) else "deploy_out"
    out = compare_outputs(model, fixture, prefix, 2e-3 if fp16 else 1e-5)
    if "error" in out:
        emit(False, stage="run", error=out["error"], **res)
    res["outputs"] = out["outputs"]
    if out["bad"]:
        emit(False, stage="run", error=f"outputs differ: {out['bad']}", **res)
    emit(True, **res)


def main():
    modes = {"state_dict": state_dict, "full_module": full_module, "run_only": run_only}
    if not (len(sys.argv) == 4 or (len(sys.argv) == 5 and sys.argv[1] == "run_only")) or sys.argv[1] not in modes:
        print(json.dumps({"ok": False, "stage": "usage", "error": __doc__.strip().splitlines()[0]}))
        sys.exit(2)
    mode, path, fixture = sys.argv[1:4]
    try:
        import torch  # noqa: F401
    except Exception as e:  # noqa: BLE001
        print(json.dumps({"ok": False, "stage": "setup", "error": f"import torch: {e}"}))
        sys.exit(2)
    try:
        modes[mode](path, fixture, *sys.argv[4:])
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001
        import traceback

        print(json.dumps({"ok": False, "stage": "load", "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}))
        sys.exit(1)


if __name__ == "__main__":
    main()
