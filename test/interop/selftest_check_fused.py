#!/usr/bin/python3
"""Prove that check_fused.py accepts what PyTorch itself fuses and rejects broken files.

    /usr/bin/python3 test/interop/selftest_check_fused.py [--keep]

Fuses every fixture with the modules' own switch_to_deploy() (no RepFuse involved),
writes the results to a temporary folder (removed afterwards unless --keep), runs
check_fused.py on each as a child process, exactly as the TypeScript tests do, and
asserts the exit codes: 0 for correct files, 1 for deliberately broken ones (bias
zeroed, key missing, extra key, wrong dtype, unfused blocks, changed checkpoint entry,
hostile pickles), 2 for usage errors.  Prints one line per case; exits 1 if any case
does not behave.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import OrderedDict

sys.dont_write_bytecode = True
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
FIX = os.path.join(REPO, "test", "fixtures", "torch")
sys.path.insert(0, HERE)
import check_fused as CF  # noqa: E402  (also puts the fixture packages on sys.path)

import torch  # noqa: E402

MARKER = "/tmp/repfuse_pwned_marker"
results = []


def run(expect: int, *argv: str, label: str = "", want: dict = None):
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    r = subprocess.run([sys.executable, os.path.join(HERE, "check_fused.py"), *argv],
                       capture_output=True, text=True, env=env, timeout=300)
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    ok_shape = len(lines) == 1
    try:
        res = json.loads(lines[-1]) if lines else {}
    except ValueError:
        res, ok_shape = {}, False
    good = ok_shape and r.returncode == expect and res.get("ok") == (expect == 0)
    for k, v in (want or {}).items():
        good = good and res.get(k) == v
    results.append(good)
    brief = {k: res.get(k) for k in ("max_abs_diff", "stage", "entry", "prefix",
                                     "deploy_blocks") if k in res}
    err = res.get("error", "")
    print(f"{'PASS' if good else 'FAIL'} rc={r.returncode} (want {expect}) {label}: "
          f"{json.dumps(brief)}{'  ' + err[:160] if err else ''}")
    if not good:
        print("   stdout:", r.stdout[:2000], "\n   stderr:", r.stderr[-2000:])
    return res


def deploy_from(family: str, sd_path: str):
    """The family net loaded from a fixture state_dict, then fused by PyTorch."""
    from models import common as C
    net = C.build_family(family, seed=C.FAMILIES.index(family))
    net.load_state_dict(torch.load(sd_path, map_location="cpu", weights_only=True))
    for _, m in CF.rep_blocks(net):
        m.switch_to_deploy()
    return net.eval()


def fuse_full(model, yolov7_none_style: bool):
    """Fuse a (possibly fp16) full module in float32 and restore its dtype."""
    half = next(model.parameters()).dtype == torch.float16
    model.float()
    for _, m in CF.rep_blocks(model):
        m.switch_to_deploy()
        if yolov7_none_style and hasattr(m, "rbr_reparam"):
            for b in ("rbr_dense", "rbr_1x1", "rbr_identity"):  # what YOLOv7 itself does
                setattr(m, b, None)
    return model.half() if half else model


def main() -> int:
    keep = "--keep" in sys.argv
    tmp = tempfile.mkdtemp(prefix="repfuse-selftest-")
    if os.path.exists(MARKER):
        print(f"{MARKER} exists already; remove it first")
        return 2
    try:
        for family in CF.FAMILIES:
            net = deploy_from(family, os.path.join(FIX, f"{family}_sd.pt"))
            sd = net.state_dict()
            p = os.path.join(tmp, f"{family}.fused.pt")
            torch.save(sd, p)
            run(0, "state_dict", family, p, label=f"{family} fused by torch, fp32")
            p16 = os.path.join(tmp, f"{family}.fused16.pt")
            torch.save(copy.deepcopy(net).half().state_dict(), p16)
            run(0, "state_dict", family, p16, "--fp16", label=f"{family} fused, fp16")
            run(1, "state_dict", family, p16, label=f"{family} fp16 file without --fp16",
                want={"stage": "dtype"})
            pl = os.path.join(tmp, f"{family}.fused_legacy.pt")
            torch.save(sd, pl, _use_new_zipfile_serialization=False)
            run(0, "state_dict", family, pl, label=f"{family} fused, legacy format")
            # broken: every deployed bias zeroed
            bad = OrderedDict(sd)
            for k in bad:
                if k.endswith("bias") and any(k.startswith(n + ".") for n, _ in
                                              CF.rep_blocks(net)):
                    bad[k] = torch.zeros_like(bad[k])
            pb = os.path.join(tmp, f"{family}.bias0.pt")
            torch.save(bad, pb)
            run(1, "state_dict", family, pb, label=f"{family} deployed biases zeroed",
                want={"stage": "compare"})
            # broken: the unfused state_dict (training keys)
            run(1, "state_dict", family, os.path.join(FIX, f"{family}_sd.pt"),
                label=f"{family} unfused state_dict", want={"stage": "keys"})
            # broken: one key missing
            miss = OrderedDict(list(sd.items())[:-1])
            pm = os.path.join(tmp, f"{family}.missing.pt")
            torch.save(miss, pm)
            run(1, "state_dict", family, pm, label=f"{family} last key missing",
                want={"stage": "keys"})

        for family in ("repvgg", "mobileone"):
            net = deploy_from(family, os.path.join(FIX, f"{family}_sd.pt"))
            sd = net.state_dict()
            ps = os.path.join(tmp, f"{family}.fused.safetensors")
            CF.write_safetensors(ps, sd)
            run(0, "state_dict", family, ps, label=f"{family} fused safetensors")
            pp = os.path.join(tmp, f"{family}.fused_prefix.pth")
            torch.save({"state_dict": OrderedDict(("module." + k, v) for k, v in sd.items())},
                       pp)
            run(0, "state_dict", family, pp, label=f"{family} fused, module. prefix",
                want={"entry": "state_dict", "prefix": "module."})
            # broken safetensors: header claims more bytes than there are
            raw = bytearray(open(ps, "rb").read())
            pt = os.path.join(tmp, f"{family}.truncated.safetensors")
            open(pt, "wb").write(bytes(raw[:-4]))
            run(1, "state_dict", family, pt, label=f"{family} truncated safetensors",
                want={"stage": "safetensors"})

        # full-module checkpoints
        for fname in ("yolov7_full.pt", "yolov7_full_ema.pt", "ultralytics_full.pt"):
            src = os.path.join(FIX, fname)
            for none_style in ((False, True) if fname.startswith("yolov7") else (False,)):
                ck = torch.load(src, map_location="cpu")
                key = "model" if ck.get("model") is not None else "ema"
                ck[key] = fuse_full(ck[key], none_style)
                p = os.path.join(tmp, f"{fname}.fused{'_none' if none_style else ''}.pt")
                torch.save(ck, p)
                run(0, "full_module", p, label=f"{fname} fused by torch"
                    f"{' (branches set to None, YOLOv7 style)' if none_style else ''}")
            run(1, "full_module", src, label=f"{fname} unfused", want={"stage": "full_module"})
            ck = torch.load(src, map_location="cpu")
            key = "model" if ck.get("model") is not None else "ema"
            ck[key] = fuse_full(ck[key], False)
            ck["epoch"] = 43
            p = os.path.join(tmp, f"{fname}.epoch_changed.pt")
            torch.save(ck, p)
            run(1, "full_module", p, label=f"{fname} fused, entry 'epoch' changed")
            ck = torch.load(src, map_location="cpu")
            ck[key] = fuse_full(ck[key], False).float() if ck[key] is not None else None
            if fname != "yolov7_full_ema.pt":
                p = os.path.join(tmp, f"{fname}.fp32.pt")
                torch.save(ck, p)
                run(1, "full_module", p, label=f"{fname} fused but stored as float32")
            ck = torch.load(src, map_location="cpu")
            m = fuse_full(ck[key], False)
            blk = CF.rep_blocks(m)[0][1]
            conv = getattr(blk, CF.spec_for(blk)[3])
            with torch.no_grad():
                conv.bias.zero_()
            p = os.path.join(tmp, f"{fname}.bias0.pt")
            torch.save(ck, p)
            run(1, "full_module", p, label=f"{fname} fused, first block's bias zeroed")

        # load mode
        for fname in sorted(os.listdir(FIX)):
            if fname.endswith((".pt", ".pth", ".safetensors")):
                if fname.startswith("hostile_"):
                    r = run(1, "load", os.path.join(FIX, fname), label=f"load {fname}")
                    r = run(1, "full_module", os.path.join(FIX, fname),
                            label=f"full_module {fname} (refused unloaded)",
                            want={"stage": "pickle_scan"})
                    assert not os.path.exists(MARKER), "PAYLOAD RAN"
                elif "_full" in fname:
                    run(1, "load", os.path.join(FIX, fname),
                        label=f"load {fname} (full pickle: weights_only refuses)")
                else:
                    run(0, "load", os.path.join(FIX, fname), label=f"load {fname}")
        # usage errors
        run(2, "state_dict", "nosuchfamily", os.path.join(FIX, "repvgg_sd.pt"),
            label="unknown family")
        run(2, "state_dict", "repvgg", os.path.join(tmp, "nope.pt"), label="missing file")
        run(2, "frobnicate", label="unknown mode")
    finally:
        if keep:
            print("kept", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    assert not os.path.exists(MARKER), "PAYLOAD RAN"
    print(f"\n{sum(results)}/{len(results)} cases behaved")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
