"""What the training scripts share: arguments, accelerate set-up, optimizer, EMA, checkpoints.

The scripts in ``training/`` parse arguments and orchestrate; the pieces live here so that
``train_ddpm.py`` and ``prune.py`` behave alike (same flags, same checkpoint layout).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
from contextlib import contextmanager
from typing import List, Optional

import torch

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


# ---------------------------------------------------------------------- paths that get published
REPO_ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))


# Machine-local facts of a run (its teacher folder) that published files leave out; hidden, so never pushed.
LOCAL_PATHS_FILE = ".local_paths.json"


def portable_path(path: Optional[str], root: str = REPO_ROOT) -> Optional[str]:
    """``path`` as it may be recorded in a committed or published file: no machine-local folders, no user name.

    A path inside ``root`` (the repository) becomes relative to it; any other absolute path (or one under the
    home folder) becomes its base name. Relative paths and Hub ids are kept as they are.
    """
    if path is None:
        return None
    text = os.fspath(path)
    expanded = os.path.expanduser(text)
    if not os.path.isabs(expanded):
        return text
    full = os.path.normpath(expanded)
    if full == root or full.startswith(root + os.sep):
        return os.path.relpath(full, root)
    return os.path.basename(full) or full


def portable_argv(argv: List[str], root: str = REPO_ROOT) -> List[str]:
    """A command line with every absolute path made portable (:func:`portable_path`), ``--flag=/path`` included."""
    out = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if eq and flag.startswith("--"):
            out.append(f"{flag}={portable_path(value, root)}")
        else:
            out.append(portable_path(arg, root))
    return out


# ---------------------------------------------------------------------- arguments
def add_data_arguments(parser: argparse.ArgumentParser, default_dataset: Optional[str] = "digits") -> None:
    """The data flags of diffusers' example scripts.

    ``default_dataset`` applies only when neither ``--dataset_name`` nor ``--train_data_dir`` is given;
    call :func:`resolve_data_arguments` on the parsed namespace to apply it.
    """
    default_help = f" Default, when no source is given: {default_dataset!r}." if default_dataset else ""
    parser.add_argument("--dataset_name", type=str, default=None,
                        help="A Hub data set (owner/name), a local data set path, or the built-in 'digits' (scikit-learn's "
                             "8x8 digits, offline)." + default_help)
    parser.set_defaults(default_dataset_name=default_dataset)
    parser.add_argument("--dataset_config_name", type=str, default=None, help="The data set's config name, if it has several.")
    parser.add_argument("--train_data_dir", type=str, default=None,
                        help="A folder of images (loaded as an 'imagefolder' data set); use instead of --dataset_name.")
    parser.add_argument("--image_column", type=str, default="image", help="The column holding the images.")
    parser.add_argument("--cache_dir", type=str, default=None, help="Where downloaded data sets and models are cached.")
    parser.add_argument("--resolution", type=int, default=None,
                        help="Training resolution; defaults to the model's sample_size.")
    parser.add_argument("--center_crop", action="store_true", help="Center-crop to the resolution (default: random crop).")
    parser.add_argument("--random_flip", action="store_true", help="Flip images horizontally at random.")
    parser.add_argument("--max_train_samples", type=int, default=None, help="Use only this many training images (debugging).")
    parser.add_argument("--dataloader_num_workers", type=int, default=None,
                        help="Data loader worker processes per training process. Default: 0 for the built-in data sets "
                             "(already tensors in memory), else up to 8, shared among the processes of this machine "
                             "(images are decoded and resized in the workers, not in the training loop).")


def resolve_data_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """Apply the default data set of :func:`add_data_arguments`, only when the user gave no source."""
    from .data import resolve_source

    args.dataset_name = resolve_source(args.dataset_name, args.train_data_dir, getattr(args, "default_dataset_name", None))
    return args


def add_training_arguments(parser: argparse.ArgumentParser, defaults: Optional[dict] = None) -> None:
    """The flags of diffusers' example scripts that both training scripts take."""
    d = {"train_batch_size": 64, "max_train_steps": 2000, "learning_rate": 1e-4, "lr_warmup_steps": 100,
         "checkpointing_steps": 500, "validation_steps": 500, "output_dir": "output"}
    d.update(defaults or {})
    parser.add_argument("--output_dir", type=str, default=d["output_dir"], help="Where the pipeline, card, samples and checkpoints go.")
    parser.add_argument("--overwrite_output_dir", action="store_true", help="Allow writing into a non-empty output folder.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for reproducible training.")
    parser.add_argument("--train_batch_size", type=int, default=d["train_batch_size"], help="Batch size per device.")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Steps to accumulate before an update.")
    parser.add_argument("--max_train_steps", type=int, default=d["max_train_steps"], help="Total optimizer steps.")
    parser.add_argument("--learning_rate", type=float, default=d["learning_rate"], help="Initial learning rate (after warm-up).")
    parser.add_argument("--lr_scheduler", type=str, default="constant_with_warmup",
                        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
                        help="Learning-rate schedule.")
    parser.add_argument("--lr_warmup_steps", type=int, default=d["lr_warmup_steps"], help="Warm-up steps of the schedule.")
    parser.add_argument("--adam_beta1", type=float, default=0.95, help="Adam beta1.")
    parser.add_argument("--adam_beta2", type=float, default=0.999, help="Adam beta2.")
    parser.add_argument("--adam_weight_decay", type=float, default=1e-6, help="AdamW weight decay.")
    parser.add_argument("--adam_epsilon", type=float, default=1e-8, help="Adam epsilon.")
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    parser.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=True, help="Keep an EMA of the weights and save it.")
    parser.add_argument("--ema_max_decay", type=float, default=0.9999, help="Largest EMA decay.")
    parser.add_argument("--ema_inv_gamma", type=float, default=1.0, help="EMA warm-up inv_gamma.")
    parser.add_argument("--ema_power", type=float, default=3 / 4, help="EMA warm-up power.")
    parser.add_argument("--prediction_type", type=str, default=None, choices=["epsilon", "sample", "v_prediction"],
                        help="What the model predicts; defaults to the scheduler's.")
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                        help="Mixed precision (accelerate); default from `accelerate config`.")
    parser.add_argument("--report_to", type=str, default="tensorboard",
                        help="Trackers: tensorboard, wandb, all, or none.")
    parser.add_argument("--logging_dir", type=str, default="logs", help="Tracker logs, relative to output_dir.")
    parser.add_argument("--checkpointing_steps", type=int, default=d["checkpointing_steps"], help="Save a resumable checkpoint every N steps.")
    parser.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    parser.add_argument("--resume_from_checkpoint", type=str, default=None, help="A checkpoint folder, or 'latest'.")
    parser.add_argument("--validation_steps", type=int, default=d["validation_steps"], help="Save a sample grid every N steps.")
    parser.add_argument("--num_validation_images", type=int, default=16, help="Images in a validation grid.")
    parser.add_argument("--num_inference_steps", type=int, default=100, help="Sampling steps of validation grids (DDIM).")


def add_hub_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--push_to_hub", action="store_true", help="Push the finished pipeline to the Hub.")
    parser.add_argument("--hub_model_id", type=str, default=None, help="owner/name of the Hub repo to push to.")
    parser.add_argument("--hub_token", type=str, default=None, help="Hub token (else HF_TOKEN or the login cache). Never printed or stored.")
    parser.add_argument("--hub_private_repo", action="store_true", help="Create the Hub repo as private.")


# ---------------------------------------------------------------------- checks before heavy work
def check_output_dir(output_dir: str, overwrite: bool, resume: Optional[str]) -> None:
    """A non-empty output folder is refused unless resuming or asked to overwrite."""
    if os.path.isfile(output_dir):
        raise ValueError(f"--output_dir {output_dir!r} is a file; give a folder.")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite and not resume:
        raise ValueError(
            f"The output folder {output_dir!r} exists and is not empty. Choose another --output_dir, pass "
            "--overwrite_output_dir to write into it, or --resume_from_checkpoint latest to continue a run."
        )


def check_training_arguments(args) -> None:
    for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    for name in ("checkpointing_steps", "validation_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise ValueError("--checkpoints_total_limit must be >= 1.")


def check_hub_arguments(args) -> None:
    """--push_to_hub needs a repo id and a token, before any heavy work. The token is never printed."""
    if not args.push_to_hub:
        return
    if not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id owner/name (the repo to create or update).")
    from huggingface_hub import get_token

    if not (args.hub_token or get_token()):
        raise ValueError(
            "--push_to_hub needs a Hub token: pass --hub_token, set HF_TOKEN, or run `hf auth login` once."
        )


# ---------------------------------------------------------------------- accelerate
def create_accelerator(args, split_batches: bool = True):
    """An Accelerator for the scripts. With ``split_batches`` the data loader yields the global batch
    and each process gets its slice, so N processes see what one process sees."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    report_to = None if args.report_to in (None, "none") else args.report_to
    if report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            logger.warning("tensorboard is not installed; logging to no tracker (pip install tensorboard).")
            report_to = None
    project = ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir))
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=project,
        dataloader_config=DataLoaderConfiguration(split_batches=split_batches),
    )
    check_launch(accelerator.num_processes)
    return accelerator


def check_launch(num_processes: int, environ=None) -> None:
    """Refuse a launch that asked for several processes but got a single-process accelerate state.

    Two ways to get there with ``accelerate launch`` (1.x) on a machine without GPUs:

    * ``--cpu --num_processes N`` starts ONE process (several CPU processes need an MPI hostfile);
      the run would silently use 1/N of the intended global batch.
    * ``--multi_gpu --num_processes N`` starts N processes (torchrun) but, with no GPU and no
      ``ACCELERATE_USE_CPU``, each sets up a single-process state: N copies of the whole run, all
      writing the same output folder.
    """
    env = os.environ if environ is None else environ
    if num_processes > 1:
        return
    world = max(int(env.get(name, "1") or 1) for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))
    fix = (
        "On a machine without GPUs, start N CPU processes with "
        "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ...`; for one process, "
        "drop --num_processes (or pass --num_processes 1)."
    )
    if world > 1:
        raise RuntimeError(
            f"The launcher started {world} processes (WORLD_SIZE={world}), but accelerate set up a single-process run "
            "in each (no GPU for --multi_gpu?), so every process would train alone and write the same output folder. "
            + fix + " On GPUs, check that torch sees them (torch.cuda.device_count())."
        )
    use_cpu = str(env.get("ACCELERATE_USE_CPU", "")).lower() in ("1", "true", "yes")
    if use_cpu and env.get("MASTER_ADDR"):
        # accelerate's simple launcher sets MASTER_ADDR only when asked for several processes or machines.
        raise RuntimeError(
            "`accelerate launch --cpu --num_processes N` (N > 1) starts a single process unless an MPI hostfile "
            "is given (--mpirun_hostfile), so this run would use 1 process and 1/N of the intended global batch. "
            + fix
        )


def create_optimizer(model, args):
    return torch.optim.AdamW(
        model.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


def scheduler_steps_per_update(num_processes: int = 1, split_batches: bool = True) -> int:
    """How many times accelerate steps a prepared LR scheduler per optimizer update.

    Without ``split_batches`` the data loader's batch is per process and accelerate steps the scheduler once per
    process (diffusers' examples scale the schedule's lengths by the process count for it); with ``split_batches``
    (what :func:`create_accelerator` sets up) it steps once.
    """
    return 1 if split_batches else num_processes


def create_lr_scheduler(optimizer, args, num_processes: int = 1, split_batches: bool = True):
    """The LR schedule of ``args`` in optimizer updates, scaled to the steps accelerate will take
    (:func:`scheduler_steps_per_update`), so warm-up and decay last the same number of updates on any process count."""
    from diffusers.optimization import get_scheduler

    factor = scheduler_steps_per_update(num_processes, split_batches)
    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * factor,
        num_training_steps=args.max_train_steps * factor,
    )


def create_ema(model, args):
    from diffusers.training_utils import EMAModel

    return EMAModel(
        model.parameters(),
        decay=args.ema_max_decay,
        use_ema_warmup=True,
        inv_gamma=args.ema_inv_gamma,
        power=args.ema_power,
        model_cls=type(model),
        model_config=model.config,
    )


EMA_SETTINGS = ("decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup", "inv_gamma", "power")


def load_ema(ema, path: str, model_cls) -> None:
    """Load into ``ema`` what ``EMAModel.save_pretrained(path)`` wrote: the averaged weights (safetensors) and the
    EMA settings, which it stores among the model's config keys.

    ``EMAModel.from_pretrained`` does the same but passes the folder to ``from_config`` (deprecated by diffusers)
    and builds the model from a config with keys it does not expect (a warning per load).
    """
    from safetensors.torch import load_file

    config = dict(model_cls.load_config(path))
    settings = {k: config.pop(k) for k in EMA_SETTINGS if k in config}
    weights = load_file(os.path.join(path, "diffusion_pytorch_model.safetensors"))
    names = [name for name, _ in ema_parameter_names(model_cls, config)]
    missing = [n for n in names if n not in weights]
    if missing:
        raise ValueError(f"{path} does not hold the EMA weights of a {model_cls.__name__} (missing {missing[:3]}).")
    ema.load_state_dict({**settings, "shadow_params": [weights[n] for n in names]})


def ema_parameter_names(model_cls, config: dict):
    """(name, shape) of the parameters of ``model_cls(**config)`` in ``parameters()`` order, without allocating them."""
    with torch.device("meta"):
        model = model_cls.from_config(config)
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


# ---------------------------------------------------------------------- checkpoints
def list_checkpoints(output_dir: str) -> List[str]:
    """Checkpoint folders in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := CHECKPOINT_PATTERN.match(name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def resolve_checkpoint(output_dir: str, resume: Optional[str]) -> Optional[str]:
    """The folder to resume from: a path, or the newest with 'latest' (None when there is none)."""
    if not resume:
        return None
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = resume if os.path.isdir(resume) else os.path.join(output_dir, resume)
    if not os.path.isdir(path):
        raise ValueError(f"--resume_from_checkpoint {resume!r} is not a checkpoint folder (or use 'latest').")
    return path


def checkpoint_step(path: str) -> int:
    match = CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(path)))
    if not match:
        raise ValueError(f"{path!r} is not named checkpoint-<step>.")
    return int(match.group(1))


def make_room_for_checkpoint(output_dir: str, limit: Optional[int]) -> None:
    """Delete the oldest checkpoints so that one more fits under ``limit``."""
    if limit is None:
        return
    checkpoints = list_checkpoints(output_dir)
    for path in checkpoints[: max(0, len(checkpoints) - limit + 1)]:
        logger.info("Removing old checkpoint %s", path)
        shutil.rmtree(path)


def log_images(accelerator, name: str, image, step: int) -> None:
    """Send a PIL image to the trackers that take images."""
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(name, np.asarray(image)[None], step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({name: wandb.Image(image)}, step=step)


# ---------------------------------------------------------------------- data order and noise
class GlobalBatchNoise:
    """Noise and timesteps of the training loss, drawn per image of the *global* batch.

    Image ``j`` of the ``k``-th global batch gets its noise and timestep from a generator seeded with
    ``(seed, k * global_batch + j)``, drawn directly on the training device. Each process draws only its own
    slice, yet a run on N processes computes what one process computes with the N-times larger batch (up to the
    order of float sums), and nothing of the global batch is drawn on the host or copied (the cost grew with the
    global batch and the resolution: 130 ms per step at 256 px, 8 x 128). The state is the number of batches drawn;
    it goes into checkpoints. The numbers differ between device types (a CPU and a CUDA generator differ), not
    between runs on the same one.
    """

    def __init__(self, seed: int, num_processes: int = 1, process_index: int = 0):
        self.seed = int(seed)
        self.num_processes = num_processes
        self.process_index = process_index
        self.draws = 0
        self._generators: dict = {}

    def _generator(self, device) -> torch.Generator:
        device = torch.device(device)
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device]

    def _seed(self, index: int) -> int:
        # Distinct 63-bit seeds for (seed, image) pairs (a multiplicative mix, so nearby indices do not give nearby seeds).
        return (self.seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) % (2**63 - 1)

    def loss(self, images: torch.Tensor, scheduler, prediction_type: Optional[str] = None):
        """A :class:`~diffusers_gfprune.objective.DDPMLoss` for this process's slice of the global batch."""
        from .objective import DDPMLoss

        local = images.shape[0]
        first = self.draws * local * self.num_processes + self.process_index * local
        self.draws += 1
        generator = self._generator(images.device)
        num_train = scheduler.config.num_train_timesteps
        noise, timesteps = [], []
        for j in range(local):
            generator.manual_seed(self._seed(first + j))
            noise.append(torch.randn(images.shape[1:], generator=generator, device=images.device, dtype=torch.float32))
            timesteps.append(torch.randint(0, num_train, (1,), generator=generator, device=images.device))
        return DDPMLoss(
            images,
            torch.stack(noise).to(images.dtype),
            torch.cat(timesteps),
            scheduler,
            prediction_type or scheduler.config.prediction_type,
        )

    def state_dict(self) -> dict:
        return {"draws": torch.tensor([self.draws], dtype=torch.int64)}

    def load_state_dict(self, state: dict) -> None:
        if "draws" not in state:
            raise ValueError(
                "This checkpoint holds the training noise in an older format (a generator state), which this version "
                "cannot continue exactly; resume it with the version that wrote it, or start the run again."
            )
        self.draws = int(state["draws"].reshape(-1)[0])


def epoch_batches(dataloader, generator: torch.Generator, seed: int, epoch: int, skip: int = 0, accelerator=None):
    """Batches of one epoch in an order fixed by (seed, epoch), skipping the first ``skip`` (resume).

    ``generator`` is the shuffle generator the data loader was built with (accelerate keeps it).
    """
    generator.manual_seed(int(seed) * 100_003 + epoch)
    if skip and accelerator is not None:
        yield from accelerator.skip_first_batches(dataloader, skip)
        return
    for i, batch in enumerate(dataloader):
        if i >= skip:
            yield batch


def write_text(path: str, text: str) -> None:
    """Write a text file atomically: a temporary name, then a rename (never a half-written file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(data, path: str, indent: int = 2) -> None:
    """``data`` as JSON (non-JSON values as their ``str``), written atomically."""
    import json

    write_text(path, json.dumps(data, indent=indent, default=str) + "\n")


def save_extra_state(directory: str, tensors: dict, meta: dict) -> None:
    """Tensors as safetensors and the rest as JSON, next to accelerate's own files."""
    from .state_files import save_state

    save_state(directory, "training_state", tensors, meta)


def load_extra_state(directory: str):
    from .state_files import load_state

    return load_state(directory, "training_state")


# ---------------------------------------------------------------------- saving
def ema_model(model, ema):
    """A copy of ``model`` for sampling and evaluation: the EMA weights when there is an EMA, and never accelerate's
    mixed-precision wrapper, so that it samples in the weights' precision as the teacher does
    (:func:`~diffusers_gfprune.precision.plain_copy`)."""
    from .precision import plain_copy

    return plain_copy(model, ema)


def save_pipeline_into(pipeline, output_dir: str, pruning_info: Optional[dict] = None) -> None:
    """Save ``pipeline`` at the root of ``output_dir`` (beside checkpoints, samples, logs).

    The pipeline is written completely to a temporary folder first; only then are its files moved
    into place, so an interrupted save never leaves a half-written pipeline. With ``pruning_info``
    it is saved as the published variant (``GFPruneDDPMPipeline`` with its code; see
    :mod:`diffusers_gfprune.publish`), otherwise as the pipeline it is (a plain ``DDPMPipeline``).
    """
    from .modeling_pruned_unet import save_pruned_pipeline

    staging = os.path.join(output_dir, ".pipeline-staging")
    if pruning_info is not None:
        from .publish import save_gfprune_pipeline

        save_gfprune_pipeline(pipeline.unet, pipeline.scheduler, pruning_info, staging)
    else:
        save_pruned_pipeline(pipeline, staging)
    for name in os.listdir(staging):
        target = os.path.join(output_dir, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        elif os.path.exists(target):
            os.remove(target)
        os.replace(os.path.join(staging, name), target)
    os.rmdir(staging)


def scoring_losses(dataset, step: int, seed: int, batch_size: int, num_batches: int, scheduler, prediction_type=None,
                   num_processes: int = 1, process_index: int = 0, device="cpu", stratified: bool = True,
                   resample: bool = False, chunk_size: Optional[int] = None, encode=None):
    """Mini-batches for the pruning criterion, drawn from the seed alone (or from (seed, step) with ``resample``).

    Needing no state of their own, a resumed run re-draws exactly what an uninterrupted run drew; every
    process draws the same global batches and takes its slice.

    Parameters
    ----------
    stratified : bool
        Timesteps one per stratum of ``[0, T)`` in every global mini-batch
        (:func:`~diffusers_gfprune.objective.stratified_timesteps`) instead of uniform draws.
    resample : bool
        Draw new images, noise and timesteps at every re-scoring. By default every re-scoring sees the
        same draw, so scores change between re-scorings because the model changed, not the sample.
    chunk_size : int, optional
        The criteria differentiate at most this many images at a time (:class:`~diffusers_gfprune.objective.DDPMLoss`).
    encode : callable, optional
        Turns a batch of data set items into what the model is trained on (a latent pipeline's encoder; see
        :meth:`~diffusers_gfprune.pipeline_kinds.PipelineKind.training_data`), before the noise is drawn.
    """
    from .objective import DDPMLoss, stratified_timesteps

    key = int(seed) * 1_000_003 + (int(step) if resample else -1)
    generator = torch.Generator().manual_seed(key % (2**63))
    prediction_type = prediction_type or scheduler.config.prediction_type
    part = slice(process_index * batch_size, (process_index + 1) * batch_size)
    num_train = scheduler.config.num_train_timesteps
    losses = []
    for _ in range(num_batches):
        size = batch_size * num_processes
        index = torch.randint(len(dataset), (size,), generator=generator)
        images = torch.stack([dataset[int(i)]["images"] for i in index])
        if encode is not None:
            images = encode(images.to(device))  # on the device; the noise below is drawn on the host, as always
        noise = torch.randn(images.shape, generator=generator)
        if stratified:
            timesteps = stratified_timesteps(size, num_train, generator)
        else:
            timesteps = torch.randint(0, num_train, (size,), generator=generator)
        losses.append(DDPMLoss(images[part].to(device), noise[part].to(device), timesteps[part].to(device), scheduler,
                               prediction_type, chunk_size))
    return losses


@contextmanager
def compile_deferred(accelerator, defer: bool = True):
    """``accelerator.prepare`` without torch.compile inside the context (when ``defer``).

    The masked dense model of the pruning stage is not worth compiling: its mask hooks take data-dependent decisions
    (which GroupNorm channels live) that dynamo cannot trace, so it breaks the graph in every block, recompiles once
    per width and, having given up on ``UNet2DModel.forward``, keeps giving up for the slim model too. The slim model
    after the export is compiled with the backend the user asked for (:func:`reset_compiler` first).
    """
    from accelerate.utils import DynamoBackend

    plugin = accelerator.state.dynamo_plugin
    saved = plugin.backend
    if defer:
        plugin.backend = DynamoBackend.NO
    try:
        yield
    finally:
        plugin.backend = saved


def reset_compiler(accelerator) -> None:
    """Forget what dynamo learnt about earlier models (give-ups, guards) before a new model is compiled."""
    from accelerate.utils import DynamoBackend

    if accelerator.state.dynamo_plugin.backend != DynamoBackend.NO:
        torch._dynamo.reset()


def forget_prepared(accelerator) -> None:
    """Drop accelerate's references to the prepared models, optimizers and schedulers.

    After export the slim model replaces the dense one; without this, ``save_state`` would keep
    saving the dense model's optimizer too and a resumed run could not match the files.
    """
    accelerator._models.clear()
    accelerator._optimizers.clear()
    accelerator._schedulers.clear()
