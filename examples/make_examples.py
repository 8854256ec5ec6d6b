#!/usr/bin/python3
"""Build the small, real, *unfused* example models shipped in examples/.

    /usr/bin/python3 examples/make_examples.py

Needs PyTorch (tested with 1.13) and the onnx package. Deterministic (seeded).
Uses the block classes in test/fixtures/python/models/common.py. Every model is
exported in eval mode with torch.onnx.export defaults (constant folding on, so each
Conv+BN pair becomes one Conv with bias), opset 13, input "images" 1x3x64x64 with a
dynamic batch dimension "batch", output "output". Writes only into examples/.
"""

from __future__ import annotations

import copy
import io
import os
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "test", "fixtures", "python"))

import onnx  # noqa: E402
import torch  # noqa: E402

from models import common as C  # noqa: E402

OPSET = 13
INPUT_SHAPE = (1, 3, 64, 64)
MAX_BYTES = 1024 * 1024


def repvgg_tiny() -> torch.nn.Module:
    # stage0: 3->16 s2 | stage1: 16->32 s2, 32 (groups 2) | stage2: 32->64 s2, 64 (groups 4), 64
    return C.RepVGGNet(widths=(16, 32, 64), blocks=(1, 2, 3), strides=(2, 2, 2), stem=None,
                       override_groups={2: 2, 4: 4}, num_classes=10)


def yolov7_repconv_tiny() -> torch.nn.Module:
    return C.YOLOv7Net([
        C.Conv(3, 16, 3, 2),          # model.0
        C.Conv(16, 32, 3, 2),         # model.1
        C.RepConv(32, 32, 3, 1),      # model.2 identity branch
        C.RepConv(32, 64, 3, 2),      # model.3 stride 2
        C.RepConv(64, 64, 3, 1),      # model.4 identity branch
        C.RepConv(64, 64, 3, 1),      # model.5 identity branch
        C.Detect(nc=1, ch=(64,)),     # model.6 1x1 conv with bias
    ])


def mobileone_tiny() -> torch.nn.Module:
    return C.MobileOneNet(stem=16, widths=(32, 32, 64), strides=(2, 1, 2), k=2)


EXAMPLES = [
    ("repvgg_tiny.onnx", repvgg_tiny,
     "RepVGG-style classifier: 6 RepVGGBlocks (stage0, stage1.0-1, stage2.0-2), "
     "3 with stride 2, 2 grouped (groups 2 and 4), ReLU, BN eps 1e-5, GAP + Linear head"),
    ("yolov7_repconv_tiny.onnx", yolov7_repconv_tiny,
     "YOLOv7-style backbone: 2 Conv, 4 RepConv (model.2-5; model.3 stride 2), SiLU, "
     "BN eps 1e-3, 1x1 Detect conv"),
    ("mobileone_tiny.onnx", mobileone_tiny,
     "MobileOne-style: plain stem + 6 MobileOneBlocks (depthwise 3x3 / pointwise 1x1 "
     "pairs, 2 conv branches each), ReLU"),
]


def main() -> None:
    for i, (fname, ctor, desc) in enumerate(EXAMPLES):
        torch.manual_seed(100 + i)
        net = ctor()
        C.randomize_batchnorms_(net, 200 + i)
        net.eval()
        x = torch.randn(INPUT_SHAPE, generator=torch.Generator().manual_seed(300 + i))
        with torch.no_grad():
            y = net(x)
            # self-check: the reference fusion reproduces the unfused net
            y_fused = C.switch_all_to_deploy(copy.deepcopy(net))(x)
        err = float((y - y_fused).abs().max())
        assert err < 1e-4 * max(1.0, float(y.abs().max())), (fname, err)

        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, x, buf, opset_version=OPSET,
                              input_names=["images"], output_names=["output"],
                              dynamic_axes={"images": {0: "batch"}, "output": {0: "batch"}})
        model = onnx.load_from_string(buf.getvalue())
        onnx.checker.check_model(model)
        path = os.path.join(HERE, fname)
        onnx.save(model, path)
        size = os.path.getsize(path)
        assert size < MAX_BYTES, (fname, size)
        n_blocks = len(C.rep_blocks(net))
        print(f"wrote {os.path.relpath(path, os.getcwd())} ({size} bytes, {len(model.graph.node)} "
              f"nodes, {n_blocks} rep blocks): {desc}")


if __name__ == "__main__":
    main()
