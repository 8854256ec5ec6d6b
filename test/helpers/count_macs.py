"""Independent MAC count for the MAC tests (run with /usr/bin/python3; needs the onnx package).

Shapes come from onnx's own shape inference (onnx.shape_inference.infer_shapes, strict off), with
the graph inputs' dynamic dimensions set to batch 1 or to the shapes given. Counted, as RepFuse's
report defines them: Conv = numel(output) * numel(weight[0]) (= N*Cout*H'*W'*(Cin/g)*kh*kw),
Gemm = M*N*K, MatMul = numel(output) * K. A node whose shapes onnx cannot infer is listed.

  count_macs.py '{"files": [{"path": "m.onnx", "inputs": {"x": [1, 3, 64, 64]}}]}'
prints one JSON object per line: {"path", "total", "nodes": {name: macs}, "unknown": [names]}.
"""
import json
import sys

import onnx
from onnx import shape_inference


def prod(xs):
    p = 1
    for x in xs:
        p *= x
    return p


def count(path, inputs):
    model = onnx.load(path, load_external_data=False)
    g = model.graph
    inits = {t.name: list(t.dims) for t in g.initializer}
    for i in g.input:
        if i.name in inits:
            continue
        dims = i.type.tensor_type.shape.dim
        given = inputs.get(i.name)
        for k, d in enumerate(dims):
            if given is not None:
                d.ClearField('dim_param')
                d.dim_value = given[k]
            elif not d.HasField('dim_value') or d.dim_value <= 0:
                d.ClearField('dim_param')
                d.dim_value = 1
    # Drop stale value_info and output shapes so every shape is inferred from the inputs.
    del g.value_info[:]
    for o in g.output:
        o.type.tensor_type.ClearField('shape')
    # data_prop: shape arithmetic (Shape -> Gather -> Concat -> Reshape) is followed too.
    inferred = shape_inference.infer_shapes(model, data_prop=True)
    shapes = dict(inits)
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if t.HasField('shape') and all(d.HasField('dim_value') for d in t.shape.dim):
            shapes.setdefault(vi.name, [d.dim_value for d in t.shape.dim])
    total = 0
    nodes = {}
    unknown = []
    for n in g.node:
        if n.domain not in ('', 'ai.onnx') or n.op_type not in ('Conv', 'Gemm', 'MatMul'):
            continue
        name = n.name or n.output[0]
        a = shapes.get(n.input[0])
        b = shapes.get(n.input[1])
        y = shapes.get(n.output[0])
        if a is None or b is None or y is None:
            unknown.append(name)
            continue
        if n.op_type == 'Conv':
            macs = prod(y) * prod(b[1:])
        elif n.op_type == 'Gemm':
            trans_a = next((at.i for at in n.attribute if at.name == 'transA'), 0)
            k = a[0] if trans_a else a[1]
            macs = y[0] * y[1] * k
        else:
            k = a[-1]
            macs = prod(y) * k
        nodes[name] = macs
        total += macs
    return {'path': path, 'total': total, 'nodes': nodes, 'unknown': unknown}


def main():
    req = json.loads(sys.argv[1])
    for f in req['files']:
        print(json.dumps(count(f['path'], f.get('inputs', {}))))


if __name__ == '__main__':
    main()
