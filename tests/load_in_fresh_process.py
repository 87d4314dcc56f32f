"""Run as a script in a fresh interpreter: load a pipeline the way a user without this package would.

    python load_in_fresh_process.py <folder or repo id> <reference.safetensors> <result.json> [--trust-remote-code]

The package is installed in the test environment, so it is blocked on the import path here: the
load must work with diffusers alone. The child runs the unet on the reference inputs and samples a
few DDPM steps; the parent compares.
"""

import importlib.abc
import json
import sys


class _BlockPackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "diffusers_gfprune":
            raise ImportError(f"{name} is blocked in this process")


sys.meta_path.insert(0, _BlockPackage())


def main(argv):
    import torch
    from diffusers import DDPMPipeline
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    source, ref_path, out_path = argv[:3]
    kwargs = {"trust_remote_code": True} if "--trust-remote-code" in argv else {}
    pipe = DDPMPipeline.from_pretrained(source, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    ref = load_file(ref_path)
    with torch.no_grad():
        out = pipe.unet(ref["sample"], ref["timestep"]).sample
    images = pipe(batch_size=1, generator=torch.Generator().manual_seed(0), num_inference_steps=2, output_type="np").images
    result = {
        "class": type(pipe.unet).__name__,
        "module": type(pipe.unet).__module__,
        "num_parameters": sum(p.numel() for p in pipe.unet.parameters()),
        "max_abs_diff": float((out - ref["out"]).abs().max()),
        "ref_max": float(ref["out"].abs().max()),
        "image_shape": list(images.shape),
        "image_finite": bool((images == images).all()),
        "package_imported": any(m.split(".")[0] == "diffusers_gfprune" for m in sys.modules),
    }
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1:])
