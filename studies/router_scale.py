#!/usr/bin/env python3
"""Copy a merged FlexOlmo checkpoint with every router row and expert bias multiplied by S: the
router logits times S, i.e. a softmax temperature of 1/S, set with no data. Each expert's row
and bias are scaled alike, so opting an expert out still equals a merge without it.

usage: python3 studies/router_scale.py SRC_DIR DST_DIR S[,S1,...]   (one S, or one per layer)

Standard library only; the checkpoint must hold f32 tensors (as `flexrun merge` writes).
Then `flexrun eval --model DST_DIR ...` with and without `--exclude NAME`.
"""
import array
import json
import os
import shutil
import struct
import sys


def main():
    if len(sys.argv) != 4:
        sys.exit(next(l for l in __doc__.splitlines() if l.startswith("usage:")))
    src, dst = sys.argv[1], sys.argv[2]
    try:
        scales = [float(x) for x in sys.argv[3].split(",")]
    except ValueError:
        sys.exit(f"error: '{sys.argv[3]}' is not S or S0,S1,... (numbers)")
    path = os.path.join(src, "model.safetensors")
    if not os.path.isfile(path):
        sys.exit(f"error: {path} does not exist (a merged checkpoint directory is needed)")
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if name != "model.safetensors" and os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), dst)
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header_bytes = f.read(n)
        data = bytearray(f.read())
    header = json.loads(header_bytes)
    touched = 0
    for key, meta in header.items():
        if key == "__metadata__" or ".mlp.gate." not in key:
            continue
        if meta["dtype"] != "F32":
            sys.exit(f"error: {key} is {meta['dtype']}, not F32")
        layer = int(key.split(".")[2])
        if len(scales) > 1 and layer >= len(scales):
            sys.exit(f"error: {len(scales)} scales but the checkpoint has layer {layer}")
        s = scales[layer] if len(scales) > 1 else scales[0]
        a, b = meta["data_offsets"]
        values = array.array("f")
        values.frombytes(bytes(data[a:b]))
        data[a:b] = array.array("f", (x * s for x in values)).tobytes()
        touched += 1
    if touched == 0:
        sys.exit(f"error: {src} has no router (mlp.gate.*) tensors: not a FlexOlmo model")
    with open(os.path.join(dst, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", n))
        f.write(header_bytes)
        f.write(data)
    print(f"{dst}: {touched} router tensors scaled by {sys.argv[3]}")


if __name__ == "__main__":
    main()
