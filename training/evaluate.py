#!/usr/bin/env python
"""Evaluate a pruned DDPM pipeline against its teacher: SSIM, FID/KID, parameters, MACs and speed.

Writes ``eval_results.json`` and ``eval_results.md`` (the same tables as the prune script's card) into
``--output_dir``. On the built-in digits, offline:

    python training/evaluate.py --pretrained_model_name_or_path ddpm-digits-gfp50 \\
        --teacher_model_name_or_path teachers/ddpm-digits --dataset_name digits

On natural images, with torch-fidelity's Inception-v3 weights:

    python training/evaluate.py --pretrained_model_name_or_path user/ddpm-cifar10-gfp50 \\
        --teacher_model_name_or_path google/ddpm-cifar10-32 --dataset_name cifar10 --image_column img \\
        --num_eval_images 5000 --inception_weights weights-inception-2015-12-05-6726825d.pth --output_dir eval-cifar10
"""

import argparse
import json
import logging
import os
import sys
import time

import torch

from diffusers_gfprune import counting, data, evaluation, training
from diffusers_gfprune.sampling import comparison_grid
from diffusers_gfprune.pipeline_kinds import kind_for_pipeline
from diffusers_gfprune.teacher import SUPPORTED_CLASSES, load_kind, load_teacher, resolve_teacher


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", type=str, required=True,
                        help="The pruned pipeline to evaluate: a Hub id or a local folder (a DDPMPipeline or a bare UNet2DModel).")
    parser.add_argument("--revision", type=str, default=None, help="Revision of the pruned pipeline on the Hub.")
    parser.add_argument("--teacher_model_name_or_path", type=str, default=None,
                        help="The dense teacher it was pruned from (Hub id or folder). Default: the teacher recorded in "
                             "the pruned folder's pruning_summary.json, when there is one.")
    parser.add_argument("--teacher_revision", type=str, default=None, help="Revision of the teacher on the Hub.")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="Allow loading a UNet whose class is defined by code shipped in the repo (runs that code). "
                             "Not needed for pipelines saved by this package (stock or per-layer).")
    parser.add_argument("--hub_token", type=str, default=None, help="Hub token for private repos (else HF_TOKEN or the login cache).")
    training.add_data_arguments(parser)
    parser.add_argument("--output_dir", type=str, default=None,
                        help="Where eval_results.json/.md go (default: the pruned folder, when it is local).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the initial noise of the samples.")
    e = parser.add_argument_group("evaluation")
    e.add_argument("--num_eval_images", type=int, default=300,
                   help="Image pairs (teacher, pruned) sampled from the same noise for SSIM and FID/KID.")
    e.add_argument("--num_inference_steps", type=int, default=100, help="DDIM steps (eta 0).")
    e.add_argument("--eval_batch_size", type=int, default=64, help="Images per sampling batch.")
    e.add_argument("--eval_fid", type=str, default="auto", choices=evaluation.FID_CHOICES,
                   help="FID/KID features: 'auto' = the shipped classifier of a built-in data set (digits, photos), Inception-v3 otherwise "
                        "(listed as not computed when its weights are unavailable).")
    e.add_argument("--inception_weights", type=str, default=None,
                   help="Path of torch-fidelity's Inception-v3 weights file, for Inception FID offline.")
    e.add_argument("--throughput_batch_size", type=int, default=16, help="Images per timed UNet forward pass.")
    e.add_argument("--throughput_repeats", type=int, default=7,
                   help="Timed repeats per model (interleaved teacher/pruned); 0 skips the timing.")
    e.add_argument("--num_grid_images", type=int, default=16, help="Pairs shown in eval_teacher_vs_pruned.png (0: no grid).")
    return training.resolve_data_arguments(parser.parse_args(argv))


def _remote_unet(path: str, revision, cache_dir, token):
    """``(module, class)`` when the folder/repo declares its UNet as code shipped with it, else None."""
    index = None
    if os.path.isdir(path):
        index_path = os.path.join(path, "model_index.json")
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                index = json.load(f)
    else:
        try:
            from huggingface_hub import hf_hub_download

            with open(hf_hub_download(path, "model_index.json", revision=revision, cache_dir=cache_dir, token=token)) as f:
                index = json.load(f)
        except Exception:  # noqa: BLE001 - no readable index: not a remote-code pipeline
            return None
    entry = (index or {}).get("unet")
    if isinstance(entry, list) and len(entry) == 2 and entry[0] not in ("diffusers", None):
        return tuple(entry)
    return None


def resolve_model(path, revision, cache_dir, token, trust_remote_code: bool, what: str):
    """Check a pipeline or UNet (config reads only) and say how it will be loaded.

    Returns
    -------
    ("package", TeacherSource) for a UNet2DModel or PrunedUNet2DModel (loaded with this package's classes, safetensors
    only, no code from the repo), or ("remote", path) for a UNet whose class the repo ships as code, when allowed.
    """
    try:
        return "package", resolve_teacher(path, revision, cache_dir, token)
    except ValueError as error:
        remote = _remote_unet(path, revision, cache_dir, token)
        if remote is None:
            raise ValueError(f"{what}: {error}") from error
        if not trust_remote_code:
            raise ValueError(
                f"{what}: {path} declares its UNet as {remote[1]} from {remote[0]}.py, code shipped with the pipeline. "
                "Loading it runs that code, which diffusers does only with trust_remote_code=True: pass "
                "--trust_remote_code if you trust its source. (Pipelines saved by diffusers-gfprune, stock or "
                f"per-layer, need no remote code; their UNets are {' or '.join(SUPPORTED_CLASSES)}.)"
            ) from error
        return "remote", path


def load_model(resolved, revision, cache_dir, token, trust_remote_code: bool = False):
    """The UNet, scheduler and pipeline kind (pixel or latent, with its frozen components) of a
    :func:`resolve_model` result (safetensors only).

    ``trust_remote_code`` is the user's ``--trust_remote_code``, passed through unchanged: without it
    diffusers refuses a UNet defined by code in the repo.
    """
    kind, source = resolved
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "package":
        unet, scheduler = load_teacher(source, cache_dir, token)
        return unet, scheduler, load_kind(source, cache_dir, token, device=device)
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(source, revision=revision, cache_dir=cache_dir, token=token,
                                                 trust_remote_code=trust_remote_code, use_safetensors=True)
    return pipeline.unet, pipeline.scheduler, kind_for_pipeline(pipeline).to(device)


def _unet_config(resolved) -> dict:
    kind, source = resolved
    if kind == "package":
        return source.unet_config
    return {}  # known only once loaded


def _default_teacher(path: str):
    """The teacher a pruned folder names: a local run's own record of its teacher folder (a hidden file that is
    never pushed), else pruning_summary.json's teacher (a Hub id, or a local folder's base name only)."""
    if not os.path.isdir(path):
        return None
    local = os.path.join(path, training.LOCAL_PATHS_FILE)
    if os.path.isfile(local):
        with open(local, encoding="utf-8") as f:
            teacher = json.load(f).get("teacher")
        if teacher and os.path.exists(teacher):
            return teacher
    summary = os.path.join(path, "pruning_summary.json")
    if os.path.isfile(summary):
        with open(summary, encoding="utf-8") as f:
            return json.load(f).get("teacher")
    return None


def _shape(config: dict):
    size = config.get("sample_size")
    size = (size, size) if isinstance(size, int) else (tuple(size) if size is not None else None)
    return config.get("in_channels"), config.get("out_channels"), size


def validate(args):
    """Every check that can fail before any model weights are loaded or images sampled."""
    if args.num_eval_images < 2:
        raise ValueError(f"--num_eval_images must be at least 2 (SSIM pairs, FID spread), got {args.num_eval_images}.")
    if args.num_inference_steps < 1 or args.eval_batch_size < 1:
        raise ValueError("--num_inference_steps and --eval_batch_size must be >= 1.")
    if args.throughput_repeats < 0 or args.throughput_batch_size < 1 or args.num_grid_images < 0:
        raise ValueError("--throughput_repeats and --num_grid_images must be >= 0, --throughput_batch_size >= 1.")
    digits = args.dataset_name == "digits"
    for name, extractor in evaluation.BUILTIN_FEATURE_EXTRACTORS.items():
        if args.eval_fid == extractor and args.dataset_name != name:
            raise ValueError(
                f"--eval_fid {extractor} measures the built-in {name} only (--dataset_name {name}); "
                "use --eval_fid auto or inception-v3-compat for other data."
            )
    if args.inception_weights is not None and not os.path.isfile(args.inception_weights):
        raise ValueError(f"--inception_weights {args.inception_weights!r} is not a file.")
    if args.output_dir is None:
        if not os.path.isdir(args.pretrained_model_name_or_path):
            raise ValueError("--output_dir is needed when the pruned pipeline is a Hub id (there is no local folder to write into).")
        args.output_dir = args.pretrained_model_name_or_path
    if os.path.isfile(args.output_dir):
        raise ValueError(f"--output_dir {args.output_dir!r} is a file; give a folder.")
    if args.teacher_model_name_or_path is None:
        args.teacher_model_name_or_path = _default_teacher(args.pretrained_model_name_or_path)
        if args.teacher_model_name_or_path is None:
            raise ValueError(
                "No teacher given: pass --teacher_model_name_or_path (the dense model the pipeline was pruned from); "
                "it is read from pruning_summary.json only when the pruned folder has one."
            )
    pruned = resolve_model(args.pretrained_model_name_or_path, args.revision, args.cache_dir, args.hub_token,
                           args.trust_remote_code, "The pruned pipeline")
    teacher = resolve_model(args.teacher_model_name_or_path, args.teacher_revision, args.cache_dir, args.hub_token,
                            args.trust_remote_code, "The teacher")
    pruned_shape, teacher_shape = _shape(_unet_config(pruned)), _shape(_unet_config(teacher))
    if pruned[0] == teacher[0] == "package" and pruned_shape != teacher_shape:
        raise ValueError(
            f"The pruned UNet takes (in_channels, out_channels, sample_size) = {pruned_shape} but the teacher "
            f"{teacher_shape}; structured pruning keeps the image interface, so this is not its teacher."
        )
    in_channels = teacher_shape[0] or pruned_shape[0] or 3
    resolution = args.resolution or (teacher_shape[2] or pruned_shape[2] or (None,))[0]
    if teacher[0] == "package":  # the images' shape (a latent teacher's UNet works on smaller latents)
        in_channels, _, image_size = teacher[1].kind.image_shape(teacher[1].unet_config)
        resolution = args.resolution or image_size
    data_config = data.DataConfig(
        dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name, train_data_dir=args.train_data_dir,
        image_column=args.image_column, resolution=resolution, center_crop=args.center_crop, random_flip=False,
        cache_dir=args.cache_dir, max_train_samples=args.max_train_samples,
    )
    data.validate_data_source(data_config, in_channels)
    return pruned, teacher, data_config, digits


def evaluate(args, pruned_unet, teacher_unet, kind, data_config, digits: bool, in_channels: int) -> dict:
    """Quality (SSIM, FID/KID), size (params, MACs) and speed of ``pruned_unet`` against ``teacher_unet``."""
    reference = None
    dataset_name = args.dataset_name or os.path.basename(os.path.normpath(args.train_data_dir or "images"))
    if args.dataset_name not in evaluation.BUILTIN_FEATURE_EXTRACTORS and args.eval_fid != "none":
        dataset = data.load_train_dataset(data_config, in_channels)
        reference = evaluation.real_images(dataset, args.num_eval_images, args.seed)
    comparison = evaluation.evaluate_against_teacher(
        teacher_unet, pruned_unet, kind.scheduler, args.num_eval_images, num_inference_steps=args.num_inference_steps,
        seed=args.seed, fid=args.eval_fid, digits=digits, reference_images=reference, dataset_name=dataset_name,
        inception_weights=args.inception_weights, batch_size=args.eval_batch_size, pipeline_kind=kind,
    )
    sample_size = kind.sample_shape(teacher_unet)[-1]
    counts = {"teacher": counting.model_counts(teacher_unet, sample_size), "pruned": counting.model_counts(pruned_unet, sample_size)}
    throughput = None
    if args.throughput_repeats:
        throughput = evaluation.compare_throughput(teacher_unet, pruned_unet, batch_size=args.throughput_batch_size,
                                                   repeats=args.throughput_repeats)
    return {"comparison": comparison, "counts": counts, "throughput": throughput}


def main(argv=None):
    args = parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    pruned_source, teacher_source, data_config, digits = validate(args)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    started = time.time()
    pruned_unet, _, _ = load_model(pruned_source, args.revision, args.cache_dir, args.hub_token, args.trust_remote_code)
    teacher_unet, _, kind = load_model(teacher_source, args.teacher_revision, args.cache_dir, args.hub_token,
                                       args.trust_remote_code)
    if _shape(dict(pruned_unet.config)) != _shape(dict(teacher_unet.config)):
        raise ValueError(
            f"The pruned UNet takes (in_channels, out_channels, sample_size) = {_shape(dict(pruned_unet.config))} but the "
            f"teacher {_shape(dict(teacher_unet.config))}; this is not its teacher."
        )
    if data_config.resolution is None:
        data_config.resolution = kind.image_shape(teacher_unet)[-1]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pruned_unet.to(device).eval().requires_grad_(False)
    teacher_unet.to(device).eval().requires_grad_(False)

    result = evaluate(args, pruned_unet, teacher_unet, kind, data_config, digits, kind.image_shape(teacher_unet)[0])
    comparison, counts, throughput = result["comparison"], result["counts"], result["throughput"]

    os.makedirs(args.output_dir, exist_ok=True)
    if args.num_grid_images:
        n = min(args.num_grid_images, args.num_eval_images)
        grid = comparison_grid([comparison.teacher_images[:n], comparison.pruned_images[:n]], ["teacher", "pruned"], scale=4)
        tmp = os.path.join(args.output_dir, "eval_teacher_vs_pruned.tmp.png")
        grid.save(tmp)
        os.replace(tmp, os.path.join(args.output_dir, "eval_teacher_vs_pruned.png"))
    results = {
        "pruned": args.pretrained_model_name_or_path,
        "teacher": args.teacher_model_name_or_path,
        "dataset": args.dataset_name or args.train_data_dir,
        "command": "python training/evaluate.py " + " ".join(argv),
        "evaluation": comparison.as_dict(),
        "metrics": {m.key: m.value for m in comparison.metrics},
        "counts": counts,
        "throughput": throughput.as_dict() if throughput is not None else None,
        "device": str(device),
        "seconds": time.time() - started,
    }
    training.write_json(results, os.path.join(args.output_dir, "eval_results.json"))
    title = f"{os.path.basename(os.path.normpath(args.pretrained_model_name_or_path))} against {args.teacher_model_name_or_path}"
    text = evaluation.comparison_markdown(comparison, counts, throughput, title=title)
    training.write_text(os.path.join(args.output_dir, "eval_results.md"), text + f"\nCommand: `{results['command']}`\n")
    print(text)
    return results


if __name__ == "__main__":
    main()
