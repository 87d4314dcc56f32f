"""Pipeline kinds: everything that differs between pixel-space and latent diffusion pipelines, in one place.

A teacher's kind is read from its ``model_index.json`` (``_class_name``), never from a flag:

==================================================  ===========  ==========================================
``_class_name``                                     kind         what the UNet sees
==================================================  ===========  ==========================================
``DDPMPipeline``, ``DDIMPipeline``, ``PNDMPipeline``  ``pixel``    images in [-1, 1]
``LDMPipeline``                                     ``latent``   ``vqvae.encode(x).latents * scaling_factor``
no ``model_index.json`` (a bare ``UNet2DModel``)     ``pixel``    images (published as a ``DDPMPipeline``)
==================================================  ===========  ==========================================

plus this package's per-layer variants (``GFPruneDDPMPipeline``, ``GFPruneLDMPipeline``), so that a pruned
output can be a teacher or be evaluated again. Any other class is refused by :func:`kind_for_index`, a config
read, before any weights are loaded.

A kind object (:class:`PipelineKind`) is bound to one teacher: it keeps the teacher's pipeline class and
scheduler class, and, once :meth:`PipelineKind.load_components` ran, its frozen components (the autoencoder of
a latent pipeline) and its own scheduler. It then knows how to

* turn a batch of training images into what the UNet is trained on (:meth:`~PipelineKind.encode`),
* give the UNet's input shape (:meth:`~PipelineKind.sample_shape`) and the images' (:meth:`~PipelineKind.image_shape`),
* sample images from fixed initial noise through a scheduler and decode them (:meth:`~PipelineKind.sample`),
* build the output pipeline, of the teacher's own class for the stock layout or the per-layer variant
  (:meth:`~PipelineKind.build_pipeline`),
* optionally encode a whole data set once, within a memory bound (:meth:`~PipelineKind.training_data`).

A third kind is one subclass and one :func:`register_kind` call.

The latent scaling follows ``LDMPipeline.__call__`` exactly: it divides the UNet's final latents by
``vqvae.config.scaling_factor`` and decodes them with ``vqvae.decode`` (which quantizes them with the
codebook). So the UNet is trained on the encoder's output before quantization (``VQModel.encode(x).latents``,
as the latent-diffusion paper trains on VQ latents) times ``scaling_factor``. When the autoencoder's saved
config has no ``scaling_factor``, diffusers fills in its default (0.18215) and the pipeline decodes with it;
the kind does the same and says so in :attr:`PipelineKind.notes` (a teacher trained at another scale then
samples badly with its own pipeline too: give its ``vqvae/config.json`` the right ``scaling_factor``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Dict, List, Optional, Tuple, Type

import torch
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

__all__ = [
    "PipelineKind",
    "PixelKind",
    "LatentKind",
    "LatentCacheConfig",
    "LatentDataset",
    "KINDS",
    "PIPELINE_CLASSES",
    "register_kind",
    "kind_for_index",
    "kind_for_pipeline",
    "supported_pipeline_classes",
    "public_source_name",
]


def _image_side(size) -> Tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)


@dataclass(frozen=True)
class LatentCacheConfig:
    """Encode the training data once and keep the latents in memory (latent kinds only).

    Attributes
    ----------
    max_megabytes : float
        Memory bound of the cache, in MiB (2**20 bytes) of float32 latents; 0 switches caching off. A data set
        whose latents (times two with random flips: both orientations are encoded) do not fit is encoded batch
        by batch in the training loop instead, as without a cache, and the reason is logged.
    batch_size : int
        Images per encoder call while filling the cache.
    """

    max_megabytes: float = field(default=0.0, metadata={"help": "Memory bound of the latent cache in MiB; 0 = no cache."})
    batch_size: int = field(default=256, metadata={"help": "Images per encoder call while filling the cache."})

    def __post_init__(self):
        if not self.max_megabytes >= 0:
            raise ValueError(f"LatentCacheConfig.max_megabytes must be >= 0 (0 = no cache), got {self.max_megabytes!r}.")
        if self.batch_size < 1:
            raise ValueError(f"LatentCacheConfig.batch_size must be >= 1, got {self.batch_size!r}.")


class PipelineKind:
    """One kind of ``UNet2DModel`` pipeline, bound to a teacher's pipeline and scheduler classes.

    Subclasses set the class attributes and override :meth:`encode` / :meth:`decode` (and, with frozen
    components, :meth:`load_components`); :func:`register_kind` adds them to the registry.

    Parameters
    ----------
    pipeline_class : str, optional
        The teacher's diffusers pipeline class (default: the kind's first class).
    scheduler_class : str, optional
        The teacher's scheduler class (default: :attr:`default_scheduler`).
    component_configs : dict, optional
        Configs of the frozen components, read before any weights (e.g. ``{"vqvae": {...}}``).
    """

    name: ClassVar[str] = ""
    pipeline_classes: ClassVar[Tuple[str, ...]] = ()
    variant: ClassVar[Tuple[str, str]] = ("", "")  # (module, class) of the per-layer pipeline variant
    frozen_components: ClassVar[Dict[str, str]] = {}  # component name -> diffusers class
    default_scheduler: ClassVar[str] = "DDPMScheduler"
    card_tag: ClassVar[str] = ""  # the model card's tag for the kind

    def __init__(self, pipeline_class: Optional[str] = None, scheduler_class: Optional[str] = None,
                 component_configs: Optional[Dict[str, dict]] = None):
        self.pipeline_class = pipeline_class or self.pipeline_classes[0]
        if self.pipeline_class not in self.pipeline_classes:
            raise ValueError(f"{self.pipeline_class} is not a {self.name} pipeline ({', '.join(self.pipeline_classes)}).")
        self.scheduler_class = scheduler_class or self.default_scheduler
        self.component_configs: Dict[str, dict] = dict(component_configs or {})
        self.components: Dict[str, torch.nn.Module] = {}
        self.scheduler = None  # the teacher's own scheduler, once load_components ran
        self.notes: List[str] = []  # what users should know about this teacher (logged, and for the card)

    def __repr__(self) -> str:
        loaded = f", components={sorted(self.components)}" if self.components else ""
        return f"{type(self).__name__}({self.pipeline_class!r}, scheduler={self.scheduler_class!r}{loaded})"

    # ------------------------------------------------------------------ loading
    def load_components(self, path: str, revision: Optional[str] = None, cache_dir: Optional[str] = None, token=None,
                        has_scheduler: bool = True) -> "PipelineKind":
        """Load the teacher's own scheduler and the frozen components (safetensors only, eval, no gradients).

        Returns ``self``. Without a scheduler folder (a bare UNet) the scheduler is a 1000-step ``DDPMScheduler``.
        """
        import diffusers

        if has_scheduler:
            cls = getattr(diffusers, self.scheduler_class, None)
            if cls is None or not issubclass(cls, diffusers.SchedulerMixin):
                raise ValueError(f"The teacher's scheduler {self.scheduler_class!r} is not a diffusers scheduler.")
            self.scheduler = cls.from_pretrained(path, subfolder="scheduler", revision=revision, cache_dir=cache_dir, token=token)
        else:
            self.scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
        for name, class_name in self.frozen_components.items():
            self.components[name] = _load_frozen(getattr(diffusers, class_name), path, name, revision, cache_dir, token)
        return self

    def to(self, device) -> "PipelineKind":
        """Move the frozen components to ``device``; returns ``self``."""
        for module in self.components.values():
            module.to(device)
        return self

    def _require(self, name: str):
        if name not in self.components:
            raise RuntimeError(
                f"The {self.name} kind needs its {name!r} component: call load_components(...) (or "
                f"teacher.load_kind(source)) before encoding, sampling or building a pipeline."
            )
        return self.components[name]

    # ------------------------------------------------------------------ shapes
    def sample_shape(self, unet) -> Tuple[int, int, int]:
        """(channels, height, width) of the UNet's input: what the initial noise of sampling looks like."""
        config = unet.config if hasattr(unet, "config") else unet
        get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
        return (int(get("in_channels", 3)), *_image_side(get("sample_size")))

    def image_shape(self, unet) -> Tuple[int, int, int]:
        """(channels, height, width) of the images: the training data's and the decoded samples'."""
        return self.sample_shape(unet)

    def initial_noise(self, unet, num_images: int, seed: int) -> torch.Tensor:
        """Initial noise of ``num_images`` samples from ``torch.Generator().manual_seed(seed)`` (CPU, float32)."""
        return torch.randn((num_images, *self.sample_shape(unet)), generator=torch.Generator().manual_seed(seed))

    # ------------------------------------------------------------------ data
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """What the UNet is trained on, from training images in [-1, 1] (B, C, H, W); no gradients."""
        return images

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """Pixel images in [-1, 1] (not clamped) from the UNet's final samples, as the pipeline decodes them."""
        return samples

    def training_data(self, dataset: Dataset, cache: Optional[LatentCacheConfig] = None,
                      device=None) -> Tuple[Dataset, Callable[[torch.Tensor], torch.Tensor]]:
        """The training data and the function that turns one of its batches into the UNet's training input.

        Returns ``(dataset, to_model_input)``. Pixel kinds: the data set and the identity. Latent kinds: with a
        cache that fits, a data set of latents and the identity; otherwise the data set and :meth:`encode`.
        Scoring mini-batches drawn from the returned data set go through ``to_model_input`` as training batches do.
        """
        return dataset, _identity

    # ------------------------------------------------------------------ sampling
    def sample(self, unet, scheduler, noise: torch.Tensor, num_inference_steps: Optional[int] = None,
               generator: Optional[torch.Generator] = None, eta: float = 0.0, progress: bool = False) -> torch.Tensor:
        """Sample from ``noise`` through ``scheduler`` and decode: images in [0, 1] on the CPU (B, C, H, W)."""
        from .sampling import sample_images

        return sample_images(unet, scheduler, noise, num_inference_steps, generator=generator, eta=eta, progress=progress,
                             decode=self.decode)

    def describe_sampler(self, num_inference_steps: int, eta: float = 0.0) -> str:
        """How samples are drawn, for reports: ``"DDIM 100 steps (eta 0)"``, with the decoding of latent kinds."""
        return f"DDIM {num_inference_steps} steps (eta {eta:g})"

    # ------------------------------------------------------------------ publishing
    def build_pipeline(self, unet, scheduler=None, pruning_info: Optional[dict] = None):
        """The output pipeline around ``unet``, with the teacher's scheduler and frozen components untouched.

        Without ``pruning_info`` (the stock layout): the teacher's own class (``DDIMPipeline`` stays
        ``DDIMPipeline``), loadable with plain diffusers. With ``pruning_info`` (the per-layer layout): the kind's
        remote-code variant, which records it (:data:`variant`).

        Parameters
        ----------
        unet : UNet2DModel
        scheduler : SchedulerMixin, optional
            Default: the teacher's own scheduler (from :meth:`load_components`). One of another class (e.g. the
            ``DDPMScheduler`` the training used) is converted back to the teacher's scheduler class.
        pruning_info : dict, optional
            See :func:`diffusers_gfprune.publish.check_pruning_info`.
        """
        import diffusers

        scheduler = self._own_scheduler(scheduler)
        components = {name: self._require(name) for name in self.frozen_components}
        if pruning_info is None:
            return getattr(diffusers, self.pipeline_class)(unet=unet, scheduler=scheduler, **components)
        from .publish import check_pruning_info

        check_pruning_info(pruning_info, unet)
        return self.variant_class()(unet=unet, scheduler=scheduler, pruning_info=pruning_info, **components)

    @classmethod
    def variant_class(cls):
        """The per-layer pipeline class (imported from ``pipelines/``)."""
        import importlib

        module, name = cls.variant
        return getattr(importlib.import_module(f"pipelines.{module}"), name)

    def _own_scheduler(self, scheduler):
        import diffusers

        if scheduler is None:
            if self.scheduler is None:
                raise RuntimeError("No scheduler given and the teacher's own was not loaded: call load_components(...).")
            return self.scheduler
        if type(scheduler).__name__ == self.scheduler_class:
            return scheduler
        if self.scheduler is not None:  # the teacher's own config, not a round trip through another class
            return self.scheduler
        return getattr(diffusers, self.scheduler_class).from_config(scheduler.config)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _load_frozen(cls, path, subfolder, revision, cache_dir, token):
    try:
        module = cls.from_pretrained(path, subfolder=subfolder, revision=revision, cache_dir=cache_dir, token=token,
                                     use_safetensors=True)
    except (EnvironmentError, OSError) as error:
        if "safetensors" in str(error).lower() or "diffusion_pytorch_model" in str(error):
            raise ValueError(
                f"The teacher {path} has no safetensors weights for its {subfolder!r} ({cls.__name__}). diffusers-gfprune "
                "never loads pickled weights (.bin): use a revision with safetensors (--revision refs/pr/N where the Hub "
                f"has a conversion), or convert them yourself with {cls.__name__}.from_pretrained(..., "
                "use_safetensors=False).save_pretrained(folder) on a machine you trust."
            ) from error
        raise
    # from_pretrained records where it read from; a saved output would publish that (maybe local) path.
    module.register_to_config(_name_or_path=public_source_name(path))
    return module.eval().requires_grad_(False)


def public_source_name(path) -> str:
    """How a saved config may name where a component came from: a Hub id as given, a local folder by base name."""
    path = os.fspath(path)
    return os.path.basename(os.path.normpath(path)) if os.path.exists(path) else path


class PixelKind(PipelineKind):
    """Pixel-space pipelines: the UNet denoises the images themselves."""

    name = "pixel"
    pipeline_classes = ("DDPMPipeline", "DDIMPipeline", "PNDMPipeline")
    variant = ("pipeline_gfprune_ddpm", "GFPruneDDPMPipeline")
    default_scheduler = "DDPMScheduler"
    card_tag = "ddpm"


class LatentKind(PipelineKind):
    """Latent diffusion (``LDMPipeline``): the UNet denoises the latents of a frozen ``VQModel`` (``vqvae``)."""

    name = "latent"
    pipeline_classes = ("LDMPipeline",)
    variant = ("pipeline_gfprune_ldm", "GFPruneLDMPipeline")
    frozen_components = {"vqvae": "VQModel"}
    default_scheduler = "DDIMScheduler"
    card_tag = "latent-diffusion"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config = self.component_configs.get("vqvae")
        if config is not None and "scaling_factor" not in config:
            self.notes.append(_DEFAULT_SCALING_NOTE)

    @property
    def scaling_factor(self) -> float:
        """The factor between the autoencoder's latents and the UNet's: ``LDMPipeline`` decodes ``latents / scaling_factor``."""
        if "vqvae" in self.components:
            return float(self.components["vqvae"].config.scaling_factor)
        from diffusers import VQModel

        return float(self.component_configs.get("vqvae", {}).get("scaling_factor", _default_of(VQModel, "scaling_factor")))

    def downsampling(self) -> int:
        """How many image pixels one latent pixel spans, per side: 2 ** (levels - 1) of the autoencoder."""
        config = self.components["vqvae"].config if "vqvae" in self.components else self.component_configs.get("vqvae")
        if config is None:
            raise RuntimeError("The latent kind needs the autoencoder's config (vqvae/config.json).")
        channels = config["block_out_channels"] if isinstance(config, dict) else config.block_out_channels
        return 2 ** (len(channels) - 1)

    def image_shape(self, unet) -> Tuple[int, int, int]:
        _, height, width = self.sample_shape(unet)
        config = self.components["vqvae"].config if "vqvae" in self.components else self.component_configs.get("vqvae", {})
        channels = config.get("out_channels", 3) if isinstance(config, dict) else config.out_channels
        factor = self.downsampling()
        return (int(channels), height * factor, width * factor)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        vqvae = self._require("vqvae")
        param = next(vqvae.parameters())
        latents = vqvae.encode(images.to(param.device, param.dtype)).latents
        return (latents * self.scaling_factor).to(images.device, torch.float32)

    @torch.no_grad()
    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        vqvae = self._require("vqvae")
        param = next(vqvae.parameters())
        # As LDMPipeline.__call__: undo the scaling, then VQModel.decode (which quantizes with the codebook).
        return vqvae.decode(samples.to(param.device, param.dtype) / self.scaling_factor).sample

    def describe_sampler(self, num_inference_steps: int, eta: float = 0.0) -> str:
        return (f"DDIM {num_inference_steps} steps (eta {eta:g}) in the latent space, decoded by the teacher's "
                f"autoencoder as {self.pipeline_class} decodes")

    def training_data(self, dataset: Dataset, cache: Optional[LatentCacheConfig] = None, device=None):
        if cache is None or cache.max_megabytes == 0:
            return dataset, self.encode
        cached, reason = LatentDataset.build(self, dataset, cache, device)
        if cached is None:
            logger.warning("Latents are not cached (%s); each batch is encoded in the training loop.", reason)
            return dataset, self.encode
        logger.info("Cached the latents of %d images (%.1f MiB).", len(cached), cached.nbytes / 2**20)
        return cached, _identity


_DEFAULT_SCALING_NOTE = (
    "The autoencoder's config (vqvae/config.json) records no scaling_factor, so diffusers uses its default 0.18215, "
    "and LDMPipeline divides the UNet's latents by it before decoding; this run encodes training images with the "
    "same factor. If the UNet was trained at another scale (1.0 for the original latent-diffusion VQ models, e.g. "
    "CompVis/ldm-celebahq-256), its own pipeline decodes it wrongly too: write the right scaling_factor into a "
    "local copy's vqvae/config.json first."
)


def _default_of(cls, name: str):
    import inspect

    return inspect.signature(cls.__init__).parameters[name].default


class LatentDataset(Dataset):
    """The latents of a data set, encoded once (:meth:`LatentKind.training_data` with a cache).

    Items are ``{"images": latent (C, h, w)}`` (the key the training loop reads) and the data set's labels. A data
    set with ``random_flip`` has both orientations encoded, and an item draws its flip from torch's global
    generator as the data set itself does, so the cached and the uncached runs see the same batches.
    """

    def __init__(self, latents: torch.Tensor, flipped: Optional[torch.Tensor], labels: Optional[torch.Tensor]):
        self.latents, self.flipped, self.labels = latents, flipped, labels

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.latents, self.flipped) if t is not None)

    def __len__(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, index: int) -> dict:
        latent = self.latents[index]
        if self.flipped is not None and torch.rand(()) < 0.5:
            latent = self.flipped[index]
        item = {"images": latent}
        if self.labels is not None:
            item["labels"] = self.labels[index]
        return item

    @classmethod
    def build(cls, kind: LatentKind, dataset: Dataset, cache: LatentCacheConfig, device=None):
        """``(LatentDataset, None)``, or ``(None, reason)`` when the latents would not fit or cannot be cached."""
        random_flip = bool(getattr(dataset, "random_flip", False))
        if not hasattr(dataset, "random_flip") and not _deterministic(dataset):
            return None, ("the data set's items change from one read to the next (random crops or flips), so latents "
                          "encoded once would freeze one draw")
        probe = dataset[0]["images"]
        vqvae = kind._require("vqvae")
        channels = vqvae.config.latent_channels
        side = [s // kind.downsampling() for s in probe.shape[-2:]]
        nbytes = len(dataset) * channels * side[0] * side[1] * 4 * (2 if random_flip else 1)
        if nbytes > cache.max_megabytes * 2**20:
            return None, (f"{len(dataset)} images need {nbytes / 2**20:.1f} MiB of latents"
                          f"{' (both flips)' if random_flip else ''}, over the bound of {cache.max_megabytes:g} MiB")
        if device is not None:
            kind.to(device)
        saved = getattr(dataset, "random_flip", None)
        try:
            if random_flip:
                dataset.random_flip = False  # encode each orientation exactly once
            latents, flipped, labels = [], [], []
            for start in range(0, len(dataset), cache.batch_size):
                items = [dataset[i] for i in range(start, min(start + cache.batch_size, len(dataset)))]
                images = torch.stack([item["images"] for item in items])
                if device is not None:
                    images = images.to(device)
                latents.append(kind.encode(images).cpu())
                if random_flip:
                    flipped.append(kind.encode(images.flip(-1)).cpu())
                if "labels" in items[0]:
                    labels.append(torch.stack([item["labels"] for item in items]))
        finally:
            if saved is not None:
                dataset.random_flip = saved
        return cls(torch.cat(latents), torch.cat(flipped) if flipped else None, torch.cat(labels) if labels else None), None


def _deterministic(dataset: Dataset, probes: int = 4) -> bool:
    """Whether the first items read twice are equal (the global random state is restored afterwards)."""
    state = torch.random.get_rng_state()
    try:
        for index in range(min(probes, len(dataset))):
            if not torch.equal(dataset[index]["images"], dataset[index]["images"]):
                return False
        return True
    finally:
        torch.random.set_rng_state(state)


# ---------------------------------------------------------------------- the registry
KINDS: Dict[str, Type[PipelineKind]] = {}
"""Every pipeline kind, by name."""

PIPELINE_CLASSES: Dict[str, Type[PipelineKind]] = {}
"""Pipeline class name (diffusers' and this package's variants) -> its kind."""

_VARIANT_BASES: Dict[str, str] = {}  # variant class -> the diffusers class it publishes


def register_kind(kind: Type[PipelineKind]) -> Type[PipelineKind]:
    """Add a kind to the registry (its pipeline classes and its per-layer variant); returns it.

    Raises
    ------
    ValueError
        When a class is already claimed by another kind.
    """
    names = list(kind.pipeline_classes) + ([kind.variant[1]] if kind.variant[1] else [])
    for name in names:
        other = PIPELINE_CLASSES.get(name)
        if other is not None and other is not kind:
            raise ValueError(f"{name} already belongs to the {other.name!r} kind.")
    KINDS[kind.name] = kind
    for name in names:
        PIPELINE_CLASSES[name] = kind
    if kind.variant[1]:
        _VARIANT_BASES[kind.variant[1]] = kind.pipeline_classes[0]
    return kind


register_kind(PixelKind)
register_kind(LatentKind)


def supported_pipeline_classes() -> str:
    """``"DDPMPipeline, DDIMPipeline, PNDMPipeline (pixel); LDMPipeline (latent)"``: for error messages."""
    return "; ".join(f"{', '.join(k.pipeline_classes)} ({k.name})" for k in KINDS.values())


def _class_name(entry) -> str:
    # "_class_name" is "DDPMPipeline", or ["module", "Class"] for a pipeline shipped as code.
    if isinstance(entry, (list, tuple)) and len(entry) == 2:
        return str(entry[1])
    return str(entry) if entry else ""


def kind_for_index(model_index: Optional[dict], where: str, component_configs: Optional[Dict[str, dict]] = None) -> PipelineKind:
    """The kind of a teacher from its ``model_index.json`` (``None``: a bare ``UNet2DModel``, a pixel DDPM).

    Parameters
    ----------
    model_index : dict or None
        The parsed ``model_index.json``.
    where : str
        The teacher's path or Hub id, for messages.
    component_configs : dict, optional
        Configs of the kind's frozen components (``{"vqvae": config}``), read before any weights.

    Raises
    ------
    ValueError
        For a pipeline class no kind takes (the message names it and lists the supported ones), or a pipeline
        without the components its kind needs.
    """
    if model_index is None:
        return PixelKind("DDPMPipeline", "DDPMScheduler")
    name = _class_name(model_index.get("_class_name"))
    kind = PIPELINE_CLASSES.get(name)
    if kind is None:
        raise ValueError(
            f"The teacher at {where} is a {name or 'pipeline of unknown class'}. diffusers-gfprune prunes the UNet2DModel "
            f"of these unconditional pipelines: {supported_pipeline_classes()}. Conditional pipelines (text, class or "
            "image conditioning) and other denoisers are not supported."
        )
    if "unet" not in model_index:
        raise ValueError(f"The {name} at {where} has no 'unet' component; the teacher must be a UNet2DModel pipeline.")
    missing = [c for c in kind.frozen_components if c not in model_index]
    if missing:
        raise ValueError(f"The {name} at {where} lacks its {missing} component(s), which a {kind.name} pipeline needs.")
    for component, class_name in kind.frozen_components.items():
        entry = model_index[component]
        if _class_name(entry) != class_name:
            raise ValueError(
                f"The {name} at {where} has a {_class_name(entry) or 'missing'} as {component!r}; the {kind.name} kind "
                f"supports a diffusers {class_name} there."
            )
    scheduler = model_index.get("scheduler")
    pipeline_class = _VARIANT_BASES.get(name, name)
    return kind(pipeline_class, _class_name(scheduler) or None, component_configs)


def kind_for_pipeline(pipeline) -> PipelineKind:
    """The kind of a pipeline already loaded (e.g. with remote code), holding its scheduler and frozen components.

    Nothing is loaded or copied: the kind's components are the pipeline's own modules (set to eval mode without
    gradients). A subclass of a supported pipeline (a remote-code variant) has its base's kind.

    Raises
    ------
    ValueError
        For a pipeline whose class and bases no kind takes.
    """
    for cls in type(pipeline).__mro__:
        kind = PIPELINE_CLASSES.get(cls.__name__)
        if kind is not None:
            break
    else:
        raise ValueError(
            f"A {type(pipeline).__name__} is not a pipeline diffusers-gfprune prunes; supported: {supported_pipeline_classes()}."
        )
    configs = {name: dict(getattr(pipeline, name).config) for name in kind.frozen_components}
    bound = kind(_VARIANT_BASES.get(cls.__name__, cls.__name__), type(pipeline.scheduler).__name__, configs)
    bound.components = {name: getattr(pipeline, name).eval().requires_grad_(False) for name in kind.frozen_components}
    bound.scheduler = pipeline.scheduler
    return bound
