"""Write the key -> [shape, dtype] manifest of Meta's SAM3 state dicts (Testing/data/sam3_manifest_*.json).

Needs Meta's ``sam3`` package importable (``pip download --no-deps sam3==0.1.4``, installed with
its small pure-Python dependencies: iopath, portalocker, timm, ftfy, einops, pycocotools) and CLIP's
``bpe_simple_vocab_16e6.txt.gz`` in ``<site>/assets/`` (it is in the open_clip_torch wheel). No
weights are allocated: parameters and buffers go to the meta device. As published, sam3 0.1.4
creates two tensors with ``device="cuda"`` while building (``position_encoding.py``,
``decoder.py``); on a machine without CUDA patch those two to ``"cpu"`` in your local copy.

    python Testing/tools/dump_sam3_manifest.py video Testing/data/sam3_manifest_video.json
    python Testing/tools/dump_sam3_manifest.py image Testing/data/sam3_manifest_image.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn


def _parameters_on_meta() -> None:
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter(self, name, param):
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        return register_parameter(self, name, param)

    def buffer(self, name, tensor, persistent=True):
        return register_buffer(self, name, None if tensor is None else tensor.to("meta"), persistent)

    nn.Module.register_parameter = parameter
    nn.Module.register_buffer = buffer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("which", choices=["image", "video"])
    parser.add_argument("output")
    parser.add_argument("--note", default="", help="extra text for the manifest's generated_by")
    args = parser.parse_args()
    _parameters_on_meta()
    import sam3
    from sam3.model_builder import build_sam3_image_model, build_sam3_video_model

    if args.which == "video":
        model = build_sam3_video_model(load_from_HF=False, device="meta")
    else:
        model = build_sam3_image_model(load_from_HF=False, device="meta")
    keys = {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()}
    version = getattr(sam3, "__version__", "unknown")
    data = {"generated_by": f"Testing/tools/dump_sam3_manifest.py {args.which} with sam3 {version}, torch "
                            f"{torch.__version__}. {args.note}".strip(), "keys": keys}
    Path(args.output).write_text(json.dumps(data, indent=0) + "\n", encoding="utf-8")
    print(f"{len(keys)} keys -> {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
