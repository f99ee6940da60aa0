"""ImageNet starts for both stages, through timm: where the weights come from, and timm loading them.

A stage asks for a pretrained start with ``model.pretrained: true`` and/or
``model.weights_file: PATH``. The weights come from, in this order:

1. ``model.weights_file``: a local timm state dict (``.safetensors``, ``.pth``
   or ``.bin``) of the 2D timm model, e.g. one written by the ``fetch`` command;
2. the Hugging Face cache timm downloads into (``$HF_HUB_CACHE``, else
   ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``);
3. the Hugging Face hub, downloading into that cache, when it can be reached
   and ``HF_HUB_OFFLINE`` is not set.

Whatever the source, timm itself loads the file
(``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))``):
it reads every format, adapts the 3-channel stem to ``in_chans`` with
``adapt_input_conv`` and checks every key strictly. When no source can give
the weights, :class:`PretrainedError` says how to supply them: a run never goes
on from random weights when it asked for ImageNet ones.

Rebuilding a trained model from a checkpoint never comes here (the builders'
``pretrained_source=False``): the checkpoint holds every weight.

Where there is internet, fill the cache and write the files for an offline machine::

    python -m common.pretrained fetch --out DIR
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence
from urllib.parse import urlparse

import timm
from torch import nn

log = logging.getLogger(__name__)

HUB_PROBE_SECONDS = 3.0  # one TCP connect; huggingface_hub's own retries take ~45 s without a network
REQUIRED_TENSOR_FRACTION = 0.95


class PretrainedError(RuntimeError):
    """A pretrained start that cannot be made; the message names the source and how to fix it."""


class PretrainedFileNotFound(PretrainedError, FileNotFoundError):
    """``model.weights_file`` names no file."""


@dataclass(frozen=True)
class Source:
    """Where the weights of timm model ``arch`` come from: a local file, the hub cache, or the hub."""

    kind: Literal["file", "cache", "hub"]
    arch: str
    location: str  # file path, cached file path, or hub repo id

    def __str__(self) -> str:
        return {"file": "file {}", "cache": "Hugging Face cache {}", "hub": "Hugging Face hub {}"}[
            self.kind].format(self.location)


def wants_pretrained(pretrained: bool, weights_file: str | None) -> bool:
    """A weights file alone also asks for a pretrained start (it is the source)."""
    return bool(pretrained or weights_file)


# ---- the Hugging Face hub and its cache (read at call time, so env changes apply) ---------

def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` set: never touch the network, use the cache only."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def hub_cache_dir() -> Path:
    """The folder huggingface_hub (and so timm) caches downloads in."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """One TCP connection to the hub: fails at once without DNS, after ``timeout`` behind a firewall."""
    url = urlparse(hub_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def how_to_supply(arch: str) -> str:
    """The ways to give timm model ``arch`` its ImageNet weights, for error messages."""
    return (
        f"Give the ImageNet weights of timm model '{arch}' one of these ways:\n"
        f"  - a local file: model.weights_file=PATH (a timm state dict of '{arch}': .safetensors, .pth "
        f"or .bin); `python -m common.pretrained fetch --out DIR` writes them where there is internet;\n"
        f"  - the Hugging Face cache timm uses, {hub_cache_dir()} (move it with HF_HOME or HF_HUB_CACHE): "
        f"fill it by running once with internet (or with the fetch command), copy it over, and set "
        f"HF_HUB_OFFLINE=1 to use it without any network call;\n"
        f"  - or train from random weights: model.pretrained=false model.weights_file=null.")


def _pretrained_cfg(arch: str) -> dict[str, Any]:
    """timm's pretrained config of ``arch`` (``name`` or ``name.tag``)."""
    if not timm.is_model(arch):
        raise PretrainedError(f"timm {timm.__version__} has no model named '{arch}'")
    try:
        cfg = timm.models.get_pretrained_cfg(arch)
    except RuntimeError as exc:  # an unknown tag
        raise PretrainedError(f"timm model '{arch}': {exc}") from exc
    if cfg is None or not cfg.hf_hub_id:
        raise PretrainedError(f"timm {timm.__version__} has no Hugging Face hub weights for '{arch}'; "
                              f"give a local file with model.weights_file=PATH")
    return cfg.to_dict()


def _hub_files(cfg: dict[str, Any]) -> tuple[str, str | None, list[str]]:
    """(repo id, revision, file names in timm's order of preference: safetensors first)."""
    from timm.models._hub import HF_WEIGHTS_NAME, _get_safe_alternatives, hf_split

    repo_id, revision = hf_split(cfg["hf_hub_id"])
    filename = cfg.get("hf_hub_filename") or HF_WEIGHTS_NAME
    return repo_id, revision, [*_get_safe_alternatives(filename), filename]


def _cached(cfg: dict[str, Any]) -> str | None:
    """The cached hub file of a timm pretrained config, or None; no network."""
    from huggingface_hub import try_to_load_from_cache

    repo_id, revision, names = _hub_files(cfg)
    for name in names:
        found = try_to_load_from_cache(repo_id, name, cache_dir=str(hub_cache_dir()), revision=revision)
        if isinstance(found, str):  # None: unknown; a sentinel object: known to be absent
            return found
    return None


# ---- resolving and loading ----------------------------------------------------------------

def resolve_source(arch: str, weights_file: str | None) -> Source:
    """Where the weights of ``arch`` will come from; raises at once when nowhere.

    Cheap: reads no weights and downloads nothing (at most one TCP probe of the
    hub), so training calls it before any data work.
    """
    if weights_file:
        path = Path(weights_file).expanduser()
        if not path.is_file():
            raise PretrainedFileNotFound(f"model.weights_file not found: {path}\n{how_to_supply(arch)}")
        return Source("file", arch, str(path))
    cfg = _pretrained_cfg(arch)
    cached = _cached(cfg)
    if cached:
        return Source("cache", arch, cached)
    if hub_offline():
        raise PretrainedError(f"no ImageNet weights for '{arch}': HF_HUB_OFFLINE is set and the cache "
                              f"{hub_cache_dir()} has no copy of {cfg['hf_hub_id']}\n{how_to_supply(arch)}")
    if not hub_reachable():
        raise PretrainedError(f"no ImageNet weights for '{arch}': the Hugging Face hub ({hub_endpoint()}) "
                              f"cannot be reached and the cache {hub_cache_dir()} has no copy of "
                              f"{cfg['hf_hub_id']}\n{how_to_supply(arch)}")
    return Source("hub", arch, cfg["hf_hub_id"])


def local_weights(source: Source) -> str:
    """A local file holding ``source``'s weights, downloading hub weights into the cache."""
    if source.kind != "hub":
        return source.location
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    repo_id, revision, names = _hub_files(_pretrained_cfg(source.arch))
    failure: Exception | None = None
    for name in names:  # safetensors first, as timm does
        try:
            path = hf_hub_download(repo_id, name, revision=revision, cache_dir=str(hub_cache_dir()),
                                   library_name="timm", library_version=timm.__version__)
            log.info("downloaded %s/%s into %s", repo_id, name, hub_cache_dir())
            return path
        except LocalEntryNotFoundError as exc:  # a subclass of the next: the network failed
            failure = exc
            break
        except EntryNotFoundError as exc:  # the repo has no file of this name: try the next
            failure = exc
        except Exception as exc:  # network and HTTP errors come in many types
            failure = exc
            break
    raise PretrainedError(f"could not download ImageNet weights of '{source.arch}' from {repo_id}: "
                          f"{type(failure).__name__}: {failure}\n{how_to_supply(source.arch)}") from failure


def create_pretrained(source: Source, **kwargs: Any) -> nn.Module:
    """``timm.create_model(arch, pretrained=True, ...)`` loading ``source`` through timm's file overlay.

    The ImageNet classifier is kept so that timm loads strictly: a file for
    another architecture fails here, naming the file. Callers drop the head.
    """
    path = local_weights(source)
    try:
        model = timm.create_model(source.arch, pretrained=True, pretrained_cfg_overlay=dict(file=path), **kwargs)
    except KeyError as exc:  # timm looks the stem up by name to adapt it to in_chans
        raise PretrainedError(f"{path}: has no tensor {exc} that timm model '{source.arch}' needs "
                              f"(a file for another architecture?)") from exc
    except RuntimeError as exc:
        if "Error(s) in loading state_dict" in str(exc):
            raise PretrainedError(f"{path}: its tensors do not fit timm model '{source.arch}' (a file for "
                                  f"another architecture?): {_shorten(str(exc))}") from exc
        raise PretrainedError(f"{path}: cannot be read as a state dict: {_shorten(str(exc))}") from exc
    except Exception as exc:  # unpickling and safetensors errors
        raise PretrainedError(f"{path}: cannot be read as a state dict: "
                              f"{type(exc).__name__}: {_shorten(str(exc))}") from exc
    return model


def _shorten(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + " ..."


# ---- the fetch command ----------------------------------------------------------------------

def configured_archs(stage1_config: str | Path, stage2_config: str | Path) -> dict[str, str]:
    """{stage: timm model name} the two configs start from."""
    # Imported here: common/ does not depend on the stages, only this command reads their configs.
    from common.config import load_config
    from stage1_seg.config import Stage1Config
    from stage1_seg.model import timm_arch
    from stage2_cls.config import Stage2Config

    return {"stage1": timm_arch(load_config(Stage1Config, stage1_config).model.encoder),
            "stage2": load_config(Stage2Config, stage2_config).model.backbone}


def fetch(archs: Sequence[str], out: Path) -> dict[str, Path]:
    """Fill the hub cache with each model's ImageNet weights and write them to ``out/<arch>.safetensors``."""
    import safetensors.torch

    from common.io import atomic_path

    written = {}
    for arch in dict.fromkeys(archs):
        source = resolve_source(arch, None)
        model = create_pretrained(source)  # the 3-channel ImageNet model; the stages adapt its stem
        target = out / f"{arch}.safetensors"
        with atomic_path(target) as tmp:
            safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        log.info("%s: wrote %s (from the %s)", arch, target, source)
        written[arch] = target
    return written


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    from common.cli import setup_logging
    from configs import config_path

    parser = argparse.ArgumentParser(description="ImageNet weights for both stages, for offline machines.")
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("fetch", help="fill the Hugging Face cache and write <out>/<model>.safetensors")
    cmd.add_argument("--out", required=True, help="folder for the weight files")
    cmd.add_argument("--stage1-config", default=str(config_path("stage1.yaml")))
    cmd.add_argument("--stage2-config", default=str(config_path("stage2.yaml")))
    cmd.add_argument("--arch", nargs="+", default=None, help="timm model names instead of the configs' models")
    args = parser.parse_args(argv)
    setup_logging()
    archs = {a: a for a in args.arch} if args.arch else configured_archs(args.stage1_config, args.stage2_config)
    written = fetch(list(archs.values()), Path(args.out))
    print(f"cache: {hub_cache_dir()} (offline: copy it over and set HF_HUB_OFFLINE=1, or use the files)")
    for who, arch in archs.items():
        prefix = f"{who}: " if who != arch else ""
        print(f"{prefix}model.weights_file={written[arch].resolve()}")
    return written


if __name__ == "__main__":
    main()
